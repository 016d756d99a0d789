"""The scheduler half: :class:`ContextSchedulerPlugin` steers context tasks to warm workers.

Each context with pending tasks has an *affinity set*: workers where it is
resident plus cold workers the plugin chose to warm. Its tasks get strict
worker restrictions to that set, so Dask's own ``decide_worker`` and work
stealing balance load *inside* the set (stealing never moves them out, which
loose restrictions would allow). All sets are planned jointly (a worker busy
with one context looks busy to the others; a cold worker joins only when it
pays for itself; sets shrink with hysteresis), onto workers with room in their
memory budget, and re-planned when workers join or leave, contexts fail or get
evicted. The model is in :mod:`dask_pervasive._planner`, its inputs and the
applied result in :mod:`dask_pervasive._placement`; this module is the plugin glue (events,
graph and task hooks, lifecycle).

Scaling down: the plugin answers Dask's ``valid_workers_downscaling`` hook
(:mod:`dask_pervasive._retirement`) so ``retire_workers(n=...)`` and
``adapt`` keep the last warm worker of a context in demand, and it watches
Dask's ``worker-status-change`` events: a worker that starts leaving
(``closing_gracefully``, ``closing``) is taken out of affinity sets at once,
while it goes on serving its context files to peers until it is removed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from ._measures import ContextPlan, WorkerContext
from ._placement import PLACEABLE, PlacementPlanner, find_context
from ._protocol import (
    DASK_STATUS_CHANGE,
    EVENT_TOPIC,
    HOLDING_STATES,
    LEAVING_STATUSES,
    PLUGIN_NAME,
    WARMING_STATES,
    Action,
    State,
    WorkerHandler,
)
from ._queues import STEAL_CONFIRM, rebalance
from ._retirement import is_leaving, retirement_candidates
from ._settings import SchedulerSettings
from .transfer import SourceCoordinator

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import WorkerState

logger = logging.getLogger(__name__)

#: Seconds between re-plans triggered by submits (new tasks in between join the current sets).
_SUBMIT_REPLAN_GAP = 0.05

# Re-exported: the planning pieces lived here before _placement and _measures.
__all__ = ["ContextPlan", "ContextSchedulerPlugin", "WorkerContext"]


class ContextSchedulerPlugin(PlacementPlanner, SchedulerPlugin):
    """Place tasks that need a context on workers where it is (or will be) warm.

    Tasks need a context when annotated (``dask.annotate(context="llm")``)
    or when their function is decorated with
    :func:`~dask_pervasive.uses_context`. Other tasks are left alone, as are
    tasks with user restrictions (``workers=``, resources).

    Parameters
    ----------
    prewarm
        Load the context on workers added to an affinity set right away,
        rather than with their first task (``pervasive.scheduler.prewarm``).
    prewarm_backlog
        Grow a set only while it has more than this many pending tasks per
        member (``pervasive.scheduler.prewarm-backlog``).
    default_load_seconds
        Load cost assumed before the first measurement.
    interval
        How often placement is re-planned while context tasks are pending.

    All of these, ``pervasive.worker.retry-failed-after`` and
    ``pervasive.transfer.*`` (for the source coordinator) are read once, where
    the plugin is built, into ``settings`` (a
    ``SchedulerSettings`` from ``dask_pervasive._settings``).

    Raises
    ------
    ConfigurationError
        A setting is invalid (raised where the plugin is built: on the client
        under :func:`dask_pervasive.install`).

    Examples
    --------
    >>> client.register_plugin(ContextSchedulerPlugin())  # doctest: +SKIP
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(
        self,
        prewarm: bool | None = None,
        prewarm_backlog: int | None = None,
        default_load_seconds: float | None = None,
        interval: str | float | None = None,
    ) -> None:
        # Read where the plugin is built: on the client under dp.install (and
        # pickled with it), on the scheduler under --preload.
        self.settings = SchedulerSettings.from_config(
            prewarm=prewarm,
            prewarm_backlog=prewarm_backlog,
            default_load_seconds=default_load_seconds,
            interval=interval,
        )
        super().__init__()  # the planning state (PlacementPlanner, PlannerInputs)
        self.plans: dict[str, ContextPlan] = {}
        self.warm: dict[str, dict[str, WorkerContext]] = defaultdict(dict)  # context -> worker -> state
        self.budgets: dict[str, tuple[int | None, int | None]] = {}
        self.no_peers: set[str] = set()  # workers whose cold loads read the origin (transfer.peers off)
        self.task_context: dict[Any, str] = {}
        self.scheduler: Scheduler | None = None
        self._callback: PeriodicCallback | None = None
        self._background: set[asyncio.Task] = set()
        self._warned_no_worker_plugin = False
        self._stale: set[str] = set()  # contexts whose pending tasks all need their restrictions re-applied
        self._fresh: dict[str, set] = defaultdict(set)  # context -> new keys not restricted yet
        self._replan_soon = False  # a re-plan is scheduled for the next loop iteration
        self._replan_later: asyncio.TimerHandle | None = None  # the deferred re-plan after submits
        self._last_replan = -math.inf  # monotonic time of the last re-plan
        self._dry: set[str] = set()  # workers with a free thread to check for tail rebalancing (next iteration)
        self.transfer: SourceCoordinator | None = None  # who copies context files from whom

    # -- lifecycle -----------------------------------------------------------
    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.transfer = SourceCoordinator(scheduler, self.warm, self.settings.transfer)
        self.transfer.start()
        # Workers may hold contexts already (plugin registered after the worker plugin).
        if PLUGIN_NAME in scheduler.worker_plugins:
            replies = await scheduler.broadcast(msg={"op": WorkerHandler.STATE.value}, on_error="return")
            for addr, reply in replies.items():
                if isinstance(reply, dict) and addr in scheduler.workers:
                    self._ingest_budget(addr, reply)
                    for row in reply.get("contexts", ()):
                        self._ingest_state(addr, row)
        from .dashboard import add_dashboard_page
        from .metrics import register_metrics

        register_metrics(scheduler, self)
        add_dashboard_page(scheduler, self)
        self._callback = PeriodicCallback(self._tick, self.settings.interval * 1000)
        self._callback.start()

    async def close(self) -> None:
        from .metrics import unregister_metrics

        unregister_metrics(self)
        if self.transfer is not None:
            self.transfer.close()
        if self._callback is not None:
            self._callback.stop()
        if self._replan_later is not None:
            self._replan_later.cancel()
        for t in list(self._background):
            t.cancel()

    # -- what workers tell us --------------------------------------------------
    def log_event(self, topic: str, msg: Any) -> None:
        if topic == "stealing":
            # A confirmed steal moves a task between workers without a transition.
            if isinstance(msg, (list, tuple)) and len(msg) > 4 and msg[0] == STEAL_CONFIRM:
                self.queues.move(msg[1], msg[4])
            return
        if not isinstance(msg, dict):
            return
        if topic != EVENT_TOPIC:
            # Dask logs every worker status change under the worker's address.
            if msg.get("action") == DASK_STATUS_CHANGE and self.scheduler is not None:
                self._status_changed(topic, msg)
            return
        action = msg.get("action")
        worker = msg.get("worker")
        if worker is None or self.scheduler is None or worker not in self.scheduler.workers:
            return
        if action == Action.WORKER_BUDGET:
            self._ingest_budget(worker, msg)
        elif action == Action.CONTEXT_STATE:
            self._ingest_state(worker, msg)

    def _ingest_budget(self, worker: str, msg: dict) -> None:
        budgets = (msg.get("max_bytes"), msg.get("device_max_bytes"))
        if self.budgets.get(worker) != budgets:
            for plan in self.plans.values():
                plan.fit_checked = None  # a member's budget may have shrunk below the context
        self.budgets[worker] = budgets
        if msg.get("peers", True):
            self.no_peers.discard(worker)
        else:
            self.no_peers.add(worker)
        self._touch_worker(worker)

    def _ingest_state(self, worker: str, msg: dict) -> None:
        name = msg["context"]
        plan = self._plan_for(name)
        wc = self.warm[name].setdefault(worker, WorkerContext())
        self._touch_worker(worker, name)
        previous_loads = wc.loads
        previous_state = wc.state
        state = State(msg["state"])
        if state in WARMING_STATES and wc.state not in WARMING_STATES:
            wc.loading_since = time.monotonic()
            wc.holder_at_start = self._copy_source_alive(name, exclude=worker)
        elif state is State.RESIDENT and wc.state is not State.RESIDENT:
            wc.resident_since = time.monotonic()
        wc.state = state
        if state is State.RESIDENT:
            plan.resident.add(worker)
        else:
            plan.resident.discard(worker)
        wc.files = bool(msg.get("files"))
        wc.loads = msg.get("loads", wc.loads)
        declared = msg.get("declared_bytes")
        if declared and plan.size is None:  # known before the first load: placement avoids too small workers
            plan.size = (int(declared[0]), int(declared[1]))
            if plan.pending:
                self._stale.add(name)
                self._schedule_replan()
        if wc.state is State.RESIDENT:
            plan.last_used = time.monotonic()
            wc.host_bytes, wc.device_bytes = msg.get("host_bytes", 0), msg.get("device_bytes", 0)
            plan.size = (wc.host_bytes, wc.device_bytes)
            if wc.loads > previous_loads and msg.get("last_load_seconds"):
                self._observe_load(plan, worker, wc, msg)
        elif wc.state is State.FAILED:
            wc.failed_at = time.monotonic()
            if len(plan.members) > 1 and worker in plan.members:
                plan.members.discard(worker)
                self._stale.add(name)  # its tasks are still restricted to the old set
        elif wc.state is State.EVICTED and len(plan.members) > 1 and worker in plan.members:
            # Memory pressure pushed it out: stop sending its tasks there.
            plan.members.discard(worker)
            self._stale.add(name)
        if plan.pending and wc.state is State.RESIDENT and previous_state is not State.RESIDENT:
            self._rebalance_soon(worker)  # warm now: may take queued work from other members
        if plan.pending and wc.state != previous_state and wc.state in (State.RESIDENT, State.FAILED, State.EVICTED):
            # A worker just became warm (a free member, or the set can grow) or stopped being
            # one: re-plan now rather than at the next tick, so queued tasks use it at once.
            self._schedule_replan()

    def _schedule_replan(self) -> None:
        """Re-plan once on the next loop iteration (a burst of worker events costs one plan)."""
        if self._replan_soon:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the scheduler's loop (tests)
            self.replan(f"pervasive-state-{time.time()}")
            return
        self._replan_soon = True
        loop.call_soon(self._replan_now)

    def _replan_now(self) -> None:
        self._replan_soon = False
        if any(p.pending for p in self.plans.values()):
            self.replan(f"pervasive-state-{time.time()}")

    def _replan_for_submit(self, stimulus_id: str) -> None:
        """New tasks arrived: restrict them, re-planning at most every ``_SUBMIT_REPLAN_GAP`` seconds.

        One-by-one submits are one ``update_graph`` each: re-planning on every
        one is most of our time in the scheduler (and its allocations feed
        the garbage collector's full passes). In between, new tasks go to the
        current set and the re-plan follows within the gap. A new context
        (no set yet) or stale restrictions re-plan at once.
        """
        now = time.monotonic()
        wait = _SUBMIT_REPLAN_GAP - (now - self._last_replan)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the scheduler's loop (tests of the hooks alone)
            loop = None
        if loop is None or wait <= 0 or self._stale or any(not self.plans[name].members for name in self._fresh):
            self.replan(stimulus_id)  # restricts the new tasks, and older ones only of sets that changed
            return
        for name, keys in self._fresh.items():
            self._apply(self.plans[name], stimulus_id, keys)
        self._fresh.clear()
        self._replan_after(wait)

    def _replan_after(self, seconds: float) -> None:
        """Re-plan in ``seconds``, or sooner when a deferred re-plan is already due sooner (one timer)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the scheduler's loop (tests of the hooks alone): the tick re-plans
            return
        when = loop.time() + max(seconds, 0.0)
        if self._replan_later is not None:
            if self._replan_later.when() <= when:
                return
            self._replan_later.cancel()  # a submit's re-plan must not wait for a settling backlog's
        self._replan_later = loop.call_at(when, self._replan_deferred)

    def _replan_deferred(self) -> None:
        self._replan_later = None
        self._replan_now()

    def _rebalance_soon(self, worker: str) -> None:
        """Check ``worker`` for a free thread on the next loop iteration (a burst of finishes costs one check)."""
        if not self._dry:
            try:
                asyncio.get_running_loop().call_soon(self._rebalance)
            except RuntimeError:  # outside the scheduler's loop (tests of the hooks alone)
                return
        self._dry.add(worker)

    def _rebalance(self) -> None:
        """Members with a free thread take queued tasks of their sets (:func:`~dask_pervasive._queues.rebalance`)."""
        dry, self._dry = self._dry, set()
        if self.scheduler is not None:
            rebalance(self.scheduler, self.queues, self.plans, self.warm, dry)

    def _plan_for(self, name: str) -> ContextPlan:
        plan = self.plans.get(name)
        if plan is None:
            plan = self.plans[name] = ContextPlan(name)
        return plan

    # -- graph and task hooks ------------------------------------------------------
    def update_graph(
        self,
        scheduler: Scheduler,
        *,
        tasks: list | None = None,
        annotations: dict | None = None,
        stimulus_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        by_annotation = (annotations or {}).get("context", {})
        bad_annotations: list = []
        found = False
        for key in tasks or ():
            ts = scheduler.tasks.get(key)
            if ts is None or ts.state not in PLACEABLE:
                continue
            name = by_annotation.get(key)
            if name is not None and not isinstance(name, str):
                # Ignored for placement (get_context() without a name fails in the task
                # with ContextUsageError); never let it reach the plans.
                bad_annotations.append((key, name))
                name = None
            if name is None:
                name = find_context(ts.run_spec)
            # User restrictions win over ours.
            if not isinstance(name, str) or ts.worker_restrictions or ts.host_restrictions or ts.resource_restrictions:
                continue
            self.task_context[key] = name
            self._plan_for(name).add_pending(key, ts.prefix)
            self._fresh[name].add(key)
            found = True
        if bad_annotations:
            key, value = bad_annotations[0]
            logger.warning(
                "pervasive: %d task(s) have a context annotation that is not a string (e.g. %r on %r); "
                "ignored for placement, and get_context() without a name fails in them. "
                "Use dask.annotate(context='<name>')",
                len(bad_annotations),
                value,
                key,
            )
        if found:
            now = time.monotonic()
            for name in self._fresh:
                self.plans[name].last_used = now
            self._check_worker_plugin(scheduler)
            self._replan_for_submit(stimulus_id or f"pervasive-update-graph-{time.time()}")

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        name = self.task_context.get(key)
        if name is None:
            return
        plan = self.plans[name]
        if finish == "processing":
            ts = self.scheduler.tasks.get(key) if self.scheduler is not None else None
            if ts is not None and ts.processing_on is not None:
                self.queues.add(key, ts.processing_on.address, name)
        elif start == "processing":
            worker = self.queues.discard(key)
            if worker is not None and plan.pending:
                self._rebalance_soon(worker)
        if finish in ("memory", "erred"):
            plan.discard_pending(key)
            if finish == "memory":
                self._observe_finished(key, kwargs.get("worker"), kwargs.get("startstops"))
            plan.last_used = time.monotonic()
        elif finish == "forgotten":
            plan.discard_pending(key)
            del self.task_context[key]
            fresh = self._fresh.get(name)
            if fresh:
                fresh.discard(key)
        elif key not in plan.pending and finish in ("waiting", "no-worker", "processing"):
            # Computed before, now again: its result was lost with a worker.
            ts = self.scheduler.tasks.get(key) if self.scheduler is not None else None
            if ts is not None:
                plan.add_pending(key, ts.prefix)
            self._stale.add(name)

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        # Fallback for tasks left without a valid worker (see remove_worker).
        if any(p.pending for p in self.plans.values()):
            self._mark_unrunnable()
            self.replan(f"pervasive-add-worker-{time.time()}")

    def remove_worker(self, scheduler: Scheduler, worker: str, *, stimulus_id: str, **kwargs: Any) -> None:
        if self.transfer is not None:
            self.transfer.remove_worker(worker)  # frees its upload / origin slots
        self.budgets.pop(worker, None)
        self._forget_worker(worker)
        for states in self.warm.values():
            states.pop(worker, None)
        lost = [p.name for p in self.plans.values() if worker in p.members]
        for plan in self.plans.values():
            plan.members.discard(worker)
            plan.resident.discard(worker)
        if lost:
            scheduler.log_event(EVENT_TOPIC, {"action": Action.WORKER_LOST.value, "worker": worker, "contexts": lost})
            self._stale.update(lost)  # their tasks still name the dead worker
        if any(p.pending for p in self.plans.values()):
            # Dask already moved tasks restricted to it alone to no-worker: revive them.
            self._mark_unrunnable()
            self.replan(stimulus_id)

    # -- scaling down ----------------------------------------------------------------------
    def valid_workers_downscaling(self, scheduler: Scheduler, workers: list[WorkerState]) -> list[WorkerState]:
        """Dask's hook in ``workers_to_close``: keep warm workers of contexts in demand.

        Removes the last warm worker of each context with pending tasks (or used
        within ``pervasive.scheduler.keep-warm``) from the candidates and orders
        the rest so that, where Dask ranks workers equal, cold ones go first
        (:func:`dask_pervasive._retirement.retirement_candidates`). On any
        error Dask's own candidates are returned unchanged.
        """
        try:
            if not any(self.warm.values()):
                return workers  # a plain cluster, or nothing warm yet
            now = time.monotonic()
            keep_warm = self.settings.keep_warm
            demand = {name for name, plan in self.plans.items() if plan.pending or now - plan.last_used < keep_warm}
            staying = {addr for addr, ws in scheduler.workers.items() if not is_leaving(ws)}
            members = {name: plan.members for name, plan in self.plans.items()}
            chosen = retirement_candidates(workers, staying, self.warm, demand, members)
            kept = {ws.address for ws in workers} - {ws.address for ws in chosen}
            if kept:
                logger.debug("pervasive: keeping warm workers %s when scaling down", sorted(kept))
            return chosen
        except Exception:  # never break Dask's scale-down
            logger.warning("pervasive: context-aware retirement failed; using Dask's choice", exc_info=True)
            return workers

    def _status_changed(self, worker: str, msg: dict) -> None:
        """A worker starting to leave takes no new context tasks; its queued ones are re-targeted."""
        status = msg.get("status")
        if status not in LEAVING_STATUSES or worker not in self.scheduler.workers:
            return
        held = sorted(n for n, states in self.warm.items() if (wc := states.get(worker)) and wc.state in HOLDING_STATES)
        lost = sorted(p.name for p in self.plans.values() if worker in p.members)
        for name in lost:
            self.plans[name].members.discard(worker)
        self._stale.update(lost)
        self.scheduler.log_event(
            EVENT_TOPIC,
            {
                "action": Action.WORKER_LEAVING.value,
                "worker": worker,
                "status": status,
                "contexts": held,
                "affinity": lost,
            },
        )
        if lost and any(self.plans[n].pending for n in lost):
            self._schedule_replan()

    def _tick(self) -> None:
        if any(p.pending for p in self.plans.values()):
            self._mark_unrunnable()  # safety net: nothing of ours stays in no-worker for long
            self.replan(f"pervasive-tick-{time.time()}")

    def _mark_unrunnable(self) -> None:
        """Contexts with tasks Dask left without a valid worker get their set re-applied."""
        assert self.scheduler is not None
        for ts in self.scheduler.unrunnable:
            name = self.task_context.get(ts.key)
            if name is not None:
                self._stale.add(name)

    def _check_worker_plugin(self, scheduler: Scheduler) -> None:
        # Workers set up by --preload have the plugin without it being in worker_plugins:
        # their budget events tell us they are there.
        if PLUGIN_NAME not in scheduler.worker_plugins and not self.budgets and not self._warned_no_worker_plugin:
            self._warned_no_worker_plugin = True
            logger.warning(
                "pervasive: context tasks were submitted but ContextWorkerPlugin is not "
                "registered; they will fail on workers. Use dask_pervasive.install(client, contexts)."
            )

    def _prewarm_soon(self, addr: str, name: str) -> None:
        """Load ``name`` on ``addr`` now rather than with its first task (see ``_add_member``)."""
        self._spawn(self._prewarm(addr, name))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _prewarm(self, addr: str, name: str) -> None:
        assert self.scheduler is not None
        try:
            await getattr(self.scheduler.rpc(addr), WorkerHandler.PREWARM.value)(name=name)
        except Exception as exc:  # noqa: BLE001 - the worker may have left; tasks still load on demand
            logger.info("pervasive: prewarm of %r on %s did not happen: %s", name, addr, exc)
