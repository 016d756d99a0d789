"""What the joint planner reasons over: its inputs, its outputs, and its per-plan state.

The inputs (:class:`Holding`, :class:`WorkerView`, :class:`ContextView`,
:class:`QueuedWork`, :class:`PlannerSettings`) are frozen views the scheduler
plugin builds from its warm map and task queues; the outputs
(:class:`Addition`, :class:`ContextDecision`, :class:`PlanResult`) are what
:class:`~dask_pervasive._planner.Planner` decides.
``_Worker`` and ``_Context`` are the planner's working state during one plan
(a worker's timeline and budget, a context's water-filled finish time). See
:mod:`dask_pervasive._planner` for the algorithm and its cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._protocol import State

if TYPE_CHECKING:
    from ._settings import SchedulerSettings

_EPS = 1e-3  #: seconds: smaller gains are noise
_RESIDENT = State.RESIDENT.value
_WARMING = frozenset({State.FETCHING.value, State.LOADING.value})
_HOLDING = _WARMING | {_RESIDENT}


# -- inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Holding:
    """One context on one worker, as the planner needs it (omit contexts a worker never had)."""

    state: str = State.ABSENT.value  #: a :class:`~dask_pervasive._protocol.State` value
    files: bool = False  #: the context's files are in the worker's local cache
    #: when the running fetch/load started (``fetching``/``loading``), on the clock of the plan's ``now``;
    #: None: just now. A time, not an age: the view of a loading worker stays valid from plan to plan.
    loading_since: float | None = None
    load_seconds: float | None = None  #: this worker's measured fetch + load (EWMA), None if never loaded
    host_bytes: int | None = None  #: bytes held when resident (else the context's size is used)
    device_bytes: int | None = None
    failed_recently: bool = False  #: failed within ``retry-failed-after``: not a candidate


@dataclass(frozen=True)
class WorkerView:
    """One running worker: what changes when it reports (its queues are in :class:`QueuedWork`)."""

    address: str
    nthreads: int = 1
    speed: float = 1.0  #: task seconds relative to the median worker (2.0: twice slower)
    load_factor: float = 1.0  #: load seconds relative to the context's estimate, for contexts it never loaded
    host_budget: int | None = None  #: ``max_bytes`` (None: unlimited)
    device_budget: int | None = None  #: ``device_max_bytes`` (None: unlimited)
    peers: bool = True  #: its cold loads may copy from peers (``pervasive.transfer.peers``)
    contexts: Mapping[str, Holding] = field(default_factory=dict)
    # Derived once per view (the plugin keeps views of unchanged workers, the planner reads these every plan).
    rate: float = field(init=False, repr=False, compare=False)  #: median task seconds it runs per second
    limited: bool = field(init=False, repr=False, compare=False)  #: it has a host or device budget
    budget: tuple[int, int] = field(init=False, repr=False, compare=False)  #: (host, device), 0 where unlimited
    failed: bool = field(init=False, repr=False, compare=False)  #: a context failed there recently

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen
        set_(self, "rate", max(self.nthreads, 1) / max(self.speed, 1e-9))
        set_(self, "limited", self.host_budget is not None or self.device_budget is not None)
        set_(self, "budget", (self.host_budget or 0, self.device_budget or 0))
        set_(self, "failed", any(h.failed_recently for h in self.contexts.values()))


@dataclass(frozen=True)
class ContextView:
    """One context with its current affinity set."""

    name: str
    pending: int  #: unfinished tasks
    task_seconds: float = 0.0  #: median seconds per task (the placement side supplies a prior when untimed)
    load_seconds: float | None = None  #: a cold load reading the origin (fetch + load), over all workers
    fetch_seconds: float | None = None  #: the fetch part of it
    size: tuple[int, int] | None = None  #: (host, device) bytes, declared or measured; None: unknown
    members: frozenset[str] = frozenset()  #: the current affinity set
    setup_seconds: float | None = None  #: the part after the fetch (what a worker with the files cached pays)
    #: a cold load copying from a peer; None while no worker holds a complete copy (or none was timed)
    peer_load_seconds: float | None = None
    #: seconds since its backlog began (its first task with no set); cold growth waits for a burst to settle
    demand_seconds: float = math.inf


@dataclass(frozen=True)
class QueuedWork:
    """Work the workers already have (sent to them: queued or running), beside the views.

    Kept apart from :class:`WorkerView` because it changes with every task
    that starts or ends, while a view changes only when its worker reports:
    the views (and what the planner derives from them) outlive many plans.
    A context's queued seconds on a worker are its task count there times
    the context's :attr:`ContextView.task_seconds`, as of this plan.
    """

    #: ``{worker: {context: tasks queued or running there}}`` (read only; the plugin's live index)
    tasks: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    #: ``{worker: median seconds of its queued tasks outside our contexts}`` (plain tasks; absent: none)
    plain_seconds: Mapping[str, float] = field(default_factory=dict)


_NO_QUEUES = QueuedWork()


@dataclass(frozen=True)
class PlannerSettings:
    """Planning rules; the first three are ``pervasive.scheduler.*``."""

    prewarm: bool = True
    prewarm_backlog: int = 8
    default_load_seconds: float = 5.0
    candidates: int = 4  #: workers looked at per context and step (the k best by ready time)
    shrink_margin: float = 0.5  #: how over-provisioned a set must be before it shrinks
    shrink_plans: int = 3  #: ... for this many consecutive plans
    shrink_delay: float = 1.0  #: ... and this many seconds
    #: seconds a new backlog waits before its set grows cold (see the planner's module docstring)
    settle_seconds: float = 1.0
    #: an idle worker joins only if its set would still finish sooner were its load this much slower
    idle_load_margin: float = 0.25

    @classmethod
    def from_scheduler(cls, settings: SchedulerSettings, **overrides) -> PlannerSettings:
        """The rules of a :class:`~dask_pervasive._settings.SchedulerSettings` (``overrides`` win)."""
        values = {
            "prewarm": settings.prewarm,
            "prewarm_backlog": settings.prewarm_backlog,
            "default_load_seconds": settings.default_load_seconds,
        }
        values.update(overrides)
        return cls(**values)


# -- outputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Addition:
    """A worker that joins an affinity set."""

    worker: str
    cold: bool  #: it does not hold the context (resident, fetching or loading): it will load it
    reason: str
    evicts: tuple[str, ...] = ()  #: contexts in demand it is expected to evict to make room


@dataclass(frozen=True)
class ContextDecision:
    """The new affinity set of one context."""

    name: str
    members: frozenset[str]
    added: tuple[Addition, ...] = ()
    removed: tuple[str, ...] = ()  #: released, failed, gone, or (no pending tasks) all of them
    finish: float = 0.0  #: seconds until the backlog is expected done on ``members``
    shares: Mapping[str, float] = field(default_factory=dict)  #: planned median seconds per member

    @property
    def changed(self) -> bool:
        """The set differs from the one given: restrict all pending tasks again."""
        return bool(self.added or self.removed)


@dataclass(frozen=True)
class PlanResult:
    """What one :meth:`Planner.plan` decided."""

    contexts: dict[str, ContextDecision]
    prewarm: tuple[tuple[str, str], ...] = ()  #: ``(worker, context)`` loads to start now
    steps: int = 0  #: greedy steps taken (for the overhead metrics)
    #: seconds until a context held back by ``settle_seconds`` may grow (re-plan then); None: none is
    settles_in: float | None = None


# -- planning state ----------------------------------------------------------------------------
_NOTHING: frozenset[str] = frozenset()


class _Worker:
    # Kept by the planner from plan to plan while its view is the same object (reset() then): every
    # container allocated in a plan counts towards the garbage collector's next pass, which then lands
    # in the scheduler's hook. A new view gets a new one.
    __slots__ = (
        "budget",
        "ev_d",
        "ev_h",
        "evictable",
        "evicted",
        "free",
        "idle_d",
        "idle_h",
        "last",
        "limited",
        "pin_d",
        "pin_h",
        "pinned",
        "rate",
        "version",
        "view",
    )

    def __init__(self, view: WorkerView) -> None:
        self.view = view
        self.rate = view.rate
        self.limited = view.limited
        self.budget = view.budget
        #: contexts in demand it serves or is loading: (host, device) bytes counted against the budget
        self.pinned: dict[str, tuple[int, int]] = {}
        #: held contexts in demand it does not serve: (bytes, reload seconds); None until there are some
        self.evictable: dict[str, tuple[tuple[int, int], float]] | None = None
        self.reset()

    def reset(self) -> None:
        """The state a plan starts from (everything but the view and what derives from it)."""
        self.free = 0.0  #: seconds until its committed work ends
        self.version = 0  #: bumped when ``free`` changes (heap entries carry it)
        self.last: str | None = None  #: the context that ends its timeline
        if self.pinned:
            self.pinned.clear()
        self.pin_h = self.pin_d = 0
        if self.evictable:
            self.evictable.clear()
        self.ev_h = self.ev_d = 0
        self.evicted: frozenset[str] | set[str] = _NOTHING  #: contexts this plan evicts from it
        #: bytes of resident contexts nobody has tasks for (its LRU evicts them freely, but they stay useful)
        self.idle_h = self.idle_d = 0

    def used(self, size: tuple[int, int] | None) -> tuple[int, int]:
        """Bytes ``size`` counts for (an unknown size takes the whole budget: a worker of its own)."""
        if size is None:
            return self.budget
        return (
            size[0] if self.view.host_budget is not None else 0,
            size[1] if self.view.device_budget is not None else 0,
        )

    def pin(self, name: str, size: tuple[int, int] | None) -> None:
        if self.evictable and name in self.evictable:
            self.unevict(name)
        if name not in self.pinned and self.limited:
            b = self.pinned[name] = self.used(size)
            self.pin_h += b[0]
            self.pin_d += b[1]
        elif not self.limited:
            self.pinned[name] = (0, 0)

    def unpin(self, name: str) -> tuple[int, int] | None:
        b = self.pinned.pop(name, None)
        if b is not None:
            self.pin_h -= b[0]
            self.pin_d -= b[1]
        return b

    def evictable_add(self, name: str, used: tuple[int, int], reload: float) -> None:
        if self.evictable is None:
            self.evictable = {}
        if name not in self.evictable and name not in self.pinned:
            self.evictable[name] = (used, reload)
            self.ev_h += used[0]
            self.ev_d += used[1]

    def unevict(self, name: str) -> None:
        e = self.evictable.pop(name, None) if self.evictable else None
        if e is not None:
            self.ev_h -= e[0][0]
            self.ev_d -= e[0][1]

    def evict(self, name: str) -> None:
        """This plan evicts ``name`` from the worker (for another context)."""
        self.unevict(name)
        if self.evicted is _NOTHING:
            self.evicted = set()
        self.evicted.add(name)

    def idle_add(self, used: tuple[int, int]) -> None:
        self.idle_h += used[0]
        self.idle_d += used[1]

    def _pinned_with(self, name: str, size: tuple[int, int] | None) -> tuple[int, int]:
        """Bytes pinned once context ``name`` of ``size`` is pinned too (counted once if it already is)."""
        need = self.used(size)
        own = self.pinned.get(name) or (0, 0)
        return self.pin_h + need[0] - own[0], self.pin_d + need[1] - own[1]

    def spare(self, name: str, size: tuple[int, int] | None) -> bool:
        """Context ``name`` fits beside everything the worker holds: loading it evicts nothing."""
        if not self.limited:
            return True
        if size is None:
            return False
        h, d = self._pinned_with(name, size)
        return h + self.ev_h + self.idle_h <= self.budget[0] and d + self.ev_d + self.idle_d <= self.budget[1]

    def fit(self, name: str, size: tuple[int, int] | None) -> tuple[float, tuple[str, ...]] | None:
        """``(reload cost, evicted contexts)`` for context ``name`` to fit in the budget; None if it cannot."""
        if not self.limited:
            return 0.0, ()
        # unknown size: a worker of its own (pinned already, loading, counts once)
        if size is None and len(self.pinned) - (name in self.pinned) > 0:
            return None
        h, d = self._pinned_with(name, size)
        bh, bd = self.budget
        if h > bh or d > bd:
            return None
        h_all, d_all = h + self.ev_h, d + self.ev_d
        if h_all <= bh and d_all <= bd:
            return 0.0, ()
        cost, evicts = 0.0, []
        for n, (b, reload) in sorted((self.evictable or {}).items(), key=lambda e: (e[1][1], e[0])):
            if h_all <= bh and d_all <= bd:
                break
            h_all -= b[0]
            d_all -= b[1]
            cost += reload
            evicts.append(n)
        return cost, tuple(evicts)


class _Context:
    __slots__ = (
        "active",
        "added",
        "finish",
        "members",
        "rate",
        "rate_ready",
        "removed",
        "rs",
        "task_seconds",
        "view",
        "work",
    )

    def __init__(self, view: ContextView) -> None:
        self.view = view
        self.task_seconds = max(view.task_seconds, 0.0)
        self.work = view.pending * self.task_seconds
        self.members: set[str] = set()
        #: members as (ready, -queued, address, rate, free before), sorted; the first ``active`` get work
        self.rs: list[tuple[float, float, str, float, float]] = []
        self.active = 0
        self.rate = 0.0  #: sum of rates of the active members
        self.rate_ready = 0.0  #: sum of rate * ready of the active members
        self.finish = math.inf
        self.added: list[Addition] = []
        self.removed: list[str] = []

    def solve(self) -> None:
        """Water-fill the backlog over ``rs`` (sorted)."""
        self.active, self.rate, self.rate_ready = 0, 0.0, 0.0
        rs = self.rs
        if not rs:
            self.finish = math.inf
            return
        if self.work <= 0:
            self.finish = rs[0][0]  # nothing to share out: done when the first member is ready
            return
        for i, (r, _, _, rate, _) in enumerate(rs):
            self.rate += rate
            self.rate_ready += rate * r
            t = (self.work + self.rate_ready) / self.rate
            if i + 1 == len(rs) or t <= rs[i + 1][0]:
                self.active, self.finish = i + 1, t
                return

    def with_member(self, ready: float, rate: float) -> tuple[float, int, float, float]:
        """``(finish, old members still active, active rate, active rate * ready)`` once one ready at ``ready`` joins.

        It gets work only if ``ready < finish``; then the new active count is one more.
        """
        if not self.rs:
            return ready + self.work / rate, 0, rate, rate * ready
        if ready >= self.finish:
            return self.finish, self.active, self.rate, self.rate_ready
        a, total, total_ready, rs = self.active, self.rate + rate, self.rate_ready + rate * ready, self.rs
        t = (self.work + total_ready) / total
        while a > 0 and rs[a - 1][0] >= t:  # members now ready too late drop out of the water level
            a -= 1
            total -= rs[a][3]
            total_ready -= rs[a][3] * rs[a][0]
            t = (self.work + total_ready) / total
        return t, a, total, total_ready

    def shares(self) -> dict[str, float]:
        return {addr: rate * (self.finish - r) for r, _, addr, rate, _ in self.rs[: self.active]}


_ABSENT = Holding()  #: a worker that has nothing of a context
