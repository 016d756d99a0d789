"""The scheduler half: :class:`ContextSchedulerPlugin` steers context tasks to warm workers.

Each context with pending tasks has an *affinity set*: workers where it is
resident plus cold workers the plugin chose to warm. Its tasks get strict
worker restrictions to that set, so Dask's own ``decide_worker`` and work
stealing balance load *inside* the set (stealing never moves them out, which
loose restrictions would allow). The set grows while the expected finish time
of the backlog on it exceeds the cost of warming another worker, only onto
workers with room in their memory budget, and is re-planned when workers
leave, contexts fail or get evicted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from .task import context_of
from .transfer import SourceCoordinator
from .worker import EVENT_TOPIC, PLUGIN_NAME

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState, WorkerState

logger = logging.getLogger(__name__)

#: Task states whose restrictions we may still change.
_PLACEABLE = ("released", "waiting", "no-worker", "processing")
_DONE = ("memory", "erred", "forgotten")
_EWMA = 0.5


@dataclass
class WorkerContext:
    """One context on one worker, as the scheduler last heard of it."""

    state: str = "absent"
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


def _find_context(run_spec: Any, budget: int = 64) -> str | None:
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


class ContextSchedulerPlugin(SchedulerPlugin):
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
        cfg = dask.config.get("pervasive.scheduler")
        self.prewarm = bool(cfg["prewarm"] if prewarm is None else prewarm)
        self.prewarm_backlog = int(cfg["prewarm-backlog"] if prewarm_backlog is None else prewarm_backlog)
        self.default_load_seconds = float(
            cfg["default-load-seconds"] if default_load_seconds is None else default_load_seconds
        )
        self.interval = parse_timedelta(cfg["interval"] if interval is None else interval)
        self.retry_failed_after = parse_timedelta(dask.config.get("pervasive.worker.retry-failed-after"))
        self.plans: dict[str, ContextPlan] = {}
        self.warm: dict[str, dict[str, WorkerContext]] = defaultdict(dict)  # context -> worker -> state
        self.budgets: dict[str, tuple[int | None, int | None]] = {}
        self.task_context: dict[Any, str] = {}
        self.scheduler: Scheduler | None = None
        self._callback: PeriodicCallback | None = None
        self._background: set[asyncio.Task] = set()
        self._warned_no_worker_plugin = False
        self._stale: set[str] = set()  # contexts whose pending tasks all need their restrictions re-applied
        self._fresh: dict[str, set] = defaultdict(set)  # context -> new keys not restricted yet
        self._replan_soon = False  # a re-plan is scheduled for the next loop iteration
        self.transfer: SourceCoordinator | None = None  # who copies context files from whom

    # -- lifecycle -----------------------------------------------------------
    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.transfer = SourceCoordinator(scheduler, self.warm)
        self.transfer.start()
        # Workers may hold contexts already (plugin registered after the worker plugin).
        if PLUGIN_NAME in scheduler.worker_plugins:
            replies = await scheduler.broadcast(msg={"op": "pervasive_state"}, on_error="return")
            for addr, reply in replies.items():
                if isinstance(reply, dict) and addr in scheduler.workers:
                    self.budgets[addr] = (reply.get("max_bytes"), reply.get("device_max_bytes"))
                    for row in reply.get("contexts", ()):
                        self._ingest_state(addr, row)
        from .dashboard import add_dashboard_page
        from .metrics import register_metrics

        register_metrics(scheduler, self)
        add_dashboard_page(scheduler, self)
        self._callback = PeriodicCallback(self._tick, self.interval * 1000)
        self._callback.start()

    async def close(self) -> None:
        from .metrics import unregister_metrics

        unregister_metrics(self)
        if self.transfer is not None:
            self.transfer.close()
        if self._callback is not None:
            self._callback.stop()
        for t in list(self._background):
            t.cancel()

    # -- what workers tell us --------------------------------------------------
    def log_event(self, topic: str, msg: Any) -> None:
        if topic != EVENT_TOPIC or not isinstance(msg, dict):
            return
        action = msg.get("action")
        worker = msg.get("worker")
        if worker is None or self.scheduler is None or worker not in self.scheduler.workers:
            return
        if action == "worker-budget":
            self.budgets[worker] = (msg.get("max_bytes"), msg.get("device_max_bytes"))
        elif action == "context-state":
            self._ingest_state(worker, msg)

    def _ingest_state(self, worker: str, msg: dict) -> None:
        name = msg["context"]
        plan = self._plan_for(name)
        wc = self.warm[name].setdefault(worker, WorkerContext())
        previous_loads = wc.loads
        previous_state = wc.state
        if msg["state"] in ("fetching", "loading") and wc.state not in ("fetching", "loading"):
            wc.loading_since = time.monotonic()
        wc.state = msg["state"]
        wc.files = bool(msg.get("files"))
        wc.loads = msg.get("loads", wc.loads)
        if wc.state == "resident":
            wc.host_bytes, wc.device_bytes = msg.get("host_bytes", 0), msg.get("device_bytes", 0)
            plan.size = (wc.host_bytes, wc.device_bytes)
            if wc.loads > previous_loads and msg.get("last_load_seconds"):
                plan.load_seconds = _ewma(plan.load_seconds, msg["last_load_seconds"])
                plan.fetch_seconds = _ewma(plan.fetch_seconds, msg.get("last_fetch_seconds", 0.0))
        elif wc.state == "failed":
            wc.failed_at = time.monotonic()
            if len(plan.members) > 1 and worker in plan.members:
                plan.members.discard(worker)
                self._stale.add(name)  # its tasks are still restricted to the old set
        elif wc.state == "evicted" and len(plan.members) > 1 and worker in plan.members:
            # Memory pressure pushed it out: stop sending its tasks there.
            plan.members.discard(worker)
            self._stale.add(name)
        if plan.pending and wc.state != previous_state and wc.state in ("resident", "failed", "evicted"):
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
            if ts is None or ts.state not in _PLACEABLE:
                continue
            name = by_annotation.get(key)
            if name is not None and not isinstance(name, str):
                # Ignored for placement (get_context() without a name fails in the task
                # with ContextUsageError); never let it reach the plans.
                bad_annotations.append((key, name))
                name = None
            if name is None:
                name = _find_context(ts.run_spec)
            # User restrictions win over ours.
            if not isinstance(name, str) or ts.worker_restrictions or ts.host_restrictions or ts.resource_restrictions:
                continue
            self.task_context[key] = name
            self._plan_for(name).pending.add(key)
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
            self._check_worker_plugin(scheduler)
            # Restricts the new tasks, and the older ones only of sets that changed.
            self.replan(stimulus_id or f"pervasive-update-graph-{time.time()}")

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        name = self.task_context.get(key)
        if name is None:
            return
        plan = self.plans[name]
        if finish in ("memory", "erred"):
            plan.pending.discard(key)
        elif finish == "forgotten":
            plan.pending.discard(key)
            del self.task_context[key]
            fresh = self._fresh.get(name)
            if fresh:
                fresh.discard(key)
        elif key not in plan.pending and finish in ("waiting", "no-worker", "processing"):
            # Computed before, now again: its result was lost with a worker.
            plan.pending.add(key)
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
        for states in self.warm.values():
            states.pop(worker, None)
        lost = [p.name for p in self.plans.values() if worker in p.members]
        for plan in self.plans.values():
            plan.members.discard(worker)
        if lost:
            scheduler.log_event(EVENT_TOPIC, {"action": "worker-lost", "worker": worker, "contexts": lost})
            self._stale.update(lost)  # their tasks still name the dead worker
        if any(p.pending for p in self.plans.values()):
            # Dask already moved tasks restricted to it alone to no-worker: revive them.
            self._mark_unrunnable()
            self.replan(stimulus_id)

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

    # -- planning ----------------------------------------------------------------------
    def _ready_time(self, plan: ContextPlan, addr: str) -> float:
        """Seconds until ``addr`` could run tasks of ``plan``."""
        wc = self.warm[plan.name].get(addr)
        load = plan.load_seconds if plan.load_seconds is not None else self.default_load_seconds
        if wc is None:
            return load
        if wc.state == "resident":
            return 0.0
        if wc.state in ("fetching", "loading"):
            return max(0.0, load - (time.monotonic() - wc.loading_since))
        if wc.files:
            return max(0.0, load - (plan.fetch_seconds or 0.0))
        return load

    def _holds(self, plan: ContextPlan, addr: str) -> bool:
        wc = self.warm[plan.name].get(addr)
        return addr in plan.members or (wc is not None and wc.state in ("resident", "loading", "fetching"))

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
            and wc.state == "failed"
            and wc.failed_at is not None
            and time.monotonic() - wc.failed_at < self.retry_failed_after
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
                if len(plan.pending) <= self.prewarm_backlog * len(plan.members):
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
        cold = wc is None or wc.state not in ("resident", "loading", "fetching")
        if cold:
            plan.cold_placements += 1
        else:
            plan.warm_placements += 1
        self.scheduler.log_event(
            EVENT_TOPIC,
            {
                "action": "placement",
                "context": plan.name,
                "added": addr,
                "cold": cold,
                "members": sorted(plan.members),
                "pending": len(plan.pending),
                "reason": reason,
            },
        )
        if cold and self.prewarm and len(plan.members) > 1:
            self._spawn(self._prewarm(addr, plan.name))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _prewarm(self, addr: str, name: str) -> None:
        assert self.scheduler is not None
        try:
            await self.scheduler.rpc(addr).pervasive_prewarm(name=name)
        except Exception as exc:  # noqa: BLE001 - the worker may have left; tasks still load on demand
            logger.info("pervasive: prewarm of %r on %s did not happen: %s", name, addr, exc)

    def _apply(self, plan: ContextPlan, stimulus_id: str, keys: Iterable | None = None) -> None:
        """Restrict pending tasks (or just ``keys``) to the affinity set; revive those left without a worker."""
        assert self.scheduler is not None
        tasks = self.scheduler.tasks
        members = set(plan.members)
        recommendations = {}
        for key in plan.pending if keys is None else keys:
            ts: TaskState | None = tasks.get(key)
            if ts is None or ts.state not in _PLACEABLE:
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
        out = {}
        for name in sorted(set(self.plans) | set(self.warm)):
            states = self.warm.get(name, {})
            out[name] = {
                "resident": sorted(a for a, w in states.items() if w.state == "resident"),
                "files": sorted(a for a, w in states.items() if w.files),
                "loading": sorted(a for a, w in states.items() if w.state in ("fetching", "loading")),
                "failed": sorted(a for a, w in states.items() if w.state == "failed"),
                "affinity": sorted(self.plans[name].members) if name in self.plans else [],
            }
        return out


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else _EWMA * new + (1 - _EWMA) * old
