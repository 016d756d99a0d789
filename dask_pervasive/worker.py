"""The worker half: :class:`ContextWorkerPlugin` owns each worker's context cache."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import weakref
from collections.abc import Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import cloudpickle
from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

from ._protocol import (
    DECLARATION_PREFIX,
    EVENT_TOPIC,
    HEARTBEAT_KEY,
    LOAD_STARTSTOP,
    PLUGIN_NAME,
    Action,
    State,
    WorkerHandler,
)
from ._settings import WorkerSettings, resolve_budget
from .cache import ContextCache, ContextEntry
from .context import Context
from .devices import device_total_memory
from .errors import ContextDefinitionError
from .transfer import ContextServer, peer_fetcher, remove_stale_parts

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

#: Caches of plugins just removed from a running worker, for the plugin replacing them.
_HANDOVER: weakref.WeakKeyDictionary[Worker, ContextCache] = weakref.WeakKeyDictionary()
_CLOSING = (Status.closing, Status.closed, Status.closing_gracefully, Status.failed)

#: Worker task states in which the task's thread may still run (and hold contexts).
_THREAD_STATES = ("executing", "long-running", "cancelled", "resumed")

# Re-exported: imported from here by callers older than _protocol/_settings.
__all__ = [
    "EVENT_TOPIC",
    "PLUGIN_NAME",
    "ContextDeclaration",
    "ContextWorkerPlugin",
    "plugin_on",
    "resolve_budget",
    "worker_heartbeat_metrics",
]


def _check_contexts(contexts: Iterable[Context] | Context) -> list[Context]:
    if isinstance(contexts, Context):
        contexts = [contexts]
    elif isinstance(contexts, (str, bytes)) or not isinstance(contexts, Iterable):
        raise ContextDefinitionError(
            f"expected a list of dask_pervasive.Context objects, got {type(contexts).__name__}: {contexts!r}"
        )
    contexts = list(contexts)
    names: dict[str, Context] = {}
    for c in contexts:
        if not isinstance(c, Context):
            raise ContextDefinitionError(f"expected dask_pervasive.Context objects, got {type(c).__name__}: {c!r}")
        if c.name in names and names[c.name] != c:
            raise ContextDefinitionError(
                f"two different contexts are named {c.name!r}: {names[c.name].describe()} and {c.describe()}; "
                "give them different names",
                c.name,
            )
        try:  # fields may have been changed since the Context was validated
            cloudpickle.dumps(c)
        except Exception as exc:
            raise ContextDefinitionError(
                f"Context {c.name!r} cannot be pickled to send it to workers ({type(exc).__name__}: {exc}); "
                "its load/teardown and storage_options must be picklable",
                c.name,
            ) from exc
        names[c.name] = c
    return list(names.values())


class ContextWorkerPlugin(WorkerPlugin):
    """Keep named contexts resident on every worker, under memory budgets.

    Registered once with ``client.register_plugin`` (or
    :func:`dask_pervasive.install`), it is applied to every current and
    future worker. Tasks get contexts with :func:`dask_pervasive.get_context`.

    Parameters
    ----------
    contexts
        The contexts to declare; more can be added later with
        :func:`dask_pervasive.register`.
    max_bytes
        Host-memory budget for resident contexts: bytes (``"8GiB"``), a
        fraction of the worker's memory limit, or ``"unlimited"``. ``None``
        reads ``pervasive.worker.max-bytes``.
    device_max_bytes
        GPU-memory budget, same forms (a fraction is of the device's total
        memory). ``None`` reads ``pervasive.worker.device-max-bytes``.
    cache_dir
        Where context files are copied. ``None`` reads
        ``pervasive.worker.cache-dir``; when that is unset, a ``pervasive``
        folder in the worker's local directory.

    ``pervasive.worker.retry-failed-after`` and ``pervasive.worker.budget-wait``
    (how long a load waits for contexts in use to make room before failing with
    :class:`~dask_pervasive.BudgetExhaustedError`) are read from the config,
    with ``pervasive.transfer.*``: all of them once, where the plugin is built,
    into ``settings`` (a ``WorkerSettings`` from ``dask_pervasive._settings``)
    that is pickled with the plugin.

    Raises
    ------
    ConfigurationError
        A setting is invalid (raised where the plugin is built: on the client).
    ContextDefinitionError
        ``contexts`` holds something else than Contexts, two different
        contexts with one name, or one that cannot be pickled.

    Examples
    --------
    >>> plugin = ContextWorkerPlugin([llm], max_bytes="8GiB")  # doctest: +SKIP
    >>> client.register_plugin(plugin)  # doctest: +SKIP
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(
        self,
        contexts: Iterable[Context] = (),
        max_bytes: str | float | None = None,
        device_max_bytes: str | float | None = None,
        cache_dir: str | None = None,
    ) -> None:
        self.contexts = _check_contexts(contexts)
        # Read here, on the client, so a client's dask.config.set travels with
        # the plugin (as dask-jobqueue does); fractions are resolved per worker.
        self.settings = WorkerSettings.from_config(
            max_bytes=max_bytes, device_max_bytes=device_max_bytes, cache_dir=cache_dir
        )
        self.cache: ContextCache | None = None
        self.worker: Worker | None = None
        self._device_budgets: dict[str, int | None] = {}

    def setup(self, worker: Worker) -> None:
        self.worker = worker
        settings, transfer = self.settings, self.settings.transfer
        cache_dir = settings.cache_dir or os.path.join(worker.local_directory, "pervasive")
        os.makedirs(cache_dir, exist_ok=True)
        remove_stale_parts(cache_dir)
        memory_limit = worker.memory_manager.memory_limit
        if memory_limit is None:
            from distributed.system import MEMORY_LIMIT

            memory_limit = MEMORY_LIMIT
        budgets = {
            "cache_dir": cache_dir,
            "max_bytes": resolve_budget(settings.max_bytes, memory_limit),
            "device_max_bytes": self._device_budget,
            "retry_failed_after": settings.retry_failed_after,
            "budget_wait": settings.budget_wait,
            "transfer": transfer,
            "on_change": self._publish,
        }
        # A plugin replacing ours (dp.install on workers started with --preload, a second
        # registration) adopts the cache: resident contexts, and the objects running tasks
        # hold, survive; the new budgets and settings apply from now on.
        adopted = _HANDOVER.pop(worker, None)
        if adopted is not None:
            self.cache = adopted
            adopted.reconfigure(**budgets)
        else:
            self.cache = ContextCache(address=worker.address, **budgets)
        # Context files: from peers first (coordinated by the scheduler plugin), else the origin;
        # served to peers, also while this worker is still copying them.
        server = ContextServer(worker, self.cache, transfer)
        server.install()
        self.cache.fetcher = peer_fetcher(worker, transfer, server)
        # Contexts registered (dp.register) before this plugin was set up, or kept
        # across a replacement of this plugin (e.g. dp.install after a --preload).
        declared = [
            *self.contexts,
            *(p.context for p in list(worker.plugins.values()) if isinstance(p, ContextDeclaration)),
        ]
        conflicts = []
        for ctx in declared:
            try:
                self.cache.declare(ctx)
            except ContextDefinitionError as exc:  # the resident definition is kept
                conflicts.append(str(exc))
        worker.metrics[HEARTBEAT_KEY] = worker_heartbeat_metrics
        worker.handlers[WorkerHandler.STATE.value] = self._handle_state
        worker.handlers[WorkerHandler.PREWARM.value] = self._handle_prewarm
        if adopted is not None:
            self.cache.enforce_budgets()  # the new budgets may be smaller: evict idle contexts
        # Budgets and every context (with its declared size): the scheduler plugin keeps a
        # context's tasks off workers too small for it before anything is loaded.
        self.announce()
        if conflicts:
            raise ContextDefinitionError("; ".join(conflicts))

    def _publish_budgets(self) -> None:
        """Tell the scheduler plugin how much room this worker has for contexts."""
        assert self.worker is not None and self.cache is not None
        self.worker.log_event(EVENT_TOPIC, {"action": Action.WORKER_BUDGET.value, **self._budget()})

    def _budget(self) -> dict:
        """Room for contexts, and whether cold loads may copy from peers (else they read the origin)."""
        return {
            "max_bytes": self.cache.max_bytes if self.cache is not None else None,
            "device_max_bytes": self._known_device_budget(),
            "peers": self.settings.transfer.peers,
        }

    def _known_device_budget(self) -> int | None:
        # Only what is known without probing the GPU (probing imports torch).
        known = [b for b in self._device_budgets.values() if b is not None]
        return min(known) if known else None

    def _handle_state(self) -> dict:
        """Budgets and context snapshot, for a scheduler plugin that starts after us.

        Events sent before the scheduler plugin existed were not seen by it, so
        it asks for everything it needs for placement here.
        """
        return {
            **self._budget(),
            "contexts": [
                {**row, "declared_bytes": declared_bytes(self.cache.entries[row["context"]])}
                for row in self.cache.snapshot()
            ]
            if self.cache is not None
            else [],
        }

    def announce(self) -> None:
        """Publish budgets and every context's state again (e.g. after registration)."""
        self._publish_budgets()
        if self.cache is not None:
            for entry in list(self.cache.entries.values()):
                self._publish(entry)

    async def prewarm(self, name: str) -> None:
        """Load ``name`` in a thread: loading can take minutes and must not block the event loop.

        Raises what :meth:`ContextCache.acquire` raises.
        """
        assert self.cache is not None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, functools.partial(self.cache.acquire, name, None, count_hit=False))

    async def _handle_prewarm(self, name: str) -> str:
        """RPC for the scheduler plugin, which warms workers ahead of tasks."""
        assert self.worker is not None
        try:
            await self.prewarm(name)
        except Exception as exc:  # noqa: BLE001 - the cache recorded and published the failure
            logger.warning("pervasive: prewarm of %r on %s failed: %s", name, self.worker.address, exc)
            return State.FAILED.value
        return State.RESIDENT.value

    def _device_budget(self, device: str) -> int | None:
        # Probing the GPU imports torch: only done once a context lands on one.
        if device not in self._device_budgets:
            self._device_budgets[device] = resolve_budget(self.settings.device_max_bytes, device_total_memory(device))
            self._publish_budgets()
        return self._device_budgets[device]

    def teardown(self, worker: Worker) -> None:
        worker.metrics.pop(HEARTBEAT_KEY, None)
        cache, self.cache = self.cache, None
        if cache is None:
            return
        if worker.status in _CLOSING:
            cache.close()
            return
        # Removed from a running worker: distributed tears the old plugin down right before
        # it sets up its replacement (Worker.plugin_add), in the same loop iteration. Hand
        # the cache over; close it only if no replacement took it (a plain unregister).
        cache.on_change = None
        _HANDOVER[worker] = cache

        def close_if_orphaned() -> None:
            if _HANDOVER.get(worker) is cache:
                del _HANDOVER[worker]
                cache.close()

        asyncio.get_running_loop().call_soon(close_if_orphaned)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        # Pins follow the task's thread: a task cancelled while it runs (or loads its
        # context) is reported as executing -> released but stays "cancelled" until its
        # thread returns, and may pin a context after that report. So release whenever
        # the task is, after any transition, no longer running a thread here
        # (memory, error, released, forgotten, rescheduled, ...).
        if self.cache is None or finish in _THREAD_STATES:
            return
        ts = self.worker.state.tasks.get(key) if self.worker is not None else None
        if ts is not None and ts.state in _THREAD_STATES:
            return
        spans = self.cache.load_spans.pop(key, None)
        if spans and start in ("executing", "long-running"):
            self._exclude_load_time(key, spans)
        self.cache.release(key)

    def _exclude_load_time(self, key: Any, spans: list[tuple[float, float]]) -> None:
        """Take time spent in get_context loads out of the task's compute duration.

        Otherwise the scheduler learns that the first task of a prefix took as
        long as a model load, thinks all of them are slow and spreads them
        over cold workers. The load shows up as its own ``LOAD_STARTSTOP``
        action instead. This edits the ``startstops`` list that the pending
        task-finished message holds: plugin transition hooks run after the
        message is built and before it is sent.
        """
        assert self.worker is not None
        ts = self.worker.state.tasks.get(key)
        if ts is None:
            return
        for ss in reversed(ts.startstops):
            if ss.get("action") == "compute":
                inside = sum(max(0.0, min(stop, ss["stop"]) - max(start, ss["start"])) for start, stop in spans)
                ss["start"] = min(ss["stop"], ss["start"] + inside)
                break
        ts.startstops.extend({"action": LOAD_STARTSTOP, "start": a, "stop": b} for a, b in spans)

    def _publish(self, entry: ContextEntry) -> None:
        """Tell the scheduler (and event subscribers) about a state change."""
        if self.worker is None:
            return
        self.worker.log_event(
            EVENT_TOPIC,
            {
                "action": Action.CONTEXT_STATE.value,
                "context": entry.name,
                "state": entry.state.value,
                "files": entry.files_path is not None,
                "host_bytes": entry.host_bytes,
                "device_bytes": entry.device_bytes,
                "loads": entry.counters.loads,
                "load_seconds": entry.counters.load_seconds,
                "last_load_seconds": entry.last_load_seconds,
                "last_fetch_seconds": entry.last_fetch_seconds,
                "last_fetch_origin_bytes": entry.last_fetch_sources.get("origin", 0),
                "last_fetch_peer_bytes": entry.last_fetch_sources.get("peers", 0),
                "declared_bytes": declared_bytes(entry),
            },
        )


class ContextDeclaration(WorkerPlugin):
    """Adds one context to the workers' caches (used by :func:`dask_pervasive.register`).

    A separate plugin per context, named ``pervasive-context-<name>``, so
    adding a context never re-creates the cache (which would drop every
    resident model) and workers that join later receive it too.
    """

    idempotent = False

    def __init__(self, context: Context) -> None:
        (context,) = _check_contexts([context])
        self.context = context
        self.name = f"{DECLARATION_PREFIX}{context.name}"

    def setup(self, worker: Worker) -> None:
        # A plugin set up later finds this one in worker.plugins (see ContextWorkerPlugin.setup).
        plugin = plugin_on(worker)
        if plugin is not None and plugin.cache.declare(self.context):
            plugin._publish(plugin.cache.entries[self.context.name])  # its declared size, for placement


def declared_bytes(entry: ContextEntry) -> tuple[int, int] | None:
    """``(host, device)`` bytes the context declares (``nbytes``), ``None`` when undeclared.

    ``device="auto"`` counts on the device only once this worker resolved it
    to a GPU (resolving imports torch): until then it counts on the host.
    """
    nbytes = entry.context.nbytes
    if nbytes is None:
        return None
    device = entry.device or entry.context.device
    return (0, nbytes) if device.startswith("cuda") else (nbytes, 0)


def plugin_on(worker: Worker) -> ContextWorkerPlugin | None:
    """The worker's :class:`ContextWorkerPlugin`, if installed and set up."""
    plugin = worker.plugins.get(PLUGIN_NAME)
    if isinstance(plugin, ContextWorkerPlugin) and plugin.cache is not None:
        return plugin
    return None


def worker_heartbeat_metrics(worker: Worker) -> dict[str, dict[str, float]]:
    """``{context: counters}`` of one worker, for ``worker.metrics[HEARTBEAT_KEY]``.

    distributed calls every ``worker.metrics`` entry when it builds a
    heartbeat and stores the result in the scheduler's
    ``WorkerState.metrics``, which :mod:`dask_pervasive.metrics` reads.

    Examples
    --------
    >>> worker.metrics[HEARTBEAT_KEY] = worker_heartbeat_metrics  # doctest: +SKIP
    """
    plugin = plugin_on(worker)
    if plugin is None or plugin.cache is None:
        return {}
    return {entry.name: asdict(entry.counters) for entry in list(plugin.cache.entries.values())}
