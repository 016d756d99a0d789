"""The joint placement planner (dask_pervasive._planner): rules on small clusters, a fluid simulation at 50 workers."""

from __future__ import annotations

import math
import statistics
import time

import pytest

from dask_pervasive._planner import ContextView, Holding, Planner, PlannerSettings, QueuedWork, WorkerView
from dask_pervasive.bench.scale import reference_loop_ms

RESIDENT = Holding(state="resident")


def addrs(n: int, prefix: str = "w") -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def views(n: int, **kw) -> list[WorkerView]:
    return [WorkerView(a, **kw) for a in addrs(n)]


class Sim:
    """A fluid simulation of a cluster driven by the planner (no Dask).

    Workers run the pending work of the contexts whose sets they are in and
    hold resident, one thread each, their time split evenly between those
    contexts. A worker added to a set starts loading at once (prewarm);
    loading ends after its own load time. Budgets (in context slots) evict
    the least recently used context the worker no longer serves.
    """

    def __init__(self, n, contexts, *, slots=None, speeds=None, load_factors=None, settings=None):
        self.ws = addrs(n)
        self.ctx = contexts  # name -> (task_seconds, load_seconds)
        self.slots = slots
        self.speed = dict(zip(self.ws, speeds or [1.0] * n, strict=True))
        self.load_factor = dict(zip(self.ws, load_factors or [1.0] * n, strict=True))
        self.planner = Planner(settings or PlannerSettings())
        self.now = 0.0
        self.pending = {c: 0.0 for c in contexts}  # tasks (fractional: fluid)
        self.running = dict.fromkeys(contexts, 0)  # workers that ran the context in the last step (a task each)
        self.members: dict[str, frozenset[str]] = {c: frozenset() for c in contexts}
        self.held: dict[str, dict[str, list]] = {w: {} for w in self.ws}  # w -> c -> [state, since, last_used]
        self.loads = dict.fromkeys(self.ws, 0)
        self.work_done = dict.fromkeys(self.ws, 0.0)  # median seconds
        self.history: list[dict[str, frozenset[str]]] = []
        self.plan_seconds: list[float] = []

    def load_time(self, w, c):
        return self.ctx[c][1] * self.load_factor[w]

    def worker_views(self):
        out = []
        for w in self.ws:
            hs = {}
            for c, (state, since, _) in self.held[w].items():
                measured = self.load_time(w, c) if state == "resident" else None
                hs[c] = Holding(state=state, loading_since=since, load_seconds=measured)
            out.append(
                WorkerView(
                    w,
                    speed=self.speed[w],
                    host_budget=None if self.slots is None else self.slots * 1000,
                    contexts=hs,
                )
            )
        return out

    def plan(self):
        cviews = [
            ContextView(
                c,
                pending=max(math.ceil(self.pending[c] - 1e-9), self.running[c]),
                task_seconds=ts,
                load_seconds=ls,
                size=(1000, 0),
                members=self.members[c],
            )
            for c, (ts, ls) in self.ctx.items()
        ]
        wviews = self.worker_views()
        t0 = time.perf_counter()
        result = self.planner.plan(wviews, cviews, now=self.now)
        self.plan_seconds.append(time.perf_counter() - t0)
        for name, d in result.contexts.items():
            self.members[name] = d.members
            for add in d.added:
                held = self.held[add.worker]
                if name not in held or held[name][0] != "resident":
                    self.start_load(add.worker, name)
        self.history.append(dict(self.members))
        return result

    def start_load(self, w, c):
        held = self.held[w]
        if self.slots is not None:
            while len(held) >= self.slots:
                idle = [x for x in held if held[x][0] == "resident" and w not in self.members[x]]
                victim = min(idle or held, key=lambda x: held[x][2])
                del held[victim]
        held[c] = ["loading", self.now, self.now]
        self.loads[w] += 1

    def step(self, dt):
        self.now += dt
        became_resident = False
        self.running = dict.fromkeys(self.ctx, 0)
        for w in self.ws:
            held = self.held[w]
            for c, rec in held.items():
                if rec[0] == "loading" and self.now - rec[1] >= self.load_time(w, c):
                    rec[0] = "resident"
                    became_resident = True
            serving = [
                c for c, rec in held.items() if rec[0] == "resident" and w in self.members[c] and self.pending[c] > 0
            ]
            for c in serving:
                work = dt / self.speed[w] / len(serving)
                tasks = min(self.pending[c], work / self.ctx[c][0])
                self.pending[c] -= tasks
                self.work_done[w] += tasks * self.ctx[c][0]
                self.running[c] += tasks > 0
                held[c][2] = self.now
        return became_resident

    def run(self, submits, *, submit_dt=0.002, dt=0.05, tick=0.5, limit=200.0):
        """Submit ``[(context, n_tasks), ...]`` one by one with a plan each, then run until drained."""
        for c, n in submits:
            self.pending[c] += n
            self.plan()
            self.step(submit_dt)
        next_tick = self.now + tick
        while any(p > 1e-6 for p in self.pending.values()):
            assert self.now < limit, self.pending
            if self.step(dt) or self.now >= next_tick:
                self.plan()
                next_tick = self.now + tick
        return self.now


def plan_once(workers, contexts, settings=None, now=0.0, queued=None):
    return Planner(settings or PlannerSettings()).plan(workers, contexts, now=now, queued=queued)


def plain_tasks(workers, seconds):
    """Every worker but the first has ``seconds`` of plain tasks queued (not idle capacity)."""
    return QueuedWork(plain_seconds={w.address: seconds for w in workers[1:]})


# -- the few / backlog rules ---------------------------------------------------------------------
def test_one_warm_worker_and_a_small_backlog_waits_for_it():
    ws = [WorkerView("w000", contexts={"m": RESIDENT})] + views(3)[1:]
    ctx = ContextView("m", pending=20, task_seconds=0.02, load_seconds=0.5, members=frozenset({"w000"}))
    result = plan_once(ws, [ctx])
    d = result.contexts["m"]
    assert d.members == {"w000"} and not d.changed and not result.prewarm
    assert d.finish == pytest.approx(0.4)


def test_a_new_context_starts_on_its_warm_worker_and_waits():
    ws = views(3)[:2] + [WorkerView("w002", contexts={"m": RESIDENT})]
    result = plan_once(ws, [ContextView("m", pending=20, task_seconds=0.02, load_seconds=0.5)])
    d = result.contexts["m"]
    assert d.members == {"w002"}
    assert [(a.worker, a.cold, a.reason) for a in d.added] == [("w002", False, "first worker (warm)")]


def test_big_backlog_grows_and_prewarms():
    ctx = ContextView("m", pending=300, task_seconds=0.02, load_seconds=0.5)
    result = plan_once(views(4), [ctx], PlannerSettings(prewarm_backlog=2))
    d = result.contexts["m"]
    assert len(d.members) == 4
    assert all(a.cold for a in d.added)
    assert all("backlog" in a.reason for a in d.added[1:])
    # the first worker loads with its first task; the others are warmed ahead
    assert sorted(result.prewarm) == sorted((a.worker, "m") for a in d.added[1:])
    assert d.finish == pytest.approx((6 + 4 * 0.5) / 4)


def test_growth_stops_when_a_busy_cold_worker_no_longer_pays():
    # 2 s of work, 0.5 s loads, workers busy 50 ms with plain tasks: a 2nd and 3rd worker pay,
    # a 4th would save less work than it spends loading
    ws = [WorkerView("w000", contexts={"m": RESIDENT})] + views(8)[1:]
    ctx = ContextView("m", pending=100, task_seconds=0.02, load_seconds=0.5, members=frozenset({"w000"}))
    d = plan_once(ws, [ctx], PlannerSettings(prewarm_backlog=2), queued=plain_tasks(ws, 0.05)).contexts["m"]
    assert len(d.members) == 3
    assert not any("idle capacity" in a.reason for a in d.added)


def test_idle_workers_join_while_they_shorten_the_backlog():
    # The same backlog on idle workers: their loads take no other work, so each one that shortens
    # the backlog joins (8 of 8), the first two because they pay for themselves.
    ws = [WorkerView("w000", contexts={"m": RESIDENT})] + views(8)[1:]
    ctx = ContextView("m", pending=100, task_seconds=0.02, load_seconds=0.5, members=frozenset({"w000"}))
    d = plan_once(ws, [ctx], PlannerSettings(prewarm_backlog=2)).contexts["m"]
    assert len(d.members) == 8
    idle = [a for a in d.added if "idle capacity" in a.reason]
    assert len(idle) == 5 and all(a.cold for a in idle)
    assert d.finish == pytest.approx((2 + 7 * 0.5) / 8)


def test_an_idle_worker_does_not_load_for_the_end_of_a_backlog():
    # A replacement joins after a preemption with 3.5 s of work left on two warm workers (7 s of
    # tasks) and a 3 s load: it would finish 0.2 s sooner, but only if its load took no longer than
    # estimated, and it would read the files for ~7 tasks. It stays out; with 5 s left it joins.
    warm = [WorkerView(a, contexts={"m": RESIDENT}) for a in addrs(2)]
    ws = warm + [WorkerView("new", contexts={})]
    members = frozenset(addrs(2))

    def plan(seconds_left: float, margin: float = PlannerSettings.idle_load_margin):
        pending = round(2 * seconds_left / 0.05)
        ctx = ContextView("m", pending=pending, task_seconds=0.05, load_seconds=3.0, members=members)
        return plan_once(ws, [ctx], PlannerSettings(prewarm_backlog=2, idle_load_margin=margin))

    end = plan(3.5)
    assert end.contexts["m"].members == members and not end.prewarm
    assert end.contexts["m"].finish == pytest.approx(3.5)
    assert plan(3.5, margin=0.0).contexts["m"].members == members | {"new"}  # the margin decides
    longer = plan(5.0)
    assert [(a.worker, a.cold) for a in longer.contexts["m"].added] == [("new", True)]
    assert "idle capacity" in longer.contexts["m"].added[0].reason
    assert longer.prewarm == (("new", "m"),)


def test_idle_capacity_evicts_nothing():
    # Room for one context: an idle worker holding another (no tasks now) is not used for spare
    # capacity, and neither is one whose budget the context would fill past.
    size = (1000, 0)
    held = Holding(state="resident", host_bytes=1000)
    ws = [WorkerView("w000", host_budget=1500, contexts={"m": RESIDENT})]
    ws += [WorkerView(a, host_budget=1500, contexts={"other": held}) for a in addrs(8)[1:]]
    busy = ContextView("m", pending=100, task_seconds=0.02, load_seconds=0.5, size=size, members=frozenset({"w000"}))
    d = plan_once(ws, [busy], PlannerSettings(prewarm_backlog=2)).contexts["m"]
    assert not any("idle capacity" in a.reason for a in d.added)
    ws = [ws[0]] + [WorkerView(a, host_budget=1500) for a in addrs(8)[1:]]
    d = plan_once(ws, [busy], PlannerSettings(prewarm_backlog=2)).contexts["m"]
    assert len(d.members) == 8


def test_warm_idle_workers_join_even_before_durations_are_known():
    ws = [WorkerView(a, contexts={"m": RESIDENT}) for a in addrs(3)] + views(6)[3:]
    ctx = ContextView("m", pending=100, task_seconds=0.0, load_seconds=5.0, members=frozenset({"w000"}))
    d = plan_once(ws, [ctx]).contexts["m"]
    assert d.members == set(addrs(3))
    assert not any(a.cold for a in d.added)


def test_new_backlogs_settle_before_their_sets_grow_cold():
    # client.map per context, back to back: planned on the first map alone, that context would
    # take every idle worker and each worker would load every context in turn.
    settings = PlannerSettings(prewarm_backlog=2, settle_seconds=0.25)
    planner = Planner(settings)
    young = [ContextView(n, pending=400, task_seconds=0.2, load_seconds=2.0, demand_seconds=0.0) for n in ("a", "b")]
    first = planner.plan(views(8), young, now=0.0)
    assert {n: len(d.members) for n, d in first.contexts.items()} == {"a": 1, "b": 1}  # tasks have a worker
    assert first.settles_in == pytest.approx(0.25)
    assert not first.prewarm
    # Settled: the same backlogs on the same cluster split it, each worker in one set.
    loading = Holding(state="loading")
    ws = [WorkerView(a, contexts={n: loading for n, d in first.contexts.items() if a in d.members}) for a in addrs(8)]
    settled = [ContextView(n, 400, 0.2, 2.0, members=first.contexts[n].members, demand_seconds=0.3) for n in ("a", "b")]
    second = planner.plan(ws, settled, now=0.3)
    a, b = second.contexts["a"].members, second.contexts["b"].members
    assert second.settles_in is None
    assert a | b == set(addrs(8)) and not a & b and len(a) == len(b) == 4


def test_a_settled_backlog_grows_while_a_new_one_waits():
    # A backlog older than _SETTLE_CAP x settle_seconds is not held back by a context that just came.
    settings = PlannerSettings(prewarm_backlog=2, settle_seconds=0.25)
    old = ContextView("a", pending=400, task_seconds=0.2, load_seconds=2.0, demand_seconds=1.0)
    new = ContextView("b", pending=400, task_seconds=0.2, load_seconds=2.0, demand_seconds=0.1)
    result = plan_once(views(8), [old, new], settings)
    assert len(result.contexts["a"].members) > 1 and len(result.contexts["b"].members) == 1
    assert result.settles_in == pytest.approx(0.15)
    # Warm workers are not loads: a young backlog takes them at once.
    ws = [WorkerView(a, contexts={"b": RESIDENT}) for a in addrs(3)] + views(8)[3:]
    d = plan_once(ws, [new], settings).contexts["b"]
    assert d.members == set(addrs(3)) and not any(x.cold for x in d.added)


def test_a_backlog_does_not_wait_when_no_other_context_can_arrive():
    # Every known context has a backlog (one model, or the last map of a burst): grow at once.
    settings = PlannerSettings(prewarm_backlog=2, settle_seconds=0.25)
    young = ContextView("a", pending=400, task_seconds=0.2, load_seconds=2.0, demand_seconds=0.0)
    result = Planner(settings).plan(views(8), [young], now=0.0, quiet_contexts=0)
    assert len(result.contexts["a"].members) == 8 and result.settles_in is None
    held = Planner(settings).plan(views(8), [young], now=0.0, quiet_contexts=1)
    assert len(held.contexts["a"].members) == 1 and held.settles_in == pytest.approx(0.25)


def test_no_pending_tasks_forgets_the_set():
    ctx = ContextView("m", pending=0, members=frozenset({"w000", "w001"}))
    d = plan_once(views(2), [ctx]).contexts["m"]
    assert d.members == frozenset() and d.removed == ("w000", "w001")


def test_gone_and_failed_members_are_dropped():
    ws = [
        WorkerView("w000", contexts={"m": RESIDENT}),
        WorkerView("w001", contexts={"m": Holding(state="failed", failed_recently=True)}),
        WorkerView("w002"),
    ]
    ctx = ContextView("m", pending=4, task_seconds=0.1, members=frozenset({"w000", "w001", "gone"}))
    d = plan_once(ws, [ctx]).contexts["m"]
    assert d.members == {"w000"} and set(d.removed) == {"w001", "gone"}
    # a recently failed worker is not a candidate either
    ctx = ContextView("m", pending=400, task_seconds=1.0, load_seconds=1.0)
    ws = [WorkerView("w000", contexts={"m": Holding(state="failed", failed_recently=True)}), WorkerView("w001")]
    assert plan_once(ws, [ctx]).contexts["m"].members == {"w001"}


# -- joint planning -----------------------------------------------------------------------------
def test_a_worker_busy_with_one_context_looks_busy_to_another():
    # w000 holds both contexts but has 100 s of A queued; w001 is idle and cold for B.
    ws = [WorkerView("w000", contexts={"A": RESIDENT, "B": RESIDENT}), WorkerView("w001")]
    a = ContextView("A", pending=100, task_seconds=1.0, load_seconds=2.0, members=frozenset({"w000"}))
    b = ContextView("B", pending=20, task_seconds=1.0, load_seconds=2.0)
    result = plan_once(ws, [a, b], PlannerSettings(prewarm_backlog=100))
    assert result.contexts["B"].members == {"w001"}
    assert result.contexts["B"].added[0].cold
    # Without A's backlog, the warm worker wins.
    a = ContextView("A", pending=0)
    assert plan_once(ws, [a, b], PlannerSettings(prewarm_backlog=100)).contexts["B"].members == {"w000"}


def test_the_context_that_finishes_last_chooses_first():
    # 3 idle cold workers; A has 3x B's backlog: A gets 2 of them, B 1, none is shared.
    a = ContextView("A", pending=300, task_seconds=0.1, load_seconds=1.0, members=frozenset({"w000"}))
    b = ContextView("B", pending=100, task_seconds=0.1, load_seconds=1.0, members=frozenset({"w001"}))
    ws = [WorkerView("w000", contexts={"A": RESIDENT}), WorkerView("w001", contexts={"B": RESIDENT})] + views(5)[2:]
    result = plan_once(ws, [a, b], PlannerSettings(prewarm_backlog=1))
    ma, mb = result.contexts["A"].members, result.contexts["B"].members
    assert not ma & mb and len(ma | mb) == 5
    assert len(ma) > len(mb)


def test_50_workers_4_contexts_roomy_one_plan():
    ctxs = [ContextView(f"c{i}", pending=500, task_seconds=0.2, load_seconds=2.0, size=(1000, 0)) for i in range(4)]
    result = plan_once(views(50), ctxs)
    sets = [d.members for d in result.contexts.values()]
    assert sum(len(s) for s in sets) == 50
    assert len(set().union(*sets)) == 50  # each worker in one set
    assert all(11 <= len(s) <= 14 for s in sets), [len(s) for s in sets]


def test_50_workers_4_contexts_tight_one_plan():
    ctxs = [ContextView(f"c{i}", pending=500, task_seconds=0.2, load_seconds=2.0, size=(1000, 0)) for i in range(4)]
    result = plan_once(views(50, host_budget=1500), ctxs)
    sets = [d.members for d in result.contexts.values()]
    assert sum(len(s) for s in sets) == 50 and len(set().union(*sets)) == 50


def round_robin(n_contexts, n_tasks):
    return [(f"c{i % n_contexts}", 1) for i in range(n_tasks)]


@pytest.mark.parametrize("slots", [None, 1], ids=["roomy", "tight"])
def test_50_workers_4_contexts_one_by_one_submits(slots):
    """The issue's scenario: 2,000 tasks of 0.2 s submitted one by one, round-robin, 2 s loads."""
    sim = Sim(50, {f"c{i}": (0.2, 2.0) for i in range(4)}, slots=slots)
    makespan = sim.run(round_robin(4, 2000))
    loads = sum(sim.loads.values())
    bound = 2000 * 0.2 / 50 + 2.0
    print(
        f"\n{slots=}: loads {loads} ({loads / 50:.2f}/worker), makespan {makespan:.1f}s = {makespan / bound:.2f}x bound"
    )
    assert loads <= (1.1 if slots is None else 1.2) * 50
    assert makespan <= 1.1 * bound


# -- heterogeneous workers ------------------------------------------------------------------------
def test_half_the_workers_twice_slower_get_half_the_work():
    ws = [WorkerView(a, speed=1.0 if i < 4 else 2.0, contexts={"m": RESIDENT}) for i, a in enumerate(addrs(8))]
    ctx = ContextView("m", pending=600, task_seconds=0.1, members=frozenset(addrs(8)))
    d = plan_once(ws, [ctx]).contexts["m"]
    fast = [d.shares[a] for a in addrs(8)[:4]]
    slow = [d.shares[a] for a in addrs(8)[4:]]
    assert sum(fast) + sum(slow) == pytest.approx(60)
    assert sum(slow) / sum(fast) == pytest.approx(0.5)
    assert d.finish == pytest.approx(60 / 6)


def test_half_slower_in_simulation_makespan_near_the_speed_bound():
    speeds = [1.0] * 10 + [2.0] * 10
    sim = Sim(20, {"c0": (0.2, 1.0), "c1": (0.2, 1.0)}, speeds=speeds)
    makespan = sim.run(round_robin(2, 1000))
    fast = sum(sim.work_done[w] for w in sim.ws[:10])
    slow = sum(sim.work_done[w] for w in sim.ws[10:])
    bound = 1000 * 0.2 / (10 + 5) + 1.0
    print(f"\nslow/fast work {slow / fast:.2f}, makespan {makespan:.1f}s = {makespan / bound:.2f}x bound")
    assert slow / fast == pytest.approx(0.5, abs=0.1)
    assert makespan <= 1.15 * bound


def test_a_slow_loading_worker_is_warmed_last():
    ws = [WorkerView(a, load_factor=4.0 if a == "w000" else 1.0) for a in addrs(4)]
    ctx = ContextView("m", pending=30, task_seconds=0.1, load_seconds=0.5)
    d = plan_once(ws, [ctx], PlannerSettings(prewarm_backlog=1)).contexts["m"]
    assert "w000" not in d.members and len(d.members) == 3
    # with enough work it joins, last
    ctx = ContextView("m", pending=300, task_seconds=0.1, load_seconds=0.5)
    d = plan_once(ws, [ctx], PlannerSettings(prewarm_backlog=1)).contexts["m"]
    assert [a.worker for a in d.added][-1] == "w000" and len(d.members) == 4
    # its own measured load time counts too
    ws = [
        WorkerView(a, contexts={"m": Holding(state="evicted", load_seconds=2.0)} if a == "w001" else {})
        for a in addrs(4)
    ]
    d = plan_once(ws, [ctx], PlannerSettings(prewarm_backlog=1)).contexts["m"]
    assert [a.worker for a in d.added][-1] == "w001"


# -- shrinking ----------------------------------------------------------------------------------
def flips(history):
    """(context, worker, plan) where a worker was added right after being removed, or removed right after added."""
    out = []
    for i in range(2, len(history)):
        for c in history[i]:
            a, b, now = history[i - 2].get(c, frozenset()), history[i - 1].get(c, frozenset()), history[i][c]
            if not b:  # a set forgotten for lack of demand
                continue
            out += [(c, w, i) for w in (a - b) & now]  # removed, then added back
            out += [(c, w, i) for w in (b - a) - now if now]  # added, then removed
    return out


def test_sets_shrink_as_a_backlog_drains_without_flip_flop():
    """A big backlog grows the set; when only a trickle of tasks remains, it shrinks and stays shrunk."""
    sim = Sim(16, {"c0": (0.2, 1.0)}, settings=PlannerSettings(prewarm_backlog=2))
    sim.pending["c0"] = 400
    sizes = []
    while sim.pending["c0"] > 5:
        sim.plan()
        sizes.append(len(sim.members["c0"]))
        sim.step(0.1)
    assert max(sizes) == 16
    for _ in range(100):  # 10 tasks/s of 0.2 s: two workers' worth
        sim.pending["c0"] += 1
        sim.plan()
        sizes.append(len(sim.members["c0"]))
        sim.step(0.1)
    assert sizes[-1] <= 4, sizes
    # once shrinking starts, the set never grows again, and never flips a worker in and out
    peak = sizes.index(max(sizes))
    assert all(b <= a for a, b in zip(sizes[peak:], sizes[peak + 1 :], strict=False)), sizes
    assert not flips(sim.history)
    print(f"\nset sizes while draining: {sizes[peak::10]}")


def test_shrink_waits_for_several_plans_and_the_delay():
    settings = PlannerSettings(prewarm_backlog=2, shrink_plans=3, shrink_delay=1.0)
    planner = Planner(settings)
    ws = [WorkerView(a, contexts={"m": RESIDENT}) for a in addrs(8)]
    members = frozenset(addrs(8))
    ctx = ContextView("m", pending=3, task_seconds=0.1, members=members)
    seen = []
    for i in range(6):
        d = planner.plan(ws, [ctx], now=0.5 * i).contexts["m"]
        seen.append(len(d.members))
        ctx = ContextView("m", pending=3, task_seconds=0.1, members=d.members)
    assert seen[:2] == [8, 8]  # over-provisioned, but not for long enough yet
    assert seen[-1] < 8 and seen[-1] >= 1
    # a pending count oscillating around the growth threshold does not flip the set
    planner = Planner(settings)
    members = frozenset(addrs(4))
    history = []
    for i in range(40):
        pending = 9 if i % 2 else 7  # 2 per member: threshold 8 for 4 members
        d = planner.plan(ws, [ContextView("m", pending=pending, task_seconds=0.1, members=members)], now=0.3 * i)
        members = d.contexts["m"].members
        history.append({"m": members})
    assert not flips(history)
    assert len({len(h["m"]) for h in history}) <= 2


def test_a_worker_released_by_one_set_is_free_for_another_in_the_same_plan():
    # "a" is over-provisioned (2 tasks, 3 members) and releases one member in the second plan; "b"
    # arrives then. The released worker is idle at once: b's first worker is that one, not a member
    # of a that is busy until a's backlog is done.
    planner = Planner(PlannerSettings(prewarm_backlog=2, shrink_plans=1, shrink_delay=0.0))
    ws = [WorkerView(x, contexts={"a": RESIDENT}) for x in addrs(3)]
    a = ContextView("a", pending=2, task_seconds=1.0, members=frozenset(addrs(3)))
    first = planner.plan(ws, [a], now=0.0).contexts["a"]
    assert first.members == frozenset(addrs(3)) and not first.removed  # over-provisioned since now
    a = ContextView("a", pending=2, task_seconds=1.0, members=first.members)
    b = ContextView("b", pending=100, task_seconds=1.0, load_seconds=0.1)
    result = planner.plan(ws, [a, b], now=1.0)
    released = result.contexts["a"].removed
    assert len(released) == 1
    assert result.contexts["b"].added[0].worker == released[0]


# -- memory ------------------------------------------------------------------------------------
def test_memory_packing_respects_budgets():
    ctxs = [ContextView(f"c{i}", pending=800, task_seconds=0.5, load_seconds=1.0, size=(1000, 0)) for i in range(6)]
    ws = views(4, host_budget=2500)
    result = plan_once(ws, ctxs, PlannerSettings(prewarm_backlog=1))
    per_worker = {a: [n for n, d in result.contexts.items() if a in d.members] for a in addrs(4)}
    assert all(len(v) <= 2 for v in per_worker.values()), per_worker
    assert all(d.members for d in result.contexts.values())  # each context got a worker
    # device budgets count too
    ctx = ContextView("g", pending=800, task_seconds=0.5, load_seconds=1.0, size=(10, 5000))
    ws = [WorkerView("w000", device_budget=4000), WorkerView("w001", device_budget=8000)]
    assert plan_once(ws, [ctx]).contexts["g"].members == {"w001"}


def test_unknown_size_gets_a_worker_of_its_own():
    known = ContextView("k", pending=100, task_seconds=1.0, load_seconds=1.0, size=(10, 0), members=frozenset({"w000"}))
    unknown = ContextView("u", pending=100, task_seconds=1.0, load_seconds=1.0)
    ws = [WorkerView("w000", host_budget=10**6, contexts={"k": RESIDENT}), WorkerView("w001", host_budget=10**6)]
    d = plan_once(ws, [known, unknown], PlannerSettings(prewarm_backlog=1000)).contexts["u"]
    assert d.members == {"w001"}


def test_eviction_of_a_context_in_demand_costs_its_reload():
    # w001 holds B (in demand, served by w000 too but not by w001): warming A there evicts B
    ws = [
        WorkerView("w000", host_budget=1000, contexts={"B": RESIDENT}),
        WorkerView("w001", host_budget=1000, contexts={"B": RESIDENT}),
        WorkerView("w002", host_budget=1000, contexts={"C": RESIDENT}),  # C has no demand: free to evict
    ]
    a = ContextView("A", pending=1000, task_seconds=1.0, load_seconds=1.0, size=(1000, 0))
    b = ContextView("B", pending=1, task_seconds=1.0, load_seconds=30.0, size=(1000, 0), members=frozenset({"w000"}))
    d = plan_once(ws, [a, b], PlannerSettings(prewarm_backlog=1)).contexts["A"]
    assert d.added[0].worker == "w002" and d.added[0].evicts == ()  # the free one first
    evicting = [x for x in d.added if x.worker == "w001"]
    assert evicting and evicting[0].evicts == ("B",)
    # a worker serving another context in demand is not taken
    assert "w000" not in d.members


def test_no_worker_with_room_shares_the_least_crowded():
    ws = [WorkerView("w000", host_budget=1000), WorkerView("w001", host_budget=1000)]
    ctxs = [ContextView(f"c{i}", pending=10, task_seconds=1.0, size=(1000, 0)) for i in range(3)]
    result = plan_once(ws, ctxs, PlannerSettings(prewarm_backlog=100))
    assert all(len(d.members) == 1 for d in result.contexts.values())
    assert any("no worker has room" in d.added[0].reason for d in result.contexts.values())


# -- cost -----------------------------------------------------------------------------------------
def _scale_inputs(n_workers, n_contexts, warm):
    """Views, contexts and queues: warm workers have 1 s (5 tasks) queued of each context they hold."""
    ws, cs, tasks = [], [], {}
    names = [f"c{j:02d}" for j in range(n_contexts)]
    members = {n: set() for n in names}
    for i, a in enumerate(addrs(n_workers)):
        held = {}
        if warm:
            for n in (names[i % n_contexts], names[(i * 7 + 3) % n_contexts]):
                held[n] = Holding(state="resident", load_seconds=2.0)
            tasks[a] = dict.fromkeys(held, 5)
            members[names[i % n_contexts]].add(a)
        ws.append(WorkerView(a, speed=1.0 + (i % 3) * 0.5, host_budget=3000, contexts=held))
    for j, n in enumerate(names):
        cs.append(
            ContextView(
                n,
                pending=50 + 37 * j,
                task_seconds=0.2,
                load_seconds=2.0,
                size=(1000, 0),
                members=frozenset(members[n]),
            )
        )
    return ws, cs, QueuedWork(tasks)


def _feed_back(ws, cs, result):
    """The inputs of the next plan: the decided sets, and every added worker resident."""
    ws = [
        WorkerView(
            w.address,
            speed=w.speed,
            host_budget=w.host_budget,
            contexts={
                **{
                    n: h
                    for n, h in w.contexts.items()
                    if n
                    not in {
                        e for d in result.contexts.values() for a in d.added if a.worker == w.address for e in a.evicts
                    }
                },
                **{
                    n: Holding(state="resident", load_seconds=2.0)
                    for n, d in result.contexts.items()
                    if any(a.worker == w.address for a in d.added)
                },
            },
        )
        for w in ws
    ]
    cs = [
        ContextView(c.name, c.pending, c.task_seconds, c.load_seconds, None, c.size, result.contexts[c.name].members)
        for c in cs
    ]
    return ws, cs


def _percentiles(times):
    times = sorted(times)
    return statistics.median(times), times[max(0, int(0.99 * len(times)) - 1)], times[-1]


@pytest.mark.parametrize("warm", [False, True], ids=["cold-start", "steady"])
def test_plan_cost_200_workers_50_contexts(warm):
    """Not a timing assertion: prints p50/p99/max of one plan (the issue's target: p99 <= 5 ms).

    cold-start: no sets yet (every context gets its first worker, ~200 additions);
    steady: the decisions of each plan are fed back (sets and warm workers),
    so after convergence a plan changes little, as between two submits.
    CPU time of this thread (wall time on a shared machine mostly measures the others).
    """
    times, walls, steps = [], [], []
    ref = reference_loop_ms()  # to compare timings across machines and load

    def timed(planner, ws, cs, now):
        t0, w0 = time.thread_time(), time.perf_counter()
        result = planner.plan(ws, cs, now=now, queued=queued)
        return result, time.thread_time() - t0, time.perf_counter() - w0

    if warm:
        ws, cs, queued = _scale_inputs(200, 50, True)
        planner = Planner()
        for i in range(120):
            result, cpu, wall = timed(planner, ws, cs, float(i))
            if i >= 20:
                times.append(cpu)
                walls.append(wall)
                steps.append(result.steps)
            ws, cs = _feed_back(ws, cs, result)
    else:
        for _ in range(50):
            ws, cs, queued = _scale_inputs(200, 50, False)
            result, cpu, wall = timed(Planner(), ws, cs, 0.0)
            times.append(cpu)
            walls.append(wall)
            steps.append(result.steps)
    p50, p99, top = _percentiles(times)
    w50, w99, wtop = _percentiles(walls)
    ref = min(ref, reference_loop_ms())
    print(
        f"\n200x50 {'steady' if warm else 'cold-start'}: CPU p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, "
        f"max {top * 1e3:.2f} ms (wall p50 {w50 * 1e3:.2f}, p99 {w99 * 1e3:.2f}, max {wtop * 1e3:.2f}); "
        f"steps p50 {statistics.median(steps)}; reference loop {ref:.0f} ms CPU"
    )
    assert len(result.contexts) == 50 and all(d.members for d in result.contexts.values())


def test_settings_from_the_scheduler_settings_and_no_prewarm():
    from dask_pervasive._settings import SchedulerSettings

    settings = PlannerSettings.from_scheduler(SchedulerSettings(prewarm=False, prewarm_backlog=2), shrink_plans=5)
    assert (settings.prewarm, settings.prewarm_backlog, settings.shrink_plans) == (False, 2, 5)
    result = plan_once(views(4), [ContextView("m", pending=300, task_seconds=0.02, load_seconds=0.5)], settings)
    assert len(result.contexts["m"].members) == 4 and result.prewarm == ()


# -- where a cold worker's files come from ---------------------------------------------------
def _busy_cold(n, **kw):
    """A warm member and ``n - 1`` cold workers (busy 50 ms with plain tasks: pass ``queued=_BUSY``)."""
    return [WorkerView("w000", contexts={"m": RESIDENT})] + views(n, **kw)[1:]


_BUSY = plain_tasks(views(8), 0.05)


def test_a_cold_worker_that_can_copy_from_a_peer_is_priced_at_the_copy():
    # 2 s of backlog; reading the origin takes 5 s (never pays), copying from a peer 0.3 s (pays).
    origin = ContextView("m", pending=100, task_seconds=0.02, load_seconds=5.0, members=frozenset({"w000"}))
    d = plan_once(_busy_cold(4), [origin], PlannerSettings(prewarm_backlog=2), queued=_BUSY).contexts["m"]
    assert d.members == {"w000"}
    peer = ContextView(
        "m", pending=100, task_seconds=0.02, load_seconds=5.0, members=frozenset({"w000"}), peer_load_seconds=0.3
    )
    d = plan_once(_busy_cold(4), [peer], PlannerSettings(prewarm_backlog=2), queued=_BUSY).contexts["m"]
    assert len(d.members) == 4 and all(a.cold for a in d.added)
    # a worker that does not copy from peers (pervasive.transfer.peers off) still reads the origin
    d = plan_once(_busy_cold(4, peers=False), [peer], PlannerSettings(prewarm_backlog=2), queued=_BUSY).contexts["m"]
    assert d.members == {"w000"}


def test_cached_files_cost_the_setup_only():
    # the worker has the files: it pays the 0.2 s setup, not the 5 s origin read minus a fetch guess
    ws = [WorkerView("w000", contexts={"m": RESIDENT})]
    ws.append(WorkerView("w001", contexts={"m": Holding(state="evicted", files=True)}))
    busy = plain_tasks(ws, 0.05)
    ctx = ContextView(
        "m", pending=100, task_seconds=0.02, load_seconds=5.0, fetch_seconds=1.0, members=frozenset({"w000"})
    )
    assert plan_once(ws, [ctx], PlannerSettings(prewarm_backlog=2), queued=busy).contexts["m"].members == {"w000"}
    ctx = ContextView(
        "m",
        pending=100,
        task_seconds=0.02,
        load_seconds=5.0,
        fetch_seconds=1.0,
        members=frozenset({"w000"}),
        setup_seconds=0.2,
    )
    members = plan_once(ws, [ctx], PlannerSettings(prewarm_backlog=2), queued=busy).contexts["m"].members
    assert members == {"w000", "w001"}


def test_a_running_load_counts_down_with_the_plans_clock():
    # A loading worker's view carries when its load started, so the plugin can keep the same view
    # from plan to plan: what is left of the load comes from the plan's ``now``.
    loading = Holding(state="loading", loading_since=10.0, load_seconds=4.0)
    view = WorkerView("w001", contexts={"m": loading})
    context = ContextView("m", pending=10, task_seconds=1.0, load_seconds=4.0, members=frozenset({"w001"}))
    planner = Planner(PlannerSettings(prewarm_backlog=100))
    assert planner.plan([view], [context], now=11.0).contexts["m"].finish == pytest.approx(3.0 + 10.0)
    assert planner.plan([view], [context], now=13.0).contexts["m"].finish == pytest.approx(1.0 + 10.0)
    assert planner.plan([view], [context], now=20.0).contexts["m"].finish == pytest.approx(10.0)  # overdue: 0 left
    just_started = WorkerView("w001", contexts={"m": Holding(state="loading", load_seconds=4.0)})
    assert planner.plan([just_started], [context], now=20.0).contexts["m"].finish == pytest.approx(4.0 + 10.0)


def test_a_worker_whose_view_did_not_change_is_planned_as_a_new_one_would_be():
    # The planner keeps each worker's working state while the plugin hands it the same view object
    # (to allocate less); a plan must come out as it would from an equal, new view.
    held = {"a": Holding(state="resident", host_bytes=1000), "b": Holding(state="loading", loading_since=0.0)}
    budget = {"host_budget": 2500}
    same = [WorkerView("w000", contexts=held, **budget)] + [WorkerView(a, **budget) for a in addrs(6)[1:]]

    def rounds(fresh_views: bool) -> list:
        planner = Planner(PlannerSettings(prewarm_backlog=2, shrink_plans=1, shrink_delay=0.0))
        out, members = [], {}
        for step, demand in enumerate(({"b": 300}, {"a": 200, "b": 300, "c": 100}, {"c": 5}, {"a": 300})):
            ws = [WorkerView(v.address, contexts=v.contexts, **budget) for v in same] if fresh_views else same
            cs = [
                ContextView(
                    n,
                    pending=p,
                    task_seconds=0.1,
                    load_seconds=2.0,
                    size=(1000, 0),
                    members=members.get(n, frozenset()),
                )
                for n, p in demand.items()
            ]
            result = planner.plan(ws, cs, now=float(step))
            members = {n: d.members for n, d in result.contexts.items()}
            out.append(
                sorted(
                    (n, sorted(d.members), [a.worker for a in d.added], d.removed) for n, d in result.contexts.items()
                )
            )
        return out

    assert rounds(fresh_views=False) == rounds(fresh_views=True)
