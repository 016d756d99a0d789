"""Placement: the joint planner's decisions applied to the scheduler's tasks.

The scheduler plugin (:mod:`dask_pervasive.scheduler`) feeds this with what
workers report and with the tasks it sees; :class:`PlacementPlanner` decides
which workers each context's pending tasks are restricted to. Each context
with pending tasks has an *affinity set*: workers where it is resident plus
cold workers chosen to warm. All sets are planned together by the pure joint
planner of :mod:`dask_pervasive._planner` (its docstring states the model and
the cost per decision), from the views :mod:`dask_pervasive._views` builds;
this module runs a plan and applies the result (restrictions, placement
events, prewarm requests).

Cost per re-plan, besides the planner's and the views': applying a changed set
re-restricts that context's pending tasks (``O(pending)``); otherwise only new
keys are restricted.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._measures import ContextPlan
from ._planner import Addition, Planner, PlannerSettings
from ._protocol import EVENT_TOPIC, Action, warm_map_entry
from ._views import PlannerInputs
from .context import context_of

if TYPE_CHECKING:
    from distributed.scheduler import TaskState


logger = logging.getLogger("dask_pervasive.scheduler")

#: Task states whose restrictions we may still change.
PLACEABLE = ("released", "waiting", "no-worker", "processing")
_TIMINGS = 4096  #: re-plan timings kept


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


class PlacementPlanner(PlannerInputs):
    """The planning half of :class:`~dask_pervasive.ContextSchedulerPlugin` (a mixin).

    Works on the plugin's ``plans``, ``warm``, ``budgets``, ``settings`` and
    ``scheduler`` (declared by :class:`~dask_pervasive._views.PlannerInputs`); the plugin calls :meth:`replan`, :meth:`_touch_worker` when
    a worker reports, :meth:`_observe_finished` when a context task finishes,
    :meth:`_forget_worker` when one leaves, and provides
    ``_prewarm_soon(addr, name)`` and ``_replan_after(seconds)``.
    """

    _stale: set[str]
    _fresh: dict[str, set]
    _last_replan: float
    _replan_after: Callable[[float], None]  #: the plugin's: re-plan in that many seconds (once)

    def __init__(self) -> None:
        super().__init__()  # needs ``settings`` set: the plugin sets it first
        #: the joint planner (it keeps the hysteresis memory between plans)
        self.joint = Planner(PlannerSettings.from_scheduler(self.settings))
        #: wall seconds of the latest re-plans (bounded), for the overhead metrics and the benchmark
        self.replan_seconds: deque[float] = deque(maxlen=_TIMINGS)
        #: CPU seconds (this thread) of the same re-plans: on a loaded machine, wall time also counts waiting
        self.replan_cpu_seconds: deque[float] = deque(maxlen=_TIMINGS)

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
            if plan.size is None or plan.size == plan.fit_checked:
                continue  # members joined knowing this size (the planner checks budgets), none changed since
            plan.fit_checked = plan.size
            unfit = {a for a in plan.members if self._cannot_hold(plan, a)}
            if unfit:  # its size became known (declared or measured) after it joined
                plan.members -= unfit
                too_small[plan.name] = unfit
                self._stale.add(plan.name)
        contexts = self._context_views(now)
        task_seconds = {c.name: c.task_seconds for c in contexts}
        # Known contexts without a backlog (those _context_views leaves out: no tasks, no set): while there
        # are any, a new backlog may be the first of a burst.
        quiet = len(self.plans) - len(contexts)
        result = self.joint.plan(self._worker_views(now), contexts, now, quiet, self._queued_work(task_seconds))
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
        if result.settles_in is not None:  # a new backlog may grow then (see Planner._held_back)
            self._replan_after(result.settles_in)
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
