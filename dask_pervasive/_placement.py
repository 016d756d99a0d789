"""Placement planning: affinity sets and the cost model behind them.

The scheduler plugin (:mod:`dask_pervasive.scheduler`) feeds this with what
workers report and with the tasks it sees; :class:`PlacementPlanner` decides
which workers each context's pending tasks are restricted to. Each context
with pending tasks has an *affinity set*: workers where it is resident plus
cold workers chosen to warm. A set grows while the expected finish time of
the backlog on it (:func:`finish_time`) exceeds the cost of warming another
worker, only onto workers with room in their memory budget.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._protocol import EVENT_TOPIC, HOLDING_STATES, WARMING_STATES, Action, State, warm_map_entry
from .context import context_of

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState, WorkerState

#: Task states whose restrictions we may still change.
PLACEABLE = ("released", "waiting", "no-worker", "processing")
_EWMA = 0.5


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
    ``scheduler``; the plugin calls :meth:`replan` and provides
    ``_prewarm_soon(addr, name)``.
    """

    scheduler: Scheduler | None
    plans: dict[str, ContextPlan]
    warm: dict[str, dict[str, WorkerContext]]
    budgets: dict[str, tuple[int | None, int | None]]
    _stale: set[str]
    _fresh: dict[str, set]

    def _ready_time(self, plan: ContextPlan, addr: str) -> float:
        """Seconds until ``addr`` could run tasks of ``plan``."""
        wc = self.warm[plan.name].get(addr)
        load = plan.load_seconds if plan.load_seconds is not None else self.settings.default_load_seconds
        if wc is None:
            return load
        if wc.state is State.RESIDENT:
            return 0.0
        if wc.state in WARMING_STATES:
            return max(0.0, load - (time.monotonic() - wc.loading_since))
        if wc.files:
            return max(0.0, load - (plan.fetch_seconds or 0.0))
        return load

    def _holds(self, plan: ContextPlan, addr: str) -> bool:
        wc = self.warm[plan.name].get(addr)
        return addr in plan.members or (wc is not None and wc.state in HOLDING_STATES)

    def _fits(self, plan: ContextPlan, addr: str, demand: list[ContextPlan]) -> bool:
        host_budget, device_budget = self.budgets.get(addr, (None, None))
        if host_budget is None and device_budget is None:
            return True
        others = [p for p in demand if p is not plan and self._holds(p, addr)]
        if plan.size is None:
            # Size unknown until the first load: give the context a worker of its own.
            return not others
        used_host = sum(p.size[0] if p.size else (host_budget or 0) for p in others)
        used_device = sum(p.size[1] if p.size else (device_budget or 0) for p in others)
        return (host_budget is None or used_host + plan.size[0] <= host_budget) and (
            device_budget is None or used_device + plan.size[1] <= device_budget
        )

    def _recently_failed(self, plan: ContextPlan, addr: str) -> bool:
        wc = self.warm[plan.name].get(addr)
        return (
            wc is not None
            and wc.state is State.FAILED
            and wc.failed_at is not None
            and time.monotonic() - wc.failed_at < self.settings.retry_failed_after
        )

    def _candidates(self, plan: ContextPlan, running: dict[str, WorkerState], demand: list[ContextPlan]):
        """Workers outside the set that could join it, best first: ``(ready, addr)``."""
        out = []
        for addr, ws in running.items():
            if addr in plan.members or self._recently_failed(plan, addr):
                continue
            ready = self._ready_time(plan, addr)
            if ready > 0 and not self._fits(plan, addr, demand):
                continue
            crowding = sum(1 for p in demand if p is not plan and self._holds(p, addr))
            out.append((ready, crowding, ws.occupancy / max(ws.nthreads, 1), addr))
        out.sort()
        return [(r, a) for r, _, _, a in out]

    def _fallback_worker(self, plan: ContextPlan, running: dict[str, WorkerState], demand: list[ContextPlan]) -> str:
        """No worker has room: share the least crowded one (its contexts will alternate)."""

        def key(addr: str):
            ws = running[addr]
            crowd = sum(len(p.pending) for p in demand if p is not plan and self._holds(p, addr))
            return (self._recently_failed(plan, addr), crowd, ws.occupancy / max(ws.nthreads, 1), addr)

        return min(running, key=key)

    def _work(self, plan: ContextPlan) -> float:
        """Thread-seconds of pending work.

        Uses Dask's per-prefix duration average (from which worker plugins
        removed load time). For a prefix never timed, Dask's 0.5 s default
        would make short tasks look long and warm workers for nothing, so the
        longest elapsed time of its tasks running on warm members is used: a
        lower bound that grows while tasks run.
        """
        assert self.scheduler is not None
        tasks = self.scheduler.tasks
        per_prefix: dict[Any, float] = {}
        total = 0.0
        for key in plan.pending:
            ts = tasks.get(key)
            if ts is None:
                continue
            prefix = ts.prefix
            d = per_prefix.get(prefix)
            if d is None:
                d = per_prefix[prefix] = (
                    prefix.duration_average if prefix.duration_average >= 0 else self._elapsed(plan, prefix)
                )
            total += d
        return total

    def _elapsed(self, plan: ContextPlan, prefix: Any) -> float:
        assert self.scheduler is not None
        longest = 0.0
        for addr in plan.members:
            ws = self.scheduler.workers.get(addr)
            if ws is None or self._ready_time(plan, addr) > 0:
                continue  # still loading: elapsed time is load time, not task time
            for ts, elapsed in ws.executing.items():
                if ts.prefix is prefix and elapsed > longest:
                    longest = elapsed
        return longest

    def _members_finish(
        self, plan: ContextPlan, running: dict[str, WorkerState], extra: tuple[float, str] | None, work: float
    ) -> float:
        ready = [(self._ready_time(plan, a), running[a].nthreads) for a in plan.members if a in running]
        if extra is not None:
            ready.append((extra[0], running[extra[1]].nthreads))
        return finish_time(ready, work)

    def replan(self, stimulus_id: str) -> None:
        """Recompute affinity sets of contexts with pending tasks and apply them.

        Restrictions are applied to all pending tasks of a context whose set
        changed or that is marked stale (tasks recomputed, left in no-worker,
        a member lost), otherwise only to its tasks not restricted yet.
        """
        scheduler = self.scheduler
        if scheduler is None:
            return
        running = {ws.address: ws for ws in scheduler.running}
        demand = sorted((p for p in self.plans.values() if p.pending), key=lambda p: -len(p.pending))
        before = {p.name: set(p.members) for p in demand}
        for plan in self.plans.values():
            plan.members &= running.keys()
            if not plan.pending:
                plan.members.clear()  # forget reservations without demand
            elif len(plan.members) > 1:
                plan.members -= {a for a in plan.members if self._recently_failed(plan, a)} or set()
        if not running or not demand:
            return
        # Every context in demand gets at least one worker: warm if possible.
        for plan in demand:
            if not plan.members:
                cands = self._candidates(plan, running, demand)
                pick = cands[0][1] if cands else self._fallback_worker(plan, running, demand)
                self._add_member(plan, pick, "first worker")
        # Grow where another worker shortens the backlog most.
        work = {p.name: self._work(p) for p in demand}
        for _ in range(len(running) * len(demand)):
            best = None
            for plan in demand:
                if len(plan.pending) <= self.settings.prewarm_backlog * len(plan.members):
                    continue
                cands = self._candidates(plan, running, demand)
                if not cands:
                    continue
                now = self._members_finish(plan, running, None, work[plan.name])
                then = self._members_finish(plan, running, cands[0], work[plan.name])
                gain = now - then
                if cands[0][0] == 0:
                    # Already warm: joining costs nothing, even before durations are known.
                    gain = max(gain, 2e-3)
                if gain > 1e-3 and (best is None or gain > best[0]):
                    best = (gain, plan, cands[0][1], now, then)
            if best is None:
                break
            gain, plan, addr, now, then = best
            self._add_member(plan, addr, f"backlog finishes in {now:.1f}s, {then:.1f}s with {addr}")
        for plan in demand:
            if plan.name in self._stale or plan.members != before[plan.name]:
                self._apply(plan, stimulus_id)
            elif self._fresh.get(plan.name):
                self._apply(plan, stimulus_id, self._fresh[plan.name])
        self._stale.clear()
        self._fresh.clear()

    def _add_member(self, plan: ContextPlan, addr: str, reason: str) -> None:
        assert self.scheduler is not None
        plan.members.add(addr)
        wc = self.warm[plan.name].get(addr)
        cold = wc is None or wc.state not in HOLDING_STATES
        if cold:
            plan.cold_placements += 1
        else:
            plan.warm_placements += 1
        self.scheduler.log_event(
            EVENT_TOPIC,
            {
                "action": Action.PLACEMENT.value,
                "context": plan.name,
                "added": addr,
                "cold": cold,
                "members": sorted(plan.members),
                "pending": len(plan.pending),
                "reason": reason,
            },
        )
        if cold and self.settings.prewarm and len(plan.members) > 1:
            self._prewarm_soon(addr, plan.name)

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


def ewma(old: float | None, new: float) -> float:
    return new if old is None else _EWMA * new + (1 - _EWMA) * old
