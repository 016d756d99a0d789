"""Placement planning glue: the scheduler's state turned into planner views, decisions applied.

The scheduler plugin (:mod:`dask_pervasive.scheduler`) feeds this with what
workers report and with the tasks it sees; :class:`PlacementPlanner` decides
which workers each context's pending tasks are restricted to. Each context
with pending tasks has an *affinity set*: workers where it is resident plus
cold workers chosen to warm. All sets are planned together by the pure joint
planner of :mod:`dask_pervasive._planner` (its docstring states the model and
the cost per decision); this module builds its :class:`~dask_pervasive._planner.WorkerView`
and :class:`~dask_pervasive._planner.ContextView` inputs, measures per-worker
task speed and load times, and applies the result (restrictions, placement
events, prewarm requests).

Cost per re-plan, besides the planner's: ``O(C)`` context views (task time
from a sample of at most ``_SAMPLE`` pending tasks, not all of them), and
``O(W)`` worker views of which only those whose state or queue changed since
the last plan (or with a load running or a recent failure, whose numbers age)
are rebuilt, each in ``O(h + q)`` (contexts it holds, contexts it has tasks
of: the queue counts come from :class:`~dask_pervasive._queues.WorkerQueues`,
kept incrementally, never from a scan of the tasks). Applying a changed set
re-restricts that context's pending tasks (``O(pending)``); otherwise only new
keys are restricted.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._planner import Addition, ContextView, Holding, Planner, PlannerSettings, WorkerView
from ._protocol import EVENT_TOPIC, WARMING_STATES, Action, State, warm_map_entry
from ._queues import WorkerQueues
from .context import context_of

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState

logger = logging.getLogger("dask_pervasive.scheduler")

#: Task states whose restrictions we may still change.
PLACEABLE = ("released", "waiting", "no-worker", "processing")
_EWMA = 0.5
_SPEED_EWMA = 0.2  #: task times are noisy: a slower average than for loads
_SPEED_TOLERANCE = 0.1  #: a worker's view is rebuilt when its speed moved more than this
_MIN_TIMED = 5e-3  #: seconds: tasks shorter than this do not measure speeds
_SAMPLE = 32  #: pending tasks looked at for a context's task time
_TIMINGS = 4096  #: re-plan timings kept


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
    load_seconds: float | None = None  #: EWMA of this worker's fetch + load of this context


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
    pending: set = field(default_factory=set)  #: keys of unfinished tasks
    load_seconds: float | None = None  #: EWMA of fetch + load
    fetch_seconds: float | None = None  #: EWMA of the fetch part
    size: tuple[int, int] | None = None  #: (host, device) bytes, once measured
    warm_placements: int = 0  #: workers added to the set that already held the context
    cold_placements: int = 0  #: workers added that had to load it
    drained_at: float | None = None  #: monotonic time its backlog last drained (its set is kept a while)
    timed: bool = False  #: one of its tasks finished: Dask knows a duration (re-plan then: sets may grow)
    last_used: float = -math.inf  #: monotonic time of its last task submitted or finished, or load


def find_context(run_spec: Any, budget: int = 64) -> str | None:
    """Context of a ``uses_context`` function anywhere in a task spec.

    The function may be nested: ``bag.map`` wraps it, fused graphs hold whole
    subgraphs (``_execute_subgraph``), xarray passes it to a wrapper. The walk
    visits at most ``budget`` objects so big literal arguments stay cheap.
    """
    stack = [run_spec]
    while stack and budget > 0:
        obj = stack.pop()
        budget -= 1
        name = context_of(obj)
        if name is not None:
            return name
        func = getattr(obj, "func", None)  # Task, functools.partial
        if func is not None:
            stack.append(func)
            stack.extend(itertools.islice(getattr(obj, "args", ()) or (), budget))
            kwargs = getattr(obj, "kwargs", None)
            if isinstance(kwargs, dict):
                stack.extend(itertools.islice(kwargs.values(), budget))
        elif isinstance(getattr(obj, "dsk", None), dict):
            # dask < 2024.12 fuses blockwise tasks into a SubgraphCallable: the subgraph is in .dsk
            stack.extend(itertools.islice(obj.dsk.values(), budget))
        elif isinstance(obj, dict):
            stack.extend(itertools.islice(obj.values(), budget))
        elif isinstance(obj, (list, tuple)):
            stack.extend(itertools.islice(obj, budget))
    return None


def finish_time(ready: Iterable[tuple[float, int]], work: float) -> float:
    """When ``work`` thread-seconds finish on workers that become ready at given times.

    ``ready`` holds ``(ready_time, nthreads)``; solves
    ``sum(n * max(0, T - r)) == work`` by water-filling.
    """
    slots = sorted(ready)
    if not slots:
        return float("inf")
    acc_threads = 0
    acc_ready = 0.0
    for i, (r, n) in enumerate(slots):
        acc_threads += n
        acc_ready += n * r
        t = (work + acc_ready) / acc_threads
        if i + 1 == len(slots) or t <= slots[i + 1][0]:
            return t
    return float("inf")  # pragma: no cover


class PlacementPlanner:
    """The planning half of :class:`~dask_pervasive.ContextSchedulerPlugin` (a mixin).

    Works on the plugin's ``plans``, ``warm``, ``budgets``, ``settings`` and
    ``scheduler``; the plugin calls :meth:`replan`, :meth:`_touch_worker` when
    a worker reports, :meth:`_observe_finished` when a context task finishes,
    :meth:`_forget_worker` when one leaves, and provides
    ``_prewarm_soon(addr, name)``.
    """

    scheduler: Scheduler | None
    plans: dict[str, ContextPlan]
    warm: dict[str, dict[str, WorkerContext]]
    budgets: dict[str, tuple[int | None, int | None]]
    _stale: set[str]
    _fresh: dict[str, set]
    _last_replan: float

    # -- per-worker measurements ------------------------------------------------------
    @property
    def joint(self) -> Planner:
        """The joint planner (built on first use from ``settings``; it keeps the hysteresis memory)."""
        planner = self.__dict__.get("_joint")
        if planner is None:
            planner = self.__dict__["_joint"] = Planner(PlannerSettings.from_scheduler(self.settings))
        return planner

    @property
    def rates(self) -> dict[str, WorkerRates]:
        """Per-worker measured task speed and load factor."""
        rates = self.__dict__.get("_rates")
        if rates is None:
            rates = self.__dict__["_rates"] = {}
        return rates

    @property
    def replan_seconds(self) -> deque[float]:
        """Wall seconds of the latest re-plans (bounded), for the overhead metrics and the benchmark."""
        out = self.__dict__.get("_replan_seconds")
        if out is None:
            out = self.__dict__["_replan_seconds"] = deque(maxlen=_TIMINGS)
        return out

    @property
    def replan_cpu_seconds(self) -> deque[float]:
        """CPU seconds (this thread) of the same re-plans: on a loaded machine, wall time also counts waiting."""
        out = self.__dict__.get("_replan_cpu_seconds")
        if out is None:
            out = self.__dict__["_replan_cpu_seconds"] = deque(maxlen=_TIMINGS)
        return out

    @property
    def queues(self) -> WorkerQueues:
        """Our tasks in ``processing`` per worker and context (kept from transitions and steals)."""
        queues = self.__dict__.get("_queues")
        if queues is None:
            queues = self.__dict__["_queues"] = WorkerQueues()
        return queues

    def _views_cache(self) -> dict[str, Any]:
        cache = self.__dict__.get("_views")
        if cache is None:
            cache = self.__dict__["_views"] = {"version": {}, "views": {}, "by_worker": {}}
        return cache

    def _touch_worker(self, addr: str, name: str | None = None) -> None:
        """``addr`` reported something (a context state, its budget): rebuild its view at the next plan."""
        cache = self._views_cache()
        cache["version"][addr] = cache["version"].get(addr, 0) + 1
        if name is not None:
            wc = self.warm.get(name, {}).get(addr)
            if wc is not None:
                cache["by_worker"].setdefault(addr, {})[name] = wc

    def _forget_worker(self, addr: str) -> None:
        cache = self._views_cache()
        for part in cache.values():
            part.pop(addr, None)
        self.rates.pop(addr, None)
        self.queues.forget_worker(addr)

    def _observe_load(self, plan: ContextPlan, addr: str, wc: WorkerContext, seconds: float) -> None:
        """A load of ``plan`` on ``addr`` took ``seconds``: its own EWMA and its load factor."""
        if plan.load_seconds:
            r = self.rates.setdefault(addr, WorkerRates())
            r.load_factor = ewma(r.load_factor if r.loads else None, seconds / plan.load_seconds)
            r.loads += 1
        wc.load_seconds = ewma(wc.load_seconds, seconds)
        self._touch_worker(addr, plan.name)

    def _observe_finished(self, key: Any, worker: str | None, startstops: Any) -> None:
        """A context task finished on ``worker``: its compute time against its prefix's average."""
        if not worker or not startstops or self.scheduler is None:
            return
        ts = self.scheduler.tasks.get(key)
        if ts is None:
            return
        plan = self.plans.get(self.task_context.get(key, ""))
        if plan is not None and not plan.timed:
            # Until now its task time was a lower bound (0 before any ran): only warm workers could join.
            plan.timed = True
            self.queues.mark_all()  # queued work of this context was counted as 0 seconds
            if plan.pending:
                self._schedule_replan()
        compute = sum(s["stop"] - s["start"] for s in startstops if s.get("action") == "compute")
        if compute <= _MIN_TIMED:
            return  # too short to tell speeds apart from scheduling noise
        # Against the running mean of the prefix over all workers (Dask's own average follows the
        # latest tasks, so it swings between fast and slow workers).
        totals = self.__dict__.setdefault("_prefix_seconds", {})
        total = totals.get(ts.prefix.name)
        if total is None:
            total = totals[ts.prefix.name] = [0.0, 0]
        total[0] += compute
        total[1] += 1
        average = total[0] / total[1]
        r = self.rates.setdefault(worker, WorkerRates())
        r.speed = ewma(r.speed if r.tasks else None, min(max(compute / average, 0.1), 10.0), _SPEED_EWMA)
        r.tasks += 1
        if abs(r.speed - r.planned_speed) > _SPEED_TOLERANCE * r.planned_speed:
            r.planned_speed = r.speed
            self._touch_worker(worker)

    # -- views -------------------------------------------------------------------------
    def _holding(self, wc: WorkerContext, now: float, queued: float = 0.0) -> Holding:
        failed = (
            wc.state is State.FAILED
            and wc.failed_at is not None
            and now - wc.failed_at < self.settings.retry_failed_after
        )
        resident = wc.state is State.RESIDENT
        return Holding(
            state=wc.state.value,
            files=wc.files,
            loading_for=now - wc.loading_since if wc.state in WARMING_STATES else 0.0,
            load_seconds=wc.load_seconds,
            queued_seconds=queued,
            host_bytes=wc.host_bytes if resident else None,
            device_bytes=wc.device_bytes if resident else None,
            failed_recently=failed,
        )

    def _worker_views(self, now: float, task_seconds: dict[str, float]) -> list[WorkerView]:
        """Views of the running workers; unchanged ones (state and queues) come from the cache.

        A worker's queued work per context is its tasks in ``processing``
        (from :attr:`queues`) times the context's task time
        (``task_seconds``); work of a context it holds nothing of goes to its
        ``other_seconds``, with its plain tasks (Dask's occupancy minus ours).
        """
        assert self.scheduler is not None
        cache = self._views_cache()
        versions, views, by_worker = cache["version"], cache["views"], cache["by_worker"]
        changed = self.queues.take_changed()
        out = []
        for ws in self.scheduler.running:
            addr = ws.address
            version = versions.get(addr, 0)
            cached = views.get(addr)
            if cached is not None and cached[0] == version and not cached[2] and addr not in changed:
                out.append(cached[1])
                continue
            volatile = False
            contexts = {}
            held = by_worker.get(addr, {})
            counts = self.queues.counts(addr)
            queued = {name: n * task_seconds.get(name, 0.0) for name, n in counts.items()}
            ours = sum(queued.values())
            for name, wc in held.items():
                if wc.state is State.ABSENT and not wc.files:
                    continue
                h = self._holding(wc, now, queued.pop(name, 0.0))
                volatile = volatile or wc.state in WARMING_STATES or h.failed_recently
                contexts[name] = h
            r = self.rates.get(addr)
            host_budget, device_budget = self.budgets.get(addr, (None, None))
            # Plain tasks: Dask's occupancy (estimated seconds of all its processing tasks) less ours.
            plain = max(0.0, ws.occupancy - ours) if len(ws.processing) > sum(counts.values()) else 0.0
            view = WorkerView(
                addr,
                nthreads=ws.nthreads,
                speed=r.planned_speed if r is not None else 1.0,
                load_factor=r.load_factor if r is not None else 1.0,
                host_budget=host_budget,
                device_budget=device_budget,
                # Queued for contexts it holds nothing of (a member's is in the context's own backlog).
                other_seconds=plain + sum(v for n, v in queued.items() if addr not in self._members_of(n)),
                contexts=contexts,
            )
            views[addr] = (version, view, volatile)
            out.append(view)
        return out

    def _members_of(self, name: str) -> set[str] | frozenset[str]:
        plan = self.plans.get(name)
        return plan.members if plan is not None else frozenset()

    def _context_views(self, now: float) -> list[ContextView]:
        out = []
        for plan in self.plans.values():
            if not plan.pending and not plan.members:
                continue
            pending = len(plan.pending)
            if pending:
                plan.drained_at = None
            else:
                # Tasks submitted one by one often finish before the next arrives: keep the set
                # (and its workers' room) for as long as reloading would cost, so the next task
                # finds it warm and other contexts do not evict it in between.
                if plan.drained_at is None:
                    plan.drained_at = now
                grace = plan.load_seconds if plan.load_seconds is not None else self.settings.default_load_seconds
                if now - plan.drained_at < grace:
                    pending = 1  # a placeholder: no task is restricted, the set does not grow
            out.append(
                ContextView(
                    plan.name,
                    pending=pending,
                    task_seconds=self._task_seconds(plan) if plan.pending else 0.0,
                    load_seconds=plan.load_seconds,
                    fetch_seconds=plan.fetch_seconds,
                    size=plan.size,
                    members=frozenset(plan.members),
                )
            )
        return out

    def _task_seconds(self, plan: ContextPlan) -> float:
        """Median seconds per pending task, from a sample of them (see :meth:`_work`)."""
        n = len(plan.pending)
        sample = plan.pending if n <= _SAMPLE else itertools.islice(plan.pending, _SAMPLE)
        work, counted = self._work(plan, sample)
        return work / counted if counted else 0.0

    def _work(self, plan: ContextPlan, keys: Iterable | None = None) -> tuple[float, int]:
        """Thread-seconds of the pending work in ``keys`` (all pending by default), and how many were found.

        Uses Dask's per-prefix duration average (from which worker plugins
        removed load time; ``distributed.scheduler.default-task-durations``
        declares one up front). For a prefix never timed, see
        :meth:`_untimed_seconds`.
        """
        assert self.scheduler is not None
        tasks = self.scheduler.tasks
        per_prefix: dict[Any, float] = {}
        total = 0.0
        counted = 0
        for key in plan.pending if keys is None else keys:
            ts = tasks.get(key)
            if ts is None:
                continue
            prefix = ts.prefix
            d = per_prefix.get(prefix)
            if d is None:
                d = per_prefix[prefix] = (
                    prefix.duration_average if prefix.duration_average >= 0 else self._untimed_seconds(plan, prefix)
                )
            total += d
            counted += 1
        return total, counted

    def _untimed_seconds(self, plan: ContextPlan, prefix: Any) -> float:
        """Estimated seconds per task of a prefix that no task has finished yet.

        While no worker holds the context resident nothing can time it, so
        Dask's own prior (``distributed.scheduler.unknown-task-duration``,
        0.5 s by default) stands in: a large backlog then warms several
        workers side by side instead of one load after another. Once one
        is resident (the planner gives it the tasks first) its first task is
        about to give the real figure, so the longest elapsed time of the
        prefix's tasks running on resident workers is used: a lower bound
        that grows while they run, which keeps a warm worker's few short
        tasks from warming others.
        """
        assert self.scheduler is not None
        longest, resident = 0.0, False
        for addr, wc in self.warm.get(plan.name, {}).items():
            ws = self.scheduler.workers.get(addr)
            if ws is None or wc.state is not State.RESIDENT:
                continue  # still loading: elapsed time is load time, not task time
            resident = True
            for ts, elapsed in ws.executing.items():
                if ts.prefix is prefix and elapsed > longest:
                    longest = elapsed
        return longest if resident else float(self.scheduler.UNKNOWN_TASK_DURATION)

    # -- planning ----------------------------------------------------------------------
    def _cannot_hold(self, plan: ContextPlan, addr: str) -> bool:
        """Whether the context alone exceeds ``addr``'s budgets (it would fail there with ContextTooLargeError)."""
        if plan.size is None:
            return False
        host_budget, device_budget = self.budgets.get(addr, (None, None))
        return (host_budget is not None and plan.size[0] > host_budget) or (
            device_budget is not None and plan.size[1] > device_budget
        )

    def _move_off(self, plan: ContextPlan, workers: set[str], stimulus_id: str) -> None:
        """Send tasks of ``plan`` queued (not yet running) on ``workers`` back to be placed again."""
        assert self.scheduler is not None
        moves = {}
        for key in plan.pending:
            ts = self.scheduler.tasks.get(key)
            ws = ts.processing_on if ts is not None and ts.state == "processing" else None
            if ws is not None and ws.address in workers and ts not in ws.executing:
                moves[key] = "released"  # then waiting, then placed under the new restrictions
        if moves:
            logger.info(
                "pervasive: moving %d queued task(s) of context %r off %s (too small for it)",
                len(moves),
                plan.name,
                ", ".join(sorted(workers)),
            )
            self.scheduler.transitions(moves, stimulus_id)

    def replan(self, stimulus_id: str) -> None:
        """Recompute affinity sets of all contexts with pending tasks, jointly, and apply them.

        Restrictions are applied to all pending tasks of a context whose set
        changed or that is marked stale (tasks recomputed, left in no-worker,
        a member lost), otherwise only to its tasks not restricted yet.
        """
        scheduler = self.scheduler
        if scheduler is None:
            return
        started, cpu = time.perf_counter(), time.thread_time()
        now = self._last_replan = time.monotonic()
        too_small: dict[str, set[str]] = {}
        for plan in self.plans.values():
            unfit = {a for a in plan.members if self._cannot_hold(plan, a)}
            if unfit:  # its size became known (declared or measured) after it joined
                plan.members -= unfit
                too_small[plan.name] = unfit
                self._stale.add(plan.name)
        contexts = self._context_views(now)
        task_seconds = {c.name: c.task_seconds for c in contexts}
        result = self.joint.plan(self._worker_views(now, task_seconds), contexts, now)
        for name, decision in result.contexts.items():
            plan = self.plans[name]
            plan.members = set(decision.members)
            for addition in decision.added:
                self._placed(plan, addition)
            if not plan.pending:
                continue
            if decision.changed or name in self._stale:
                self._apply(plan, stimulus_id)
            elif self._fresh.get(name):
                self._apply(plan, stimulus_id, self._fresh[name])
        if self.settings.prewarm:
            for addr, name in result.prewarm:
                self._prewarm_soon(addr, name)
        self._stale.clear()
        self._fresh.clear()
        for name, unfit in too_small.items():  # after the new restrictions are in place
            self._move_off(self.plans[name], unfit, stimulus_id)
        self.replan_seconds.append(time.perf_counter() - started)
        self.replan_cpu_seconds.append(time.thread_time() - cpu)

    def _placed(self, plan: ContextPlan, addition: Addition) -> None:
        """Count and log one worker joining a set."""
        assert self.scheduler is not None
        if addition.cold:
            plan.cold_placements += 1
        else:
            plan.warm_placements += 1
        msg = {
            "action": Action.PLACEMENT.value,
            "context": plan.name,
            "added": addition.worker,
            "cold": addition.cold,
            "members": sorted(plan.members),
            "pending": len(plan.pending),
            "reason": addition.reason,
        }
        if addition.evicts:
            msg["evicts"] = list(addition.evicts)
        self.scheduler.log_event(EVENT_TOPIC, msg)

    def _apply(self, plan: ContextPlan, stimulus_id: str, keys: Iterable | None = None) -> None:
        """Restrict pending tasks (or just ``keys``) to the affinity set; revive those left without a worker."""
        assert self.scheduler is not None
        tasks = self.scheduler.tasks
        members = set(plan.members)
        recommendations = {}
        for key in plan.pending if keys is None else keys:
            ts: TaskState | None = tasks.get(key)
            if ts is None or ts.state not in PLACEABLE:
                continue
            ts.worker_restrictions = set(members)
            ts.loose_restrictions = False
            if ts.state == "no-worker":
                recommendations[key] = "processing"
        if recommendations:
            self.scheduler.transitions(recommendations, stimulus_id)

    # -- reporting -------------------------------------------------------------------------
    def where(self) -> dict[str, dict[str, list[str]]]:
        """The warm map: ``{context: {"resident", "files", "loading", "failed", "affinity"}}``."""
        return {
            name: warm_map_entry(
                ((addr, wc.state, wc.files) for addr, wc in self.warm.get(name, {}).items()),
                self.plans[name].members if name in self.plans else (),
            )
            for name in sorted(set(self.plans) | set(self.warm))
        }


def ewma(old: float | None, new: float, weight: float = _EWMA) -> float:
    """Exponentially weighted moving average: ``new`` weighs ``weight``."""
    return new if old is None else weight * new + (1 - weight) * old
