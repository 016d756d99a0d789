"""The worker half: :class:`ContextWorkerPlugin` owns each worker's context cache."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import cloudpickle
import dask.config
from dask.utils import parse_bytes, parse_timedelta
from distributed.diagnostics.plugin import WorkerPlugin

from ._settings import TransferSettings
from .cache import ContextCache, ContextEntry
from .context import Context
from .devices import device_total_memory
from .errors import ConfigurationError, ContextDefinitionError
from .metrics import HEARTBEAT_KEY, worker_heartbeat_metrics
from .transfer import ContextServer, peer_fetcher, remove_stale_parts

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

PLUGIN_NAME = "pervasive"
#: Topic of the events workers log when a context changes state.
EVENT_TOPIC = "pervasive"
_PENDING_ATTR = "_pervasive_pending_contexts"


_UNLIMITED = ("", "none", "null", "unlimited")


def resolve_budget(value: Any, total: int | None) -> int | None:
    """Turn a budget setting into bytes.

    ``None``/``"none"``/``"unlimited"`` → no limit; a float in (0, 1] → that
    fraction of ``total`` (no limit when ``total`` is unknown); ``"8GiB"``, a
    positive int or a whole float (``8e9``) → bytes. A numeric string is read
    as the number.

    Raises
    ------
    ConfigurationError
        Anything else: negative or zero sizes, fractions above 1 that are not
        whole byte counts (``1.5``), ``nan``/``inf``, booleans, other types.
    """
    try:
        return _resolve_budget(value, total)
    except ConfigurationError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigurationError(f"invalid memory budget {value!r}: {exc}") from exc


def _resolve_budget(value: Any, total: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _UNLIMITED:
            return None
        try:
            value = float(text)  # "0.5", "8e9": a number given as text (environment variables)
        except ValueError:
            nbytes = parse_bytes(text)
            if nbytes <= 0:
                raise ConfigurationError(f"invalid memory budget {value!r}: must be positive") from None
            return int(nbytes)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"invalid memory budget {value!r}: expected bytes, a fraction or None")
    if isinstance(value, float):
        if not math.isfinite(value) or value <= 0:
            raise ConfigurationError(f"invalid memory budget {value!r}: must be a positive finite number")
        if value <= 1:
            return int(value * total) if total else None
        if not value.is_integer():
            raise ConfigurationError(
                f"invalid memory budget {value!r}: a fraction must be in (0, 1]; give bytes as a whole number"
            )
        return int(value)
    if value <= 0:
        raise ConfigurationError(f"invalid memory budget {value!r}: must be positive")
    return int(value)


def _check_budget_setting(value: Any, what: str) -> Any:
    try:
        resolve_budget(value, 1)
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"{what} must be bytes ('8GiB' or a positive int), a fraction in (0, 1] or None/'unlimited', got {value!r}",
            what,
        ) from exc
    return value


def _seconds_setting(value: Any, key: str) -> float:
    """A duration setting (``"30s"``, ``2``) in seconds, ≥ 0."""
    try:
        if isinstance(value, bool):
            raise TypeError("a bool is not a duration")
        seconds = parse_timedelta(value)
        if seconds is None or not math.isfinite(seconds) or seconds < 0:
            raise ValueError("must be a non-negative duration")
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise ConfigurationError(
            f"{key} must be a duration such as '30s' or a number of seconds, got {value!r} ({exc})", key
        ) from exc
    return float(seconds)


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
    :class:`~dask_pervasive.BudgetExhaustedError`) are read from the config.

    Raises
    ------
    ConfigurationError
        A budget or duration setting is invalid (raised on the client).
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
        # Settings are read here, on the client, so a client's dask.config.set
        # travels with the plugin (as dask-jobqueue does); fractions are
        # resolved on each worker in setup().
        self.max_bytes = _check_budget_setting(
            dask.config.get("pervasive.worker.max-bytes") if max_bytes is None else max_bytes, "max_bytes"
        )
        self.device_max_bytes = _check_budget_setting(
            dask.config.get("pervasive.worker.device-max-bytes") if device_max_bytes is None else device_max_bytes,
            "device_max_bytes",
        )
        self.cache_dir = cache_dir if cache_dir is not None else dask.config.get("pervasive.worker.cache-dir")
        self.retry_failed_after = _seconds_setting(
            dask.config.get("pervasive.worker.retry-failed-after"), "pervasive.worker.retry-failed-after"
        )
        self.budget_wait = _seconds_setting(
            dask.config.get("pervasive.worker.budget-wait", 60.0), "pervasive.worker.budget-wait"
        )
        # file copy settings (origin retries and timeouts too) travel with the plugin
        self.transfer_settings = TransferSettings.from_config()
        self.cache: ContextCache | None = None
        self.worker: Worker | None = None
        self._device_budgets: dict[str, int | None] = {}

    def setup(self, worker: Worker) -> None:
        self.worker = worker
        cache_dir = self.cache_dir or os.path.join(worker.local_directory, "pervasive")
        os.makedirs(cache_dir, exist_ok=True)
        remove_stale_parts(cache_dir)
        memory_limit = worker.memory_manager.memory_limit
        if memory_limit is None:
            from distributed.system import MEMORY_LIMIT

            memory_limit = MEMORY_LIMIT
        self.cache = ContextCache(
            address=worker.address,
            cache_dir=cache_dir,
            max_bytes=resolve_budget(self.max_bytes, memory_limit),
            device_max_bytes=self._device_budget,
            retry_failed_after=self.retry_failed_after,
            budget_wait=self.budget_wait,
            chunk_size=self.transfer_settings.chunk_size,
            verify=self.transfer_settings.verify,
            on_change=self._publish,
        )
        # Context files: from peers first (coordinated by the scheduler plugin), else the origin;
        # served to peers, also while this worker is still copying them.
        server = ContextServer(worker, self.cache, self.transfer_settings)
        server.install()
        self.cache.fetcher = peer_fetcher(worker, self.transfer_settings, server)
        for ctx in self.contexts:
            self.cache.declare(ctx)
        # Contexts registered (dp.register) before this plugin reached the worker.
        for ctx in getattr(worker, _PENDING_ATTR, {}).values():
            self.cache.declare(ctx)
        worker.__dict__.pop(_PENDING_ATTR, None)
        # Declarations survive a replacement of this plugin (e.g. dp.install after a --preload).
        for other in list(worker.plugins.values()):
            if isinstance(other, ContextDeclaration):
                self.cache.declare(other.context)
        worker.metrics[HEARTBEAT_KEY] = worker_heartbeat_metrics
        worker.handlers["pervasive_state"] = self._handle_state
        worker.handlers["pervasive_prewarm"] = self._handle_prewarm
        self._publish_budgets()

    def _publish_budgets(self) -> None:
        """Tell the scheduler plugin how much room this worker has for contexts."""
        assert self.worker is not None and self.cache is not None
        self.worker.log_event(
            EVENT_TOPIC,
            {
                "action": "worker-budget",
                "max_bytes": self.cache.max_bytes,
                "device_max_bytes": self._known_device_budget(),
            },
        )

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
            "max_bytes": self.cache.max_bytes if self.cache is not None else None,
            "device_max_bytes": self._known_device_budget(),
            "contexts": self.cache.snapshot() if self.cache is not None else [],
        }

    def announce(self) -> None:
        """Publish budgets and every context's state again (e.g. after registration)."""
        self._publish_budgets()
        if self.cache is not None:
            for entry in list(self.cache.entries.values()):
                self._publish(entry)

    async def _handle_prewarm(self, name: str) -> str:
        """Load ``name`` in a thread (the scheduler plugin warms workers ahead of tasks)."""
        assert self.cache is not None and self.worker is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, functools.partial(self.cache.acquire, name, None, count_hit=False))
        except Exception as exc:  # noqa: BLE001 - the cache recorded and published the failure
            logger.warning("pervasive: prewarm of %r on %s failed: %s", name, self.worker.address, exc)
            return "failed"
        return "resident"

    def _device_budget(self, device: str) -> int | None:
        # Probing the GPU imports torch: only done once a context lands on one.
        if device not in self._device_budgets:
            self._device_budgets[device] = resolve_budget(self.device_max_bytes, device_total_memory(device))
            self._publish_budgets()
        return self._device_budgets[device]

    def teardown(self, worker: Worker) -> None:
        worker.metrics.pop(HEARTBEAT_KEY, None)
        if self.cache is not None:
            self.cache.close()

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        # A task that leaves the executing state releases the contexts it held.
        running = ("executing", "long-running")
        if start in running and finish not in running and self.cache is not None:
            spans = self.cache.load_spans.pop(key, None)
            if spans:
                self._exclude_load_time(key, spans)
            self.cache.release(key)

    def _exclude_load_time(self, key: Any, spans: list[tuple[float, float]]) -> None:
        """Take time spent in get_context loads out of the task's compute duration.

        Otherwise the scheduler learns that the first task of a prefix took as
        long as a model load, thinks all of them are slow and spreads them
        over cold workers. The load shows up as its own ``pervasive-load``
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
        ts.startstops.extend({"action": "pervasive-load", "start": a, "stop": b} for a, b in spans)

    def _publish(self, entry: ContextEntry) -> None:
        """Tell the scheduler (and event subscribers) about a state change."""
        if self.worker is None:
            return
        self.worker.log_event(
            EVENT_TOPIC,
            {
                "action": "context-state",
                "context": entry.name,
                "state": entry.state.value,
                "files": entry.files_path is not None,
                "host_bytes": entry.host_bytes,
                "device_bytes": entry.device_bytes,
                "loads": entry.counters.loads,
                "load_seconds": entry.counters.load_seconds,
                "last_load_seconds": entry.last_load_seconds,
                "last_fetch_seconds": entry.last_fetch_seconds,
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
        self.name = f"{PLUGIN_NAME}-context-{context.name}"

    def setup(self, worker: Worker) -> None:
        plugin = worker.plugins.get(PLUGIN_NAME)
        if isinstance(plugin, ContextWorkerPlugin) and plugin.cache is not None:
            plugin.cache.declare(self.context)
        else:
            pending = worker.__dict__.setdefault(_PENDING_ATTR, {})
            pending[self.context.name] = self.context


def plugin_on(worker: Worker) -> ContextWorkerPlugin | None:
    """The worker's :class:`ContextWorkerPlugin`, if installed and set up."""
    plugin = worker.plugins.get(PLUGIN_NAME)
    if isinstance(plugin, ContextWorkerPlugin) and plugin.cache is not None:
        return plugin
    return None
