"""Per-worker cache of materialized contexts: states, budgets, LRU eviction.

States of one context on one worker::

    absent → fetching → loading → resident → evicted
                 ↘          ↘
                   failed ←──┘        (evicted/failed → fetching on next use)

Exactly one thread fetches and loads a context; every other thread asking
for it meanwhile waits on the same condition and gets the same object.

Memory: a context is only accounted once room for it is made under the
budgets. Idle contexts are evicted (least recently used first); when the
room is held by contexts in use (pinned by running tasks, or being loaded),
the loading thread waits up to ``budget_wait`` seconds for them to be
released, then fails with :class:`~dask_pervasive.errors.BudgetExhaustedError`
and the context goes back to its previous state (not ``failed``). Resident
contexts therefore never exceed a budget; with ``nbytes`` undeclared the size
is known only after ``load``, so while such a load waits for room its object
is held outside the budget (at most its own size, for at most
``budget_wait``). A CUDA out-of-memory error during ``load`` evicts the idle
contexts on that device and retries the load once.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from dask.utils import format_bytes

from . import devices
from ._budget import BudgetAccounting
from ._protocol import State
from ._settings import TransferSettings
from .context import Context
from .devices import (
    is_device_oom,
    measure_nbytes,
    release_device_memory,
    resolve_device,
)
from .errors import (
    BudgetExhaustedError,
    ContextDefinitionError,
    ContextLoadError,
    ContextTooLargeError,
    UnknownContextError,
)
from .transfer import FetchResult, fetch_source

logger = logging.getLogger(__name__)


@dataclass
class ContextCounters:
    """Counters reported by :func:`dask_pervasive.stats`."""

    loads: int = 0
    hits: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    fetch_seconds: float = 0.0
    bytes_from_peers: int = 0
    bytes_from_origin: int = 0
    failures: int = 0


@dataclass
class ContextEntry:
    """The state of one declared context on this worker."""

    context: Context
    state: State = State.ABSENT
    value: Any = None
    device: str | None = None
    host_bytes: int = 0
    device_bytes: int = 0
    users: int = 0  #: running tasks holding the context; never evicted while > 0
    last_used: float = 0.0
    files_path: str | None = None
    error: BaseException | None = None
    failed_at: float = 0.0
    released: Any = None  #: evicted object awaiting teardown outside the lock
    last_load_seconds: float = 0.0  #: fetch + load time of the latest load
    last_fetch_seconds: float = 0.0  #: the fetch part of it
    last_fetch_sources: dict = field(default_factory=dict)  #: bytes it copied per kind of source
    attempt: int = 0  #: number of loads started; waiters compare it to see their load's outcome
    counters: ContextCounters = field(default_factory=ContextCounters)

    @property
    def name(self) -> str:
        return self.context.name


class ContextCache(BudgetAccounting):
    """Materialized contexts of one worker, kept under memory budgets.

    Parameters
    ----------
    address
        The worker's address, for error messages and reports.
    cache_dir
        Directory for context files (one sub-directory per context).
    max_bytes, device_max_bytes
        Host and GPU budgets in bytes (``None``: unlimited). A callable is
        evaluated on first use, so probing the GPU does not import torch at
        worker start-up.
    retry_failed_after
        Seconds during which a failed context re-raises its error instead of
        loading again.
    budget_wait
        Seconds a load waits for contexts in use to be released when they
        leave no room for it under a budget, before it fails with
        :class:`~dask_pervasive.errors.BudgetExhaustedError`.
    transfer
        File copy settings (``pervasive.transfer.*``) for the default fetcher
        and for verifying cached copies; the packaged defaults when ``None``.
    on_change
        ``on_change(entry)`` after every state change (used to tell the
        scheduler); called without the lock held.
    fetcher
        ``fetcher(context, dest) -> FetchResult`` makes ``dest`` a complete
        copy of the context's files (called from the loading thread). The
        worker plugin passes one that copies from peers first
        (:mod:`dask_pervasive.transfer`); the default reads the origin.
    """

    def __init__(
        self,
        address: str,
        cache_dir: str,
        max_bytes: int | None = None,
        device_max_bytes: int | None | Callable[[str], int | None] = None,
        retry_failed_after: float = 30.0,
        budget_wait: float = 60.0,
        transfer: TransferSettings | None = None,
        on_change: Callable[[ContextEntry], None] | None = None,
        fetcher: Callable[[Context, str], FetchResult] | None = None,
    ) -> None:
        self.address = address
        self.cache_dir = cache_dir
        self.max_bytes = max_bytes
        self._device_max_bytes = device_max_bytes
        self.retry_failed_after = retry_failed_after
        self.budget_wait = budget_wait
        self.transfer = transfer if transfer is not None else TransferSettings()
        self.on_change = on_change
        self.fetcher = fetcher or self._fetch_from_origin
        self.entries: dict[str, ContextEntry] = {}
        self._holders: dict[Any, list[str]] = {}  # task key -> contexts it holds
        #: task key -> wall-clock (start, stop) spans spent waiting for/doing loads,
        #: so the worker plugin can take them out of the task's compute duration.
        self.load_spans: dict[Any, list[tuple[float, float]]] = {}
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)

    def reconfigure(self, **settings: Any) -> None:
        """Apply new settings (a replacing worker plugin's): any ``__init__`` argument but ``address``.

        Resident contexts are kept; call :meth:`enforce_budgets` afterwards.
        """
        with self._lock:
            for name, value in settings.items():
                if name == "device_max_bytes":
                    self._device_max_bytes = value
                elif name in ("cache_dir", "max_bytes", "retry_failed_after", "budget_wait", "transfer", "on_change"):
                    setattr(self, name, value)
                else:
                    raise TypeError(f"unknown cache setting {name!r}")
            self._cond.notify_all()  # waits for room re-check under the new budgets

    def enforce_budgets(self) -> None:
        """Evict idle contexts (least recently used first) while a budget is exceeded."""
        with self._lock:
            victims = self._make_room_locked()
        self._teardown(victims)

    # -- declarations -----------------------------------------------------
    def declare(self, context: Context) -> bool:
        """Add a context; ``True`` if new. Redefining a name differently is an error."""
        with self._lock:
            old = self.entries.get(context.name)
            if old is not None:
                if old.context.token != context.token:
                    raise ContextDefinitionError(
                        f"Context {context.name!r} is already declared on worker "
                        f"{self.address} with a different definition: {old.context.describe()}; "
                        f"new definition: {context.describe()}; pick another name",
                        context.name,
                    )
                return False
            self.entries[context.name] = ContextEntry(context)
        return True

    def _entry(self, name: str) -> ContextEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise UnknownContextError(name, self.entries, self.address) from None

    def files_dir(self, context: Context) -> str:
        """Where the files of ``context`` are (or will be) copied on this worker."""
        return os.path.join(self.cache_dir, context.name, context.token)

    def _fetch_from_origin(self, context: Context, dest: str) -> FetchResult:
        return fetch_source(context.source, context.storage_options, dest, self.transfer)

    def _evict_locked(self, entry: ContextEntry) -> None:
        entry.released, entry.value = entry.value, None
        entry.state = State.EVICTED
        entry.host_bytes = entry.device_bytes = 0
        entry.counters.evictions += 1
        self._cond.notify_all()  # loads waiting for room

    def _teardown(self, victims: Iterable[ContextEntry]) -> None:
        """Run teardown, ``gc`` and ``torch.cuda.empty_cache()`` outside the lock."""
        victims = list(victims)
        for entry in victims:
            value, entry.released = entry.released, None
            if value is not None and entry.context.teardown is not None:
                try:
                    entry.context.teardown(value)
                except Exception:
                    logger.exception("teardown of context %r failed", entry.name)
            del value
            logger.info("Evicted context %r on %s", entry.name, self.address)
        if victims:
            gc.collect()
            release_device_memory()
            for entry in victims:
                self._changed(entry)

    def _changed(self, entry: ContextEntry) -> None:
        if self.on_change is not None:
            try:
                self.on_change(entry)
            except Exception:
                logger.exception("pervasive: could not publish state of %r", entry.name)

    # -- use ----------------------------------------------------------------
    def acquire(self, name: str, key: Any = None, count_hit: bool = True) -> Any:
        """Return the resident object for ``name``, loading it if needed.

        With ``key`` (the running task), the context is pinned until
        :meth:`release` is called for that key.
        """
        started = time.time()
        with self._lock:
            entry = self._entry(name)
            while True:
                if entry.state is State.RESIDENT:
                    if count_hit:
                        entry.counters.hits += 1
                    self._pin_locked(entry, key)
                    if time.time() - started > 0.001:  # we waited for another thread's load
                        self._record_span(key, started)
                    return entry.value
                if entry.state in (State.FETCHING, State.LOADING):
                    waited_for = entry.attempt
                    self._cond.wait()
                    if (
                        entry.attempt == waited_for
                        and entry.state not in (State.FETCHING, State.LOADING, State.RESIDENT)
                        and entry.error is not None
                    ):  # the load we waited for failed: same error, no second attempt from us
                        raise self._load_error(entry, entry.error)
                    continue
                if entry.state is State.FAILED and time.monotonic() - entry.failed_at < self.retry_failed_after:
                    raise self._load_error(entry, entry.error)
                break
            previous = entry.state if entry.state is not State.FAILED else State.ABSENT
            entry.state = State.FETCHING if entry.context.source else State.LOADING
            entry.error = None
            entry.attempt += 1
        self._changed(entry)
        try:
            # Inside the try: preparing a load (resolving the device imports torch, which
            # can raise OSError on a broken CUDA runtime) must end in `failed` like the load.
            entry.device = resolve_device(entry.context.device)
            value = self._materialize(entry, key)
        except BaseException as exc:
            self._record_span(key, started)
            # The traceback's frames (the loader's, ours) may hold the half-built or
            # refused object (GPU tensors): drop their locals before keeping the error.
            traceback.clear_frames(exc.__traceback__)
            transient = isinstance(exc, BudgetExhaustedError)
            with self._lock:
                entry.state = previous if transient else State.FAILED
                entry.value = None
                entry.host_bytes = entry.device_bytes = 0
                entry.error = exc
                if not transient:
                    entry.failed_at = time.monotonic()
                    entry.counters.failures += 1
                self._cond.notify_all()
            self._changed(entry)
            if isinstance(exc, (ContextTooLargeError, BudgetExhaustedError)):
                raise
            raise self._load_error(entry, exc) from exc
        with self._lock:
            entry.value = value
            entry.state = State.RESIDENT
            entry.counters.loads += 1
            self._pin_locked(entry, key)
            self._record_span(key, started)
            victims = self._make_room_locked()
            self._cond.notify_all()
        self._teardown(victims)
        self._changed(entry)
        return value

    def _record_span(self, key: Any, started: float) -> None:
        if key is not None:
            self.load_spans.setdefault(key, []).append((started, time.time()))

    def _load_error(self, entry: ContextEntry, exc: BaseException | None) -> BaseException:
        if isinstance(exc, (ContextTooLargeError, BudgetExhaustedError)):
            return exc
        return ContextLoadError(entry.name, self.address, entry.context.source, exc)

    def _pin_locked(self, entry: ContextEntry, key: Any) -> None:
        entry.last_used = time.monotonic()
        if key is not None:
            entry.users += 1
            self._holders.setdefault(key, []).append(entry.name)

    def release(self, key: Any) -> None:
        """Unpin every context held by task ``key`` and enforce the budgets."""
        with self._lock:
            self.load_spans.pop(key, None)
            names = self._holders.pop(key, None)
            if not names:
                return
            for n in names:
                e = self.entries.get(n)
                if e is not None and e.users:
                    e.users -= 1
            victims = self._make_room_locked()
            self._cond.notify_all()  # loads waiting for room may proceed now
        self._teardown(victims)

    def _materialize(self, entry: ContextEntry, key: Any = None) -> Any:
        ctx = entry.context
        counters = entry.counters
        start = time.perf_counter()
        declared = ctx.nbytes
        on_device = entry.device.startswith("cuda")
        if declared is not None:
            host, dev = (0, declared) if on_device else (declared, 0)
            with self._lock:
                self._check_fits(entry, host, dev)
        devices.check_device_available(entry.device, entry.name)
        if declared is not None:
            self._reserve(entry, host, dev, key)
        path = None
        if ctx.source is not None:
            result = self.fetcher(ctx, self.files_dir(ctx))
            counters.bytes_from_origin += result.sources.get("origin", 0)
            counters.bytes_from_peers += result.sources.get("peers", 0)
            counters.fetch_seconds += result.seconds
            entry.last_fetch_seconds = result.seconds
            entry.last_fetch_sources = {} if result.cached else dict(result.sources)
            path = entry.files_path = result.path
            with self._lock:
                entry.state = State.LOADING
            self._changed(entry)
        value = self._load(entry, path)
        if declared is None:
            host, dev = measure_nbytes(value)
            try:
                self._check_fits(entry, host, dev)
                self._reserve(entry, host, dev, key)
            except (ContextTooLargeError, BudgetExhaustedError):
                entry.released, value = value, None
                self._teardown([entry])
                raise
        entry.last_load_seconds = time.perf_counter() - start
        counters.load_seconds += entry.last_load_seconds
        logger.info(
            "Loaded context %r on %s in %.2fs (%s host, %s device)",
            ctx.name,
            self.address,
            time.perf_counter() - start,
            format_bytes(entry.host_bytes),
            format_bytes(entry.device_bytes),
        )
        return value

    def _load(self, entry: ContextEntry, path: str | None) -> Any:
        """Run ``load``; on a CUDA out-of-memory error free the device and retry once.

        The retry happens only for a context on a CUDA device and only when
        idle contexts on that device could be evicted to make room: otherwise
        nothing changed and it would fail again.
        """
        try:
            return entry.context.load(path, entry.device)
        except BaseException as exc:
            if not is_device_oom(exc):
                raise
            traceback.clear_frames(exc.__traceback__)  # partial tensors of the failed load
            with self._lock:
                victims = [
                    e
                    for e in self.entries.values()
                    if entry.device.startswith("cuda")
                    and e is not entry
                    and e.state is State.RESIDENT
                    and e.users == 0
                    and e.device == entry.device
                ]
                for victim in victims:
                    self._evict_locked(victim)
            self._teardown(victims)  # gc + torch.cuda.empty_cache()
            if not victims:
                gc.collect()
                release_device_memory()
                raise
            logger.warning(
                "pervasive: out of memory on %s loading context %r on %s; evicted idle %s and retrying once",
                entry.device,
                entry.name,
                self.address,
                ", ".join(repr(v.name) for v in victims),
            )
        try:
            return entry.context.load(path, entry.device)
        except BaseException as exc:
            if is_device_oom(exc):
                traceback.clear_frames(exc.__traceback__)
                gc.collect()
                release_device_memory()
            raise

    def evict(self, name: str) -> bool:
        """Evict ``name`` now if no running task holds it; ``True`` if it was resident."""
        with self._lock:
            entry = self._entry(name)
            if entry.state is not State.RESIDENT:
                return False
            if entry.users:
                raise RuntimeError(f"context {name!r} is in use by {entry.users} running task(s)")
            self._evict_locked(entry)
        self._teardown([entry])
        return True

    def close(self) -> None:
        """Evict everything (worker plugin teardown)."""
        with self._lock:
            victims = [e for e in self.entries.values() if e.state is State.RESIDENT]
            for e in victims:
                self._evict_locked(e)
        self._teardown(victims)

    # -- reporting ------------------------------------------------------------
    def snapshot(self) -> list[dict]:
        """One dict per declared context: state, sizes and counters."""
        with self._lock:
            return [
                {
                    "worker": self.address,
                    "context": e.name,
                    "state": e.state.value,
                    "files": e.files_path is not None and os.path.exists(e.files_path),
                    "host_bytes": e.host_bytes,
                    "device_bytes": e.device_bytes,
                    "users": e.users,
                    **asdict(e.counters),
                }
                for e in self.entries.values()
            ]
