"""Client-side helpers: install, register, where, stats, evict, prewarm, scale_down."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ._fanout import (
    WorkerList,
    describe_on_worker,
    evict_on_worker,
    has_plugin_on_worker,
    prewarm_on_worker,
    run_on_workers,
    snapshot_on_worker,
    tokens_on_worker,
    warm_map_on_scheduler,
    worker_plugin_names,
)
from ._protocol import METADATA_CONTEXTS, METADATA_DEFINITIONS, State, warm_map_entry
from .context import Context
from .errors import (
    ContextDefinitionError,
    ContextLoadError,
    ContextUsageError,
    PervasiveError,
    PluginNotInstalledError,
    UnknownContextError,
)
from .worker import (
    ContextDeclaration,
    ContextWorkerPlugin,
    _check_contexts,
)

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client

_METADATA = METADATA_CONTEXTS
#: ``{name: Context.describe()}``, to name both sides of a conflicting redefinition.
_DEFINITIONS = METADATA_DEFINITIONS

logger = logging.getLogger(__name__)


# -- registration ---------------------------------------------------------------
# Every public helper is ``client.sync(_impl, ...)``: it blocks with a normal
# client and returns an awaitable with an asynchronous one, like Client methods.
async def _declared(client: Client) -> dict[str, str]:
    """``{name: token}`` of contexts declared on the cluster."""
    known = dict(await client.get_metadata(list(_METADATA), default={}) or {})
    for tokens in (await run_on_workers(client, tokens_on_worker))[0].values():
        for name, token in tokens.items():
            known.setdefault(name, token)
    return known


async def _existing_definition(client: Client, name: str) -> str:
    described = await client.get_metadata([*_DEFINITIONS, name], default=None)
    if described is None:
        found = [d for d in (await run_on_workers(client, describe_on_worker, name))[0].values() if d]
        described = found[0] if found else "a definition the workers hold"
    return described


def _claim_on_scheduler(dask_scheduler, name: str, token: str, description: str) -> str | None:
    """Check-and-set of the declaration of ``name`` in the scheduler's metadata.

    Atomic cluster-wide: a plain function run on the scheduler's event loop,
    it reads and writes without yielding, so of concurrent claims exactly one
    sets a new name. Returns ``None`` when ``name`` is now declared with
    ``token`` (claimed, or already so), else the existing definition.
    """
    existing = dask_scheduler.get_metadata(keys=[*_METADATA, name], default=None)
    if existing is None:
        dask_scheduler.set_metadata(keys=[*_METADATA, name], value=token)
        dask_scheduler.set_metadata(keys=[*_DEFINITIONS, name], value=description)
        return None
    if existing == token:
        return None
    return dask_scheduler.get_metadata(keys=[*_DEFINITIONS, name], default=None) or "a definition the cluster holds"


def _unclaim_on_scheduler(dask_scheduler, name: str, token: str, declaration: str) -> None:
    """Undo :func:`_claim_on_scheduler` of a registration that failed (unless its plugin got through)."""
    if declaration in dask_scheduler.worker_plugins:
        return
    if dask_scheduler.get_metadata(keys=[*_METADATA, name], default=None) == token:
        del dask_scheduler.task_metadata[_METADATA[0]][_METADATA[1]][name]
        dask_scheduler.task_metadata[_DEFINITIONS[0]][_DEFINITIONS[1]].pop(name, None)


def _redefinition(context: Context, existing: str) -> ContextDefinitionError:
    return ContextDefinitionError(
        f"A different context named {context.name!r} is already declared on this cluster: "
        f"{existing}; you are declaring {context.describe()}. Pick another name "
        "(a declared context cannot be redefined while workers may hold it)",
        context.name,
    )


async def _register(client: Client, context: Context) -> bool:
    if not isinstance(context, Context):
        raise ContextDefinitionError(
            f"dask_pervasive.register() takes one dask_pervasive.Context, got {type(context).__name__}: {context!r}"
        )
    (context,) = _check_contexts([context])
    known = await _declared(client)  # includes contexts declared in worker plugins, not in the metadata
    if context.name in known and known[context.name] != context.token:
        raise _redefinition(context, await _existing_definition(client, context.name))
    # The name is claimed on the scheduler first, atomically: of two clients registering it at once
    # with different definitions exactly one wins; the loser has sent nothing (no declaration plugin,
    # no metadata), so workers joining later load the winner.
    existing = await client.run_on_scheduler(
        _claim_on_scheduler, name=context.name, token=context.token, description=context.describe()
    )
    if existing is not None:
        raise _redefinition(context, existing)
    declaration = ContextDeclaration(context).name
    if context.name in known and declaration in await client.run_on_scheduler(worker_plugin_names):
        return False
    try:
        await client.register_plugin(ContextDeclaration(context))
    except BaseException:
        if context.name not in known:  # our claim: give the name back
            await client.run_on_scheduler(
                _unclaim_on_scheduler, name=context.name, token=context.token, declaration=declaration
            )
        raise
    return True


def register(client: Client, context: Context) -> bool:
    """Declare ``context`` on every current and future worker.

    Returns ``False`` when an identical context was already declared.

    Raises
    ------
    ContextDefinitionError
        ``context`` is not a valid, picklable Context, or a different context
        with the same name is already declared (the message shows both).
        Also a ``ValueError``.

    Examples
    --------
    >>> dp.register(client, dp.Context("tok", load=load_tokenizer))  # doctest: +SKIP
    True
    """
    return client.sync(_register, client, context)


async def _install(client, contexts, max_bytes, device_max_bytes, cache_dir, scheduler) -> None:
    contexts = _check_contexts(contexts)
    await client.register_plugin(
        ContextWorkerPlugin(max_bytes=max_bytes, device_max_bytes=device_max_bytes, cache_dir=cache_dir)
    )
    if scheduler:
        from .scheduler import ContextSchedulerPlugin

        await client.register_plugin(ContextSchedulerPlugin())
    for ctx in contexts:
        await _register(client, ctx)


def install(
    client: Client,
    contexts: Iterable[Context] = (),
    *,
    max_bytes: str | float | None = None,
    device_max_bytes: str | float | None = None,
    cache_dir: str | None = None,
    scheduler: bool = True,
) -> None:
    """Install dask_pervasive on a cluster and declare ``contexts``. Idempotent.

    Registers the scheduler plugin (placement), :class:`ContextWorkerPlugin`
    (with the budgets, see there), then each context with :func:`register`.
    Budgets apply only the first time; later calls just add contexts.

    Examples
    --------
    >>> import dask_pervasive as dp
    >>> dp.install(client, [dp.TransformersContext("gpt", source="file:///models/gpt2")])  # doctest: +SKIP
    """
    return client.sync(_install, client, contexts, max_bytes, device_max_bytes, cache_dir, scheduler)


# -- inspection -----------------------------------------------------------------
async def _snapshots(client: Client, workers: list[str] | None = None) -> list[dict]:
    rows: list[dict] = []
    for snap in (await run_on_workers(client, snapshot_on_worker, workers=workers))[0].values():
        rows.extend(snap)
    return rows


async def _known_names(client: Client, rows: list[dict]) -> set[str]:
    names = {r["context"] for r in rows}
    names.update(await client.get_metadata(list(_METADATA), default={}) or {})
    return names


async def _where(client: Client) -> dict[str, dict[str, list[str]]]:
    declared = await client.get_metadata(list(_METADATA), default={}) or {}
    warm_map = await client.run_on_scheduler(warm_map_on_scheduler)
    if warm_map is not None:  # the scheduler plugin's view, which placement uses
        for name in declared:
            warm_map.setdefault(name, warm_map_entry((), affinity=()))
        return warm_map
    # No scheduler plugin: the same map from the workers' own snapshots, without affinity sets.
    rows = await _snapshots(client)
    by_name: dict[str, list[tuple[str, str, bool]]] = {name: [] for name in declared}
    for r in rows:
        by_name.setdefault(r["context"], []).append((r["worker"], r["state"], r["files"]))
    return {name: warm_map_entry(states) for name, states in by_name.items()}


def where(client: Client) -> dict[str, dict[str, list[str]]]:
    """Which workers hold which context.

    Returns
    -------
    ``{context: {"resident": [...], "files": [...], "loading": [...], "failed": [...]}}``
    where ``files`` lists workers whose local cache holds the context files.
    With the scheduler plugin installed this is its warm map (as placement
    sees it, updated by worker events), with an extra ``"affinity"`` list:
    the workers its pending tasks are currently steered to.
    """
    return client.sync(_where, client)


class ContextStatsTable(list):
    """A list of per-(worker, context) dicts, with :meth:`to_pandas`."""

    def to_pandas(self) -> pd.DataFrame:
        """The rows as a ``pandas.DataFrame``, one column per key (needs pandas).

        Raises
        ------
        ImportError
            When pandas is not installed, naming the extra that brings it.
        """
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError(
                "ContextStatsTable.to_pandas needs pandas, which is not installed: "
                "pip install pandas (or dask-pervasive[pandas])"
            ) from exc

        return pd.DataFrame(list(self))

    def total(self, key: str, context: str | None = None) -> float:
        """Sum of ``key`` over workers (and optionally one context)."""
        return sum(r[key] for r in self if context is None or r["context"] == context)


async def _stats(client: Client) -> ContextStatsTable:
    return ContextStatsTable(sorted(await _snapshots(client), key=lambda r: (r["context"], r["worker"])))


def stats(client: Client) -> ContextStatsTable:
    """Counters per worker and context.

    Each row has ``worker, context, state, loads, hits, evictions,
    load_seconds, fetch_seconds, bytes_from_peers, bytes_from_origin,
    failures, host_bytes, device_bytes, users``.

    Examples
    --------
    >>> dp.stats(client).total("loads", "llm")  # doctest: +SKIP
    4
    """
    return client.sync(_stats, client)


async def _require_known(client: Client, name: str, rows: list[dict]) -> None:
    if not isinstance(name, str):
        raise ContextUsageError(f"context name must be a string, got {type(name).__name__}: {name!r}")
    known = await _known_names(client, rows)
    if name not in known:
        if not any((await run_on_workers(client, has_plugin_on_worker))[0].values()):
            raise PluginNotInstalledError(
                f"Context {name!r} is unknown because ContextWorkerPlugin is not installed on any worker: "
                "call dask_pervasive.install(client, contexts) first"
            )
        raise UnknownContextError(name, known, "client")


async def _check_workers(client: Client, workers: Iterable[str] | None) -> list[str] | None:
    """``workers`` as a list of addresses the scheduler knows (ContextUsageError otherwise)."""
    if workers is None:
        return None
    if isinstance(workers, str):
        workers = [workers]
    try:
        workers = list(workers)
    except TypeError:
        raise ContextUsageError(f"workers must be a list of worker addresses, got {workers!r}") from None
    # No n_workers= (distributed < 2025.4 rejects it); the default lists every worker.
    info = await client.scheduler.identity()
    unknown = [w for w in workers if w not in info["workers"]]
    if unknown:
        raise ContextUsageError(f"unknown worker address(es) {unknown!r}; the cluster has {sorted(info['workers'])!r}")
    return workers


async def _evict(client: Client, name: str, workers: Iterable[str] | None) -> dict[str, str]:
    await _require_known(client, name, await _snapshots(client))
    workers = await _check_workers(client, workers)
    result, left = await run_on_workers(client, evict_on_worker, name, workers=workers)
    return {**result, **dict.fromkeys(left, "left")}


def evict(client: Client, name: str, workers: Iterable[str] | None = None) -> dict[str, str]:
    """Evict context ``name`` (on ``workers``, default all) where no task uses it.

    Returns
    -------
    ``{worker: "evicted" | "not-resident" | "in-use" | "unknown" | "left"}``
    (``"left"``: the worker left the cluster during the call).
    """
    return client.sync(_evict, client, name, workers)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


def _progress_bar(enabled: bool, **kwargs):
    # No tqdm object at all when disabled: tqdm starts a monitor thread per process.
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


async def _prewarm(client, name, n_workers, workers, progress) -> list[str]:
    if n_workers is not None and (isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 0):
        raise ContextUsageError(f"n_workers must be a non-negative int or None, got {n_workers!r}")
    rows = await _snapshots(client)
    await _require_known(client, name, rows)
    workers = await _check_workers(client, workers)
    mine = [r for r in rows if r["context"] == name]
    resident = sorted(r["worker"] for r in mine if r["state"] == State.RESIDENT.value)
    if workers is not None:
        targets = list(workers)
    else:
        info = await client.scheduler.identity()
        cold = sorted(w for w in info["workers"] if w not in resident)
        files = {r["worker"] for r in mine if r["files"]}
        cold.sort(key=lambda w: w not in files)  # files-warm workers load without fetching
        want = len(cold) if n_workers is None else max(0, n_workers - len(resident))
        targets = cold[:want]
    if not targets:
        return WorkerList(resident if workers is None else [])

    async def warm_one(w: str) -> tuple[str, BaseException | None]:
        try:
            done, _ = await run_on_workers(client, prewarm_on_worker, name, workers=[w])
        except Exception as exc:  # noqa: BLE001 - reported once every worker has finished
            return w, exc
        return w, None if w in done else _Left()

    errors: list[tuple[str, BaseException]] = []
    left: list[str] = []
    warm: set[str] = set(resident) if workers is None else set()
    with _progress_bar(progress, total=len(targets), desc=f"prewarm {name}", unit="worker") as bar:
        for fut in asyncio.as_completed([warm_one(w) for w in targets]):
            w, exc = await fut
            if exc is None:
                warm.add(w)
            elif isinstance(exc, _Left):
                left.append(w)
            else:
                errors.append((w, exc))
            bar.update()
    if errors:
        w, first = errors[0]
        if isinstance(first, PervasiveError) and type(first) is not PervasiveError:
            raise first
        cause = first.__cause__ if type(first) is PervasiveError and first.__cause__ is not None else first
        raise ContextLoadError(name, w, None, cause) from cause
    if left:
        logger.warning("pervasive: prewarm of %r skipped %s, which left the cluster", name, ", ".join(sorted(left)))
    present = set((await client.scheduler.identity(n_workers=-1))["workers"]) if workers is None else None
    return WorkerList(sorted(w for w in warm if present is None or w in present), left)


class _Left(Exception):
    """Marks a prewarm target that left the cluster."""


def prewarm(
    client: Client,
    name: str,
    n_workers: int | None = None,
    workers: Iterable[str] | None = None,
    progress: bool = True,
) -> list[str]:
    """Load context ``name`` ahead of the tasks that need it.

    Parameters
    ----------
    n_workers
        Warm until this many workers hold it resident (default: all).
    workers
        Warm exactly these workers instead.
    progress
        Show a progress bar.

    Returns
    -------
    The workers on which the context is resident afterwards (of those asked),
    as a list whose ``left`` attribute names the targets that left the
    cluster during the call (skipped: the others are still warmed).

    Raises
    ------
    UnknownContextError
        ``name`` is not declared.
    ContextUsageError
        ``n_workers`` or ``workers`` is invalid (e.g. an unknown address).
    ContextLoadError, ContextTooLargeError, BudgetExhaustedError
        Loading failed on a worker (raised after all others finished).

    Examples
    --------
    >>> dp.prewarm(client, "llm", n_workers=2)  # doctest: +SKIP
    ['tcp://10.0.0.1:40001', 'tcp://10.0.0.2:40001']
    """
    return client.sync(_prewarm, client, name, n_workers, workers, progress)


# -- scaling down ---------------------------------------------------------------------------------
async def _scale_down(client: Client, n: int, cluster) -> list[str]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ContextUsageError(f"scale_down needs a number of workers >= 0, got {n!r}")
    if n == 0:
        return []
    # The scheduler chooses (with the scheduler plugin: warm workers of contexts in demand stay);
    # names, because a cluster manager removes workers by spec name.
    names = await client.scheduler.workers_to_close(n=n, attribute="name")
    if not names:
        return []
    retired = await client.scheduler.retire_workers(names=names, close_workers=True, remove=True)
    if cluster is None:
        cluster = getattr(client, "cluster", None)
    scale_down = getattr(cluster, "scale_down", None)
    if scale_down is not None:
        # As Adaptive does: take the retired workers out of the cluster's spec, or a
        # SpecCluster (LocalCluster, dask-jobqueue) would start them again.
        out = scale_down(names)
        if asyncio.iscoroutine(out) or isinstance(out, asyncio.Future):
            await out
    return sorted(retired)


def scale_down(client: Client, n: int, cluster=None) -> list[str]:
    """Give back ``n`` workers, choosing which with the contexts in mind.

    ``cluster.scale(len(cluster.workers) - n)`` on a ``SpecCluster``
    (``LocalCluster``, dask-jobqueue's clusters) removes the most recently
    added worker specs without asking the scheduler, warm or not. This asks
    the scheduler instead (``Scheduler.workers_to_close``, where
    :class:`ContextSchedulerPlugin` keeps the last warm worker of every
    context in demand and prefers cold workers), retires those workers
    gracefully (their results move elsewhere, their queued tasks are
    re-targeted, they serve their context files to peers until gone) and
    removes them from the cluster's spec, as ``cluster.adapt()`` does.

    Parameters
    ----------
    n
        How many workers to give back. Fewer go when the scheduler keeps some
        (last warm worker of a context in demand, a long-running task, data
        that cannot move).
    cluster
        The cluster manager whose spec to update (default: ``client.cluster``,
        set when the client was made from the cluster). Without one, the
        workers are retired and closed only (right for workers started with
        ``dask worker``).

    Returns
    -------
    The addresses of the workers retired.

    Raises
    ------
    ContextUsageError
        ``n`` is not a whole number >= 0.

    Examples
    --------
    >>> dp.scale_down(client, 2)  # doctest: +SKIP
    ['tcp://10.0.0.3:40001', 'tcp://10.0.0.4:40001']
    """
    return client.sync(_scale_down, client, n, cluster)
