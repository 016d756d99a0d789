"""What the scheduler plugin heard from workers and measured, per context and per worker.

The records the placement side plans from: :class:`WorkerContext` (one
context on one worker, from its state events), :class:`WorkerRates` (one
worker's task speed and load factor) and :class:`ContextPlan` (one context:
its affinity set, pending keys and what its loads cost). A load's cost is
kept in parts, because where the files come from changes it by an order of
magnitude: the *setup* (everything after the files are local: deserialize,
move to the device), a fetch from the *origin*, and a copy from a *peer*
that holds a complete copy (see :meth:`ContextPlan.observe_load`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

from ._protocol import State

_EWMA = 0.5


#: Kinds of fetch, by where its bytes came from (:func:`fetch_source`).
ORIGIN, PEER, CACHED = "origin", "peer", "cached"


def fetch_source(origin_bytes: int = 0, peer_bytes: int = 0, holder_at_start: bool = False) -> str | None:
    """What a fetch timed: an origin read (every byte from the origin), a peer copy (every byte
    from peers, a complete copy existing when it started), cached files or no files (no bytes);
    ``None`` for a mixed copy, or one that streamed behind another worker's origin read and so
    waited for that read."""
    if origin_bytes and not peer_bytes:
        return ORIGIN
    if peer_bytes and not origin_bytes:
        return PEER if holder_at_start else None
    if not origin_bytes and not peer_bytes:
        return CACHED
    return None


def ewma(old: float | None, new: float, weight: float = _EWMA) -> float:
    """Exponentially weighted moving average: ``new`` weighs ``weight``."""
    return new if old is None else weight * new + (1 - weight) * old


@dataclass
class WorkerContext:
    """One context on one worker, as the scheduler last heard of it."""

    state: State = State.ABSENT
    files: bool = False
    host_bytes: int = 0
    device_bytes: int = 0
    loads: int = 0
    failed_at: float | None = None
    loading_since: float = 0.0  #: monotonic time the current fetch/load started
    resident_since: float = 0.0  #: monotonic time it last became resident
    load_seconds: float | None = None  #: EWMA of this worker's fetch + load of this context
    #: when the current fetch started, another worker held a complete copy (a peer copy needs no origin read)
    holder_at_start: bool = False


@dataclass
class WorkerRates:
    """What the scheduler measured of one worker, for the planner."""

    speed: float = 1.0  #: EWMA of task seconds relative to the mean of their prefix (2.0: twice slower)
    planned_speed: float = 1.0  #: the speed its current planner view uses (changes past a tolerance)
    tasks: int = 0
    load_factor: float = 1.0  #: EWMA of its load seconds relative to the context's average
    loads: int = 0


@dataclass
class ContextPlan:
    """Placement state of one context."""

    name: str
    members: set[str] = field(default_factory=set)  #: the affinity set
    resident: set[str] = field(default_factory=set)  #: workers that reported it resident (kept by the plugin)
    #: keys of unfinished tasks -> their Dask ``TaskPrefix`` (see :meth:`add_pending`)
    pending: dict = field(default_factory=dict)
    #: prefix -> how many of ``pending`` have it: the task time is one lookup per prefix, not per task
    pending_prefixes: dict = field(default_factory=dict)
    load_seconds: float | None = None  #: EWMA of fetch + load, every load
    fetch_seconds: float | None = None  #: EWMA of the fetch part, every load
    setup_seconds: float | None = None  #: EWMA of the part after the fetch
    origin_fetch_seconds: float | None = None  #: EWMA of fetches that read only the origin
    peer_fetch_seconds: float | None = None  #: EWMA of copies from peers holding a complete copy
    size: tuple[int, int] | None = None  #: (host, device) bytes, once measured
    demand_since: float | None = None  #: monotonic time its backlog began (a task arrived with none and no set)
    #: the ``size`` its members were last checked against their budgets at (None: check at the next plan)
    fit_checked: tuple[int, int] | None = None
    warm_placements: int = 0  #: workers added to the set that already held the context
    cold_placements: int = 0  #: workers added that had to load it
    drained_at: float | None = None  #: monotonic time its backlog last drained (its set is kept a while)
    timed: bool = False  #: one of its tasks finished: Dask knows a duration (re-plan then: sets may grow)
    last_used: float = -math.inf  #: monotonic time of its last task submitted or finished, or load

    def add_pending(self, key: Hashable, prefix: Hashable) -> None:
        """``key`` (of Dask task prefix ``prefix``) is unfinished; a key already pending is counted once."""
        if key in self.pending:
            return
        if not self.pending and not self.members:
            self.demand_since = time.monotonic()  # a new backlog (see PlannerSettings.settle_seconds)
        self.pending[key] = prefix
        self.pending_prefixes[prefix] = self.pending_prefixes.get(prefix, 0) + 1

    def discard_pending(self, key: Hashable) -> None:
        """``key`` finished, erred or was forgotten (nothing if it was not pending)."""
        if key not in self.pending:
            return
        prefix = self.pending.pop(key)
        left = self.pending_prefixes[prefix] - 1
        if left:
            self.pending_prefixes[prefix] = left
        else:
            del self.pending_prefixes[prefix]

    def observe_load(self, seconds: float, fetch_seconds: float = 0.0, source: str | None = CACHED) -> None:
        """One load took ``seconds``, of which ``fetch_seconds`` getting the files from ``source``
        (see :func:`fetch_source`: a mixed or streamed copy, ``None``, times neither source)."""
        fetch_seconds = min(max(fetch_seconds, 0.0), seconds)
        self.load_seconds = ewma(self.load_seconds, seconds)
        self.fetch_seconds = ewma(self.fetch_seconds, fetch_seconds)
        self.setup_seconds = ewma(self.setup_seconds, seconds - fetch_seconds)
        if source == ORIGIN:
            self.origin_fetch_seconds = ewma(self.origin_fetch_seconds, fetch_seconds)
        elif source == PEER:
            self.peer_fetch_seconds = ewma(self.peer_fetch_seconds, fetch_seconds)

    def expected_load_seconds(self, source: str | None = CACHED) -> float | None:
        """What a load fetching from ``source`` took so far (``None``: none timed yet)."""
        if source == ORIGIN:
            return self.origin_load_seconds()
        if source == PEER and self.peer_fetch_seconds is not None:
            return self.peer_load_seconds(None)
        if source == CACHED and self.setup_seconds is not None:
            return self.setup_seconds  # files cached, or a context without files
        return self.load_seconds

    def origin_load_seconds(self) -> float | None:
        """A cold load that reads the origin: setup plus origin fetch, else the average of all loads."""
        if self.setup_seconds is not None and self.origin_fetch_seconds is not None:
            return self.setup_seconds + self.origin_fetch_seconds
        return self.load_seconds

    def peer_load_seconds(self, prior_fetch: float | None) -> float | None:
        """A cold load that copies from a peer: setup plus the peer copy (``prior_fetch`` until one is timed).

        ``None`` until a load has been timed (nothing to add the copy to).
        """
        fetch = self.peer_fetch_seconds if self.peer_fetch_seconds is not None else prior_fetch
        if self.setup_seconds is None or fetch is None:
            return None
        return self.setup_seconds + fetch
