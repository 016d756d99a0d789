"""Planner inputs: the scheduler plugin's state turned into the joint planner's views.

:class:`PlannerInputs` (a mixin of :class:`~dask_pervasive.ContextSchedulerPlugin`,
through :class:`~dask_pervasive._placement.PlacementPlanner`) measures what the
planner needs that workers do not report directly (per-worker task speed and
load factor, from finished tasks and loads; the records are in
:mod:`dask_pervasive._measures`) and builds the
:class:`~dask_pervasive._planner.WorkerView` and
:class:`~dask_pervasive._planner.ContextView` of one plan.

Cost per plan: ``O(C)`` context views (task time from the pending tasks'
prefixes, counted as tasks come and go, one lookup per prefix; whether a complete copy of a
context's files is alive stops at the first holder found; while a prefix has
no duration yet, one ``O(W × threads)`` pass over the running tasks serves every
context), and ``O(W)`` worker
views of which only those whose worker reported since the last plan (or
with a recent failure, which expires) are rebuilt, each in ``O(h)``
(contexts it holds). A running load is passed as its start time, so a loading
worker's view stays valid. What is queued where is not in the views: the
planner reads :attr:`~dask_pervasive._queues.WorkerQueues.tasks` (kept
incrementally, never from a scan of the tasks) in a
:class:`~dask_pervasive._planner.QueuedWork`, with each worker's plain-task
seconds (``O(1)`` per worker without plain tasks, ``O(q)`` with).
Tasks start and end on many workers between two plans at 200 workers;
rebuilding their views for that was most of a slow re-plan.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._measures import ContextPlan, WorkerContext, WorkerRates, ewma, fetch_source
from ._planner import ContextView, Holding, QueuedWork, WorkerView
from ._protocol import WARMING_STATES, State
from ._queues import WorkerQueues

if TYPE_CHECKING:
    from distributed import Scheduler

    from ._settings import SchedulerSettings
    from .transfer import SourceCoordinator

_SPEED_EWMA = 0.2  #: task times are noisy: a slower average than for loads
_SPEED_TOLERANCE = 0.1  #: a worker's view is rebuilt when its speed moved more than this
_MIN_TIMED = 5e-3  #: seconds: tasks shorter than this do not measure speeds


class PlannerInputs:
    """Measurements and planner views over the plugin's ``plans``, ``warm``, ``budgets`` and ``scheduler``."""

    scheduler: Scheduler | None
    settings: SchedulerSettings
    plans: dict[str, ContextPlan]
    warm: dict[str, dict[str, WorkerContext]]
    budgets: dict[str, tuple[int | None, int | None]]
    no_peers: set[str]
    transfer: SourceCoordinator | None
    _schedule_replan: Callable[[], None]  #: the plugin's: re-plan on the next loop iteration

    def __init__(self) -> None:
        super().__init__()
        self.rates: dict[str, WorkerRates] = {}  #: per worker: measured task speed and load factor
        #: our tasks in ``processing`` per worker and context (kept from transitions and steals)
        self.queues = WorkerQueues()
        self._reports: dict[str, int] = {}  #: per worker: reports so far (a view is rebuilt when it changes)
        #: per worker: (reports when built, its view); a view with a recent failure is rebuilt at every plan
        self._views: dict[str, tuple[int, WorkerView]] = {}
        #: per worker: the contexts it holds something of (what a view is built from)
        self._held: dict[str, dict[str, WorkerContext]] = {}
        #: per worker: contexts it reported since its view was built (a rebuild keeps the other holdings)
        self._reported: dict[str, set[str]] = {}
        self._prefix_seconds: dict[str, list] = {}  #: prefix name -> [compute seconds, tasks] finished
        #: per prefix: the longest a task has computed so far (one lookup per re-plan; None: not yet)
        self._running_memo: dict[Any, float] | None = None

    # -- per-worker measurements ------------------------------------------------------
    def _touch_worker(self, addr: str, name: str | None = None) -> None:
        """``addr`` reported something (a context state, its budget): rebuild its view at the next plan."""
        self._reports[addr] = self._reports.get(addr, 0) + 1
        if name is not None:
            # Every change to a worker's WorkerContext of ``name`` comes with this call.
            self._reported.setdefault(addr, set()).add(name)
            wc = self.warm.get(name, {}).get(addr)
            if wc is not None:
                self._held.setdefault(addr, {})[name] = wc

    def _forget_worker(self, addr: str) -> None:
        for part in (self._reports, self._views, self._held, self._reported):
            part.pop(addr, None)
        self.rates.pop(addr, None)
        self.no_peers.discard(addr)
        self.queues.forget_worker(addr)

    def _observe_load(self, plan: ContextPlan, addr: str, wc: WorkerContext, msg: dict) -> None:
        """A load of ``plan`` on ``addr`` finished (``msg``: the worker's state event).

        Its load factor compares it with what a load from the same kind of
        source took elsewhere, before this one counts in the context's figures.
        """
        seconds, fetch = msg["last_load_seconds"], msg.get("last_fetch_seconds", 0.0)
        source = fetch_source(
            msg.get("last_fetch_origin_bytes", 0), msg.get("last_fetch_peer_bytes", 0), wc.holder_at_start
        )
        expected = plan.expected_load_seconds(source)
        if expected:
            r = self.rates.setdefault(addr, WorkerRates())
            r.load_factor = ewma(r.load_factor if r.loads else None, seconds / expected)
            r.loads += 1
        wc.load_seconds = ewma(wc.load_seconds, seconds)
        plan.observe_load(seconds, fetch, source)
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
            if plan.pending:
                self._schedule_replan()
        compute = sum(s["stop"] - s["start"] for s in startstops if s.get("action") == "compute")
        if compute <= _MIN_TIMED:
            return  # too short to tell speeds apart from scheduling noise
        # Against the running mean of the prefix over all workers (Dask's own average follows the
        # latest tasks, so it swings between fast and slow workers).
        total = self._prefix_seconds.get(ts.prefix.name)
        if total is None:
            total = self._prefix_seconds[ts.prefix.name] = [0.0, 0]
        total[0] += compute
        total[1] += 1
        average = self._measured_seconds(ts.prefix.name)
        r = self.rates.setdefault(worker, WorkerRates())
        r.speed = ewma(r.speed if r.tasks else None, min(max(compute / average, 0.1), 10.0), _SPEED_EWMA)
        r.tasks += 1
        if abs(r.speed - r.planned_speed) > _SPEED_TOLERANCE * r.planned_speed:
            r.planned_speed = r.speed
            self._touch_worker(worker)

    # -- views -------------------------------------------------------------------------
    def _holding(self, wc: WorkerContext, now: float) -> Holding:
        failed = (
            wc.state is State.FAILED
            and wc.failed_at is not None
            and now - wc.failed_at < self.settings.retry_failed_after
        )
        resident = wc.state is State.RESIDENT
        return Holding(
            state=wc.state.value,
            files=wc.files,
            loading_since=wc.loading_since if wc.state in WARMING_STATES else None,
            load_seconds=wc.load_seconds,
            host_bytes=wc.host_bytes if resident else None,
            device_bytes=wc.device_bytes if resident else None,
            failed_recently=failed,
        )

    def _worker_views(self, now: float) -> list[WorkerView]:
        """Views of the running workers; those that did not report since the last plan come from the cache.

        A view with a recent failure is rebuilt at every plan (the failure expires).
        A rebuilt view keeps the holdings of contexts the worker did not report
        since (when many workers report at once, as when their loads end
        together, rebuilding every holding was most of a slow re-plan).
        """
        assert self.scheduler is not None
        reports, views, by_worker = self._reports, self._views, self._held
        out = []
        for ws in self.scheduler.running:
            addr = ws.address
            reported = reports.get(addr, 0)
            cached = views.get(addr)
            if cached is not None and cached[0] == reported and not cached[1].failed:
                out.append(cached[1])  # the same object: the planner keeps what it derived from it
                continue
            before = cached[1].contexts if cached is not None else {}
            changed = self._reported.pop(addr, ())
            contexts = {}
            held = by_worker.get(addr, {})
            nothing = []
            for name, wc in held.items():
                if wc.state is State.ABSENT and not wc.files:
                    nothing.append(name)
                    continue
                h = before.get(name)
                if h is None or h.failed_recently or name in changed:
                    h = self._holding(wc, now)
                contexts[name] = h
            for name in nothing:  # its next report puts it back (_touch_worker): rebuilds stay O(held)
                del held[name]
            r = self.rates.get(addr)
            host_budget, device_budget = self.budgets.get(addr, (None, None))
            view = WorkerView(
                addr,
                nthreads=ws.nthreads,
                speed=r.planned_speed if r is not None else 1.0,
                load_factor=r.load_factor if r is not None else 1.0,
                host_budget=host_budget,
                device_budget=device_budget,
                peers=addr not in self.no_peers,
                contexts=contexts,
            )
            views[addr] = (reported, view)
            out.append(view)
        return out

    def _queued_work(self, task_seconds: dict[str, float]) -> QueuedWork:
        """What each running worker already has: our tasks per context, and its plain tasks' seconds.

        Plain seconds are Dask's occupancy (estimated seconds of all its
        processing tasks) less ours at ``task_seconds``; only a worker with
        more tasks in ``processing`` than ours has any.
        """
        assert self.scheduler is not None
        queues = self.queues
        tasks = queues.tasks
        plain: dict[str, float] = {}
        for ws in self.scheduler.running:
            addr = ws.address
            if len(ws.processing) > queues.total(addr):
                ours = sum(n * task_seconds.get(name, 0.0) for name, n in tasks.get(addr, {}).items())
                if ws.occupancy > ours:
                    plain[addr] = ws.occupancy - ours
        return QueuedWork(tasks, plain)

    def _context_views(self, now: float) -> list[ContextView]:
        out = []
        self._running_memo = None  # tasks' running times, looked up once per re-plan if needed
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
                    load_seconds=plan.origin_load_seconds(),
                    fetch_seconds=plan.origin_fetch_seconds
                    if plan.origin_fetch_seconds is not None
                    else plan.fetch_seconds,
                    setup_seconds=plan.setup_seconds,
                    peer_load_seconds=self._peer_load_seconds(plan),
                    size=plan.size,
                    members=frozenset(plan.members),
                    demand_seconds=now - plan.demand_since if plan.demand_since is not None else math.inf,
                )
            )
        return out

    def _peer_load_seconds(self, plan: ContextPlan) -> float | None:
        """A cold load of ``plan`` copying from a peer, while one holds a complete copy; else None.

        The cheap checks come first: a context without files (no manifest) never scans its holders.
        """
        prior = None if plan.peer_fetch_seconds is not None else self._peer_fetch_prior(plan.name)
        seconds = plan.peer_load_seconds(prior)
        return seconds if seconds is not None and self._copy_source_alive(plan.name) else None

    def _copy_source_alive(self, name: str, exclude: str | None = None) -> bool:
        """Whether a worker (other than ``exclude``) the coordinator would hand out as a copy source holds ``name``."""
        return self.transfer is not None and any(w != exclude for w in self.transfer.holders(name))

    def _peer_fetch_prior(self, name: str) -> float | None:
        """Seconds a peer copy should take before one was timed: the files' bytes at Dask's measured
        worker-to-worker bandwidth (``distributed.scheduler.bandwidth`` until transfers refine it)."""
        assert self.scheduler is not None
        known = self.transfer.manifests.get(name) if self.transfer is not None else None
        if known is None:
            return None
        size = sum(int(meta.get("size", 0)) for meta in known[2].get("files", {}).values())
        return size / max(float(self.scheduler.bandwidth), 1.0)

    def _task_seconds(self, plan: ContextPlan) -> float:
        """Mean seconds per pending task of ``plan``: one figure per task prefix, weighted by its count.

        A prefix with finished tasks timed here uses their mean compute time
        (load time excluded by the worker plugins): the figure workers'
        speeds are measured against, so work and rates are in the same unit.
        Dask's own per-prefix average moves halfway to every finished task,
        so with slow and fast workers it follows whichever finished last (a
        2× slower half made it 0.4 s for tasks that mostly took 0.2 s, and
        warmed workers late in a backlog). Without that mean (no task
        finished yet, or tasks too short to time), Dask's average serves
        (``distributed.scheduler.default-task-durations`` declares one up
        front); without either, see :meth:`_untimed_seconds`.
        ``O(prefixes)``: the counts are kept as tasks come and go
        (:meth:`ContextPlan.add_pending`).
        """
        total = 0.0
        counted = 0
        for prefix, n in plan.pending_prefixes.items():
            d = self._measured_seconds(prefix.name)
            if d is None:
                d = prefix.duration_average
                if d < 0:
                    d = self._untimed_seconds(plan, prefix)
            total += n * d
            counted += n
        return total / counted if counted else 0.0

    def _untimed_seconds(self, plan: ContextPlan, prefix: Any) -> float:
        """Estimated seconds per task of a prefix with no timed task and no duration average in Dask.

        Dask forgets a prefix's average (sets it to -1) whenever a running
        task has been executing over twice as long, which every task that
        waits for its context's load does; a prefix with timed tasks keeps
        their mean before this is asked (:meth:`_task_seconds`).

        A prefix that no task has finished yet: while no worker holds the
        context resident nothing can time it, so Dask's own prior
        (``distributed.scheduler.unknown-task-duration``, 0.5 s by default)
        stands in: a large backlog then warms several workers side by side
        instead of one load after another. Once one is resident (the
        planner gives it the tasks first) its first task is about to give
        the real figure, so the longest elapsed time of the prefix's tasks
        running on workers where their context is resident (any context's:
        see :meth:`_running_seconds`) is used, counted from when it became
        resident (a task that waited for the load has run longer than it
        computed): a lower bound that grows while they run, which keeps a
        warm worker's few short tasks from warming others.
        """
        assert self.scheduler is not None
        running = self._running_seconds()
        if prefix in running:
            return running[prefix]
        if plan.resident:  # O(1): a scan of the warm map here was O(workers) per context and plan
            return 0.0  # its first task is about to start there
        return float(self.scheduler.UNKNOWN_TASK_DURATION)

    def _measured_seconds(self, prefix_name: str) -> float | None:
        """Mean compute seconds of the prefix's finished tasks (load time excluded); None before one."""
        total = self._prefix_seconds.get(prefix_name)
        return total[0] / total[1] if total and total[1] else None

    def _running_seconds(self) -> dict[Any, float]:
        """Per prefix, the longest a task has computed so far where its context is resident; once per re-plan.

        Over all contexts, so contexts whose tasks share a prefix (one
        function, several models) see one figure: otherwise those with a
        resident worker would see a lower bound and the others Dask's prior,
        and the others would warm workers the first ones then need.
        """
        memo = self._running_memo
        if memo is not None:
            return memo
        assert self.scheduler is not None
        now = time.monotonic()
        running: dict[Any, float] = {}
        for ws in self.scheduler.workers.values():
            for ts, elapsed in ws.executing.items():
                wc = self.warm.get(self.task_context.get(ts.key, ""), {}).get(ws.address)
                if wc is None or wc.state is not State.RESIDENT:
                    continue  # still loading: elapsed time is load time, not task time
                seconds = min(elapsed, now - wc.resident_since)
                if seconds > running.get(ts.prefix, -1.0):
                    running[ts.prefix] = seconds
        self._running_memo = running
        return running
