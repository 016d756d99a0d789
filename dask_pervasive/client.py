"""Client-side helpers: install, register, where, stats, evict, prewarm."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ._protocol import METADATA_CONTEXTS, METADATA_DEFINITIONS, PLUGIN_NAME, State, warm_map_entry
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
    plugin_on,
)

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client

_METADATA = METADATA_CONTEXTS
#: ``{name: Context.describe()}``, to name both sides of a conflicting redefinition.
_DEFINITIONS = METADATA_DEFINITIONS


# -- functions run on workers with client.run ---------------------------------
def _snapshot_on_worker(dask_worker) -> list[dict]:
    plugin = plugin_on(dask_worker)
    return plugin.cache.snapshot() if plugin is not None else []


def _tokens_on_worker(dask_worker) -> dict[str, str]:
    plugin = plugin_on(dask_worker)
    if plugin is None:
        return {}
    return {n: e.context.token for n, e in plugin.cache.entries.items()}


def _describe_on_worker(name: str, dask_worker) -> str | None:
    plugin = plugin_on(dask_worker)
    entry = plugin.cache.entries.get(name) if plugin is not None else None
    return entry.context.describe() if entry is not None else None


def _evict_on_worker(name: str, dask_worker) -> str:
    plugin = plugin_on(dask_worker)
    if plugin is None or name not in plugin.cache.entries:
        return "unknown"
    try:
        return "evicted" if plugin.cache.evict(name) else "not-resident"
    except RuntimeError:
        return "in-use"


async def _prewarm_on_worker(name: str, dask_worker) -> str:
    plugin = plugin_on(dask_worker)
    if plugin is None:
        raise PluginNotInstalledError(
            f"ContextWorkerPlugin is not installed on worker {dask_worker.address}: "
            "call dask_pervasive.install(client, contexts) first"
        )
    await plugin.prewarm(name)
    return dask_worker.address


def _has_plugin_on_worker(dask_worker) -> bool:
    return plugin_on(dask_worker) is not None


def _worker_plugin_names(dask_scheduler) -> list[str]:
    return list(dask_scheduler.worker_plugins)


def _warm_map_on_scheduler(dask_scheduler) -> dict | None:
    plugin = dask_scheduler.plugins.get(PLUGIN_NAME)
    return plugin.where() if plugin is not None and hasattr(plugin, "where") else None


# -- registration ---------------------------------------------------------------
# Every public helper is ``client.sync(_impl, ...)``: it blocks with a normal
# client and returns an awaitable with an asynchronous one, like Client methods.
async def _declared(client: Client) -> dict[str, str]:
    """``{name: token}`` of contexts declared on the cluster."""
    known = dict(await client.get_metadata(list(_METADATA), default={}) or {})
    for tokens in (await client.run(_tokens_on_worker)).values():
        for name, token in tokens.items():
            known.setdefault(name, token)
    return known


async def _existing_definition(client: Client, name: str) -> str:
    described = await client.get_metadata([*_DEFINITIONS, name], default=None)
    if described is None:
        found = [d for d in (await client.run(_describe_on_worker, name)).values() if d]
        described = found[0] if found else "a definition the workers hold"
    return described


async def _register(client: Client, context: Context) -> bool:
    if not isinstance(context, Context):
        raise ContextDefinitionError(
            f"dask_pervasive.register() takes one dask_pervasive.Context, got {type(context).__name__}: {context!r}"
        )
    (context,) = _check_contexts([context])
    known = await _declared(client)
    if context.name in known:
        if known[context.name] != context.token:
            existing = await _existing_definition(client, context.name)
            raise ContextDefinitionError(
                f"A different context named {context.name!r} is already declared on this cluster: "
                f"{existing}; you are declaring {context.describe()}. Pick another name "
                "(a declared context cannot be redefined while workers may hold it)",
                context.name,
            )
        declaration = ContextDeclaration(context).name
        if declaration in await client.run_on_scheduler(_worker_plugin_names):
            return False
    await client.register_plugin(ContextDeclaration(context))
    await client.set_metadata([*_METADATA, context.name], context.token)
    await client.set_metadata([*_DEFINITIONS, context.name], context.describe())
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
    for snap in (await client.run(_snapshot_on_worker, workers=workers)).values():
        rows.extend(snap)
    return rows


async def _known_names(client: Client, rows: list[dict]) -> set[str]:
    names = {r["context"] for r in rows}
    names.update(await client.get_metadata(list(_METADATA), default={}) or {})
    return names


async def _where(client: Client) -> dict[str, dict[str, list[str]]]:
    declared = await client.get_metadata(list(_METADATA), default={}) or {}
    warm_map = await client.run_on_scheduler(_warm_map_on_scheduler)
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
        if not any((await client.run(_has_plugin_on_worker)).values()):
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
    info = await client.scheduler.identity(n_workers=-1)
    unknown = [w for w in workers if w not in info["workers"]]
    if unknown:
        raise ContextUsageError(f"unknown worker address(es) {unknown!r}; the cluster has {sorted(info['workers'])!r}")
    return workers


async def _evict(client: Client, name: str, workers: Iterable[str] | None) -> dict[str, str]:
    await _require_known(client, name, await _snapshots(client))
    workers = await _check_workers(client, workers)
    return await client.run(_evict_on_worker, name, workers=workers)


def evict(client: Client, name: str, workers: Iterable[str] | None = None) -> dict[str, str]:
    """Evict context ``name`` (on ``workers``, default all) where no task uses it.

    Returns
    -------
    ``{worker: "evicted" | "not-resident" | "in-use" | "unknown"}``
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
        info = await client.scheduler.identity(n_workers=-1)
        cold = sorted(w for w in info["workers"] if w not in resident)
        files = {r["worker"] for r in mine if r["files"]}
        cold.sort(key=lambda w: w not in files)  # files-warm workers load without fetching
        want = len(cold) if n_workers is None else max(0, n_workers - len(resident))
        targets = cold[:want]
    if not targets:
        return resident if workers is None else []

    async def warm_one(w: str) -> str:
        await client.run(_prewarm_on_worker, name, workers=[w])
        return w

    errors: list[BaseException] = []
    warm: set[str] = set(resident) if workers is None else set()
    with _progress_bar(progress, total=len(targets), desc=f"prewarm {name}", unit="worker") as bar:
        for fut in asyncio.as_completed([warm_one(w) for w in targets]):
            try:
                warm.add(await fut)
            except Exception as exc:  # noqa: BLE001 - reported once every worker has finished
                errors.append(exc)
            bar.update()
    if errors:
        first = errors[0]
        if isinstance(first, PervasiveError):
            raise first
        raise ContextLoadError(name, "?", None, first) from first
    return sorted(warm)


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
    The workers on which the context is resident afterwards (of those asked).

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
