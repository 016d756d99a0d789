"""Context-aware placement (ContextSchedulerPlugin) on in-process clusters."""

from __future__ import annotations

import asyncio
import functools
import random
import threading
import time

import dask
import dask.bag as db
import pytest
from distributed import Worker, wait
from distributed.utils_test import async_poll_for, gen_cluster, gen_test, inc, slowinc
from loaders import load_sleep
from plugin_helpers import add_plugin

import dask_pervasive as dp
from dask_pervasive._protocol import EVENT_TOPIC, WARMING_STATES, State
from dask_pervasive.scheduler import ContextSchedulerPlugin

SLOW = dp.Context("slow", load=functools.partial(load_sleep, seconds=0.5), device="cpu")


@dp.uses_context("slow")
def short_task(model, x, seconds=0.02):
    time.sleep(seconds)
    return model["value"] + x


def annotated_task(x):
    time.sleep(0.02)
    return dp.get_context()["value"] + x


def ran_on(s, futures) -> list[str]:
    return [s.tasks[f.key].who_has and next(iter(s.tasks[f.key].who_has)).address for f in futures]


async def loads(c, name=None):
    return (await dp.stats(c)).total("loads", name)


async def few_tasks_wait_for_the_warm_worker(c, s, workers, timed: bool) -> None:
    # The backlog (12 x 0.02 s) must stay well below a load (2 s) even when a busy machine
    # stretches the measured task time several-fold: the load is a sleep, the tasks are not.
    await dp.install(c, [dp.Context("slow", load=functools.partial(load_sleep, seconds=2.0), device="cpu")])
    a = workers[0]
    await dp.prewarm(c, "slow", workers=[a.address], progress=False)
    if timed:  # the duration of the task prefix is known (load time excluded)
        await c.submit(short_task, -1, workers=[a.address])
    else:  # untimed: a resident worker's running tasks give the lower bound, not Dask's 0.5 s prior
        assert "short_task" not in s.task_prefixes
    futs = c.map(short_task, range(12))
    assert await c.gather(futs) == [x + 1 for x in range(12)]
    assert set(ran_on(s, futs)) == {a.address}
    assert await loads(c) == 1
    placements = [m for _, m in s.get_events("pervasive") if m.get("action") == "placement"]
    assert placements and placements[-1]["members"] == [a.address]


LOAD_GATE = threading.Event()


def load_gated(path, device):
    """A load that ends only when the test opens the gate (no member is resident before)."""
    if not LOAD_GATE.wait(120):
        raise TimeoutError("the test never opened the load gate")
    return {"value": 1}


@dp.uses_context("gated")
def gated_task(model, x):
    time.sleep(0.02)
    return model["value"] + x


@gen_cluster(client=True, nthreads=[("", 1)] * 4, timeout=120)
async def test_untimed_backlog_warms_workers_side_by_side(c, s, *workers):
    """Nothing has timed the task yet and no worker holds the context: Dask's prior for an
    unknown duration (``unknown-task-duration``) stands in, so a big backlog warms several
    workers at once instead of waiting for the first load to end (the lower bound alone
    would give 0 s of work here: no task can run before a load ends)."""
    LOAD_GATE.clear()
    plugin = ContextSchedulerPlugin(prewarm_backlog=2, interval="50ms")
    await dp.install(c, [dp.Context("gated", load=load_gated, device="cpu")], scheduler=False)
    await add_plugin(s, plugin)
    try:
        futs = c.map(gated_task, range(40))
        await async_poll_for(
            lambda: sum(wc.state in WARMING_STATES for wc in plugin.warm.get("gated", {}).values()) >= 2,
            timeout=60,
        )
        assert s.task_prefixes["gated_task"].duration_average < 0  # still untimed
        assert not any(wc.state is State.RESIDENT for wc in plugin.warm["gated"].values())
    finally:
        LOAD_GATE.set()
    assert await c.gather(futs) == [x + 1 for x in range(40)]


TASK_GATE = threading.Event()


def blocked_task(x):
    """Holds the annotated context until the test opens the gate."""
    value = dp.get_context()["value"]
    if not TASK_GATE.wait(120):
        raise TimeoutError("the test never opened the task gate")
    return value + x


@gen_cluster(client=True, nthreads=[("", 1)] * 2, timeout=120)
async def test_a_prefix_dask_stopped_trusting_keeps_the_measured_mean(c, s, *workers):
    """Dask forgets a prefix's average when a running task takes over twice as long
    (``TaskPrefix.add_exec_time`` on a heartbeat), which a task waiting for its context's
    load does: the figure must then be the mean compute time of the finished tasks
    (load excluded), not the running tasks' lower bound or the 0.5 s prior."""
    TASK_GATE.clear()
    plugin = ContextSchedulerPlugin(interval="50ms")
    await dp.install(c, [SLOW], scheduler=False)
    await add_plugin(s, plugin)
    try:
        with dask.annotate(context="slow"):
            done = c.map(blocked_task, range(4), pure=False)
            TASK_GATE.set()  # these run through: their compute times are measured
            assert await c.gather(done) == [x + 1 for x in range(4)]
            TASK_GATE.clear()
            running = c.submit(blocked_task, 10, pure=False)
        await async_poll_for(lambda: running.key in s.tasks and s.tasks[running.key].state == "processing", timeout=60)
        ts = s.tasks[running.key]
        ts.processing_on.executing[ts] = 1000.0  # a heartbeat's figure for a task that waited long
        ts.prefix.duration_average = -1  # what Dask then does
        seconds = plugin._task_seconds(plugin.plans["slow"])  # the running task's prefix only
        assert 0.0 < seconds < 0.5  # the finished tasks' mean: nothing of the load or the heartbeat
    finally:
        TASK_GATE.set()
    assert await c.gather(running) == 11


def sleepy_task(x):
    """20 ms under the annotated context (long enough to be timed), then the task gate."""
    dp.get_context()
    time.sleep(0.02)
    if not TASK_GATE.wait(120):
        raise TimeoutError("the test never opened the task gate")
    return x


@gen_cluster(client=True, nthreads=[("", 1)] * 2, timeout=120)
async def test_task_time_is_the_mean_the_speeds_are_measured_against(c, s, *workers):
    """Once tasks of a prefix have been timed, its task time is their mean compute time, not
    Dask's prefix average: that one moves halfway to every finished task, so with slow and fast
    workers it follows whichever finished last, while speeds are measured against the mean."""
    plugin = ContextSchedulerPlugin(interval="50ms")
    await dp.install(c, [SLOW], scheduler=False)
    await add_plugin(s, plugin)
    TASK_GATE.set()
    try:
        with dask.annotate(context="slow"):
            assert await c.gather(c.map(sleepy_task, range(6), pure=False)) == list(range(6))
            TASK_GATE.clear()
            pending = c.submit(sleepy_task, 7, pure=False)
        plan = plugin.plans["slow"]
        await async_poll_for(lambda: pending.key in plan.pending, timeout=60)
        prefix = s.tasks[pending.key].prefix
        measured = plugin._measured_seconds(prefix.name)
        assert measured is not None and measured >= 0.02
        prefix.duration_average = 10 * measured  # what a last task on a much slower worker leaves
        assert plugin._task_seconds(plan) == pytest.approx(measured)
    finally:
        TASK_GATE.set()
    assert await pending == 7


@gen_cluster(client=True, nthreads=[("", 1)] * 3, timeout=120)
async def test_running_time_counts_from_residency_for_every_context_of_the_prefix(c, s, *workers):
    """A task that waited for its context's load has run longer than it computed: the
    lower bound counts from when the worker became resident. And contexts whose tasks share
    a prefix see one figure: one without a resident worker does not fall back to the prior."""
    LOAD_GATE.clear()
    TASK_GATE.clear()
    plugin = ContextSchedulerPlugin(interval="50ms")
    held = dp.Context("held", load=functools.partial(load_sleep, seconds=0.0), device="cpu")
    await dp.install(c, [held, dp.Context("gated", load=load_gated, device="cpu")], scheduler=False)
    await add_plugin(s, plugin)
    try:
        with dask.annotate(context="held"):
            running = c.submit(blocked_task, 1, pure=False)
        with dask.annotate(context="gated"):
            waiting = c.map(blocked_task, range(4), pure=False)
        await async_poll_for(
            lambda: (
                any(wc.state is State.RESIDENT for wc in plugin.warm.get("held", {}).values())
                and s.tasks[running.key].state == "processing"
            ),
            timeout=60,
        )
        ts = s.tasks[running.key]
        (addr,) = [a for a, wc in plugin.warm["held"].items() if wc.state is State.RESIDENT]
        ws = s.workers[addr]
        ws.executing[ts] = 1000.0  # as a heartbeat reports it if the task had waited long for a load
        views = {v.name: v for v in plugin._context_views(time.monotonic())}
        since = time.monotonic() - plugin.warm["held"][addr].resident_since
        assert 0.0 <= views["held"].task_seconds <= since < 1000.0
        assert not any(wc.state is State.RESIDENT for wc in plugin.warm.get("gated", {}).values())
        assert plugin.plans["held"].resident == {addr} and not plugin.plans["gated"].resident
        assert views["gated"].task_seconds == views["held"].task_seconds  # not the 0.5 s prior
    finally:
        LOAD_GATE.set()
        TASK_GATE.set()
    assert await c.gather(running) == 2
    assert await c.gather(waiting) == [x + 1 for x in range(4)]


@gen_cluster(client=True, nthreads=[("", 1)] * 4)
async def test_few_tasks_wait_for_the_warm_worker(c, s, *workers):
    await few_tasks_wait_for_the_warm_worker(c, s, workers, timed=True)


@gen_cluster(client=True, nthreads=[("", 1)] * 4)
async def test_few_untimed_tasks_wait_for_the_warm_worker(c, s, *workers):
    await few_tasks_wait_for_the_warm_worker(c, s, workers, timed=False)


@gen_cluster(client=True, nthreads=[("", 1)] * 4)
async def test_without_plugin_tasks_spread_and_load_everywhere(c, s, *workers):
    """The control for the test above: Dask alone loads on most workers."""
    await dp.install(c, [SLOW], scheduler=False)
    await dp.prewarm(c, "slow", workers=[workers[0].address], progress=False)
    await c.gather(c.map(short_task, range(20)))
    assert await loads(c) >= 3


@gen_cluster(client=True, nthreads=[("", 1)] * 4)
async def test_big_backlog_warms_more_workers(c, s, *workers):
    plugin = ContextSchedulerPlugin(prewarm_backlog=2, interval="100ms")
    await dp.install(c, [SLOW], scheduler=False)
    await add_plugin(s, plugin)
    futs = c.map(short_task, range(300))
    assert await c.gather(futs) == [x + 1 for x in range(300)]
    used = set(ran_on(s, futs))
    assert len(used) >= 3
    assert await loads(c) == len(used)
    assert plugin.plans["slow"].load_seconds == pytest.approx(0.5, abs=0.3)
    events = [m for _, m in s.get_events("pervasive") if m.get("action") == "placement"]
    assert any(e["cold"] and "backlog" in e["reason"] for e in events)


def context_task(name, x):
    dp.get_context(name)
    time.sleep(0.02)
    return x


@gen_cluster(client=True, nthreads=[("", 1)] * 4, timeout=60)
async def test_maps_of_two_contexts_back_to_back_split_the_workers(c, s, *workers):
    # One client.map per context: the second arrives while the first is planned. Planned on the
    # first alone, its context took all four workers and each then loaded both (8 loads).
    names = ("m0", "m1")
    await dp.install(c, [dp.Context(n, load=functools.partial(load_sleep, seconds=0.5), device="cpu") for n in names])
    futs = []
    for n in names:
        with dask.annotate(context=n):
            futs += c.map(context_task, [n] * 100, range(100), pure=False)
    assert await c.gather(futs) == list(range(100)) * 2
    by_context = {n: set(ran_on(s, futs[i * 100 : (i + 1) * 100])) for i, n in enumerate(names)}
    assert all(by_context.values())
    # One load per worker, give or take one on a noisy machine (a set finishing early may lend a worker).
    assert await loads(c) <= len(workers) + 1, await dp.stats(c)


@gen_cluster(client=True, nthreads=[("", 1)] * 4)
async def test_load_time_excluded_from_duration(c, s, *workers):
    await dp.install(c, [SLOW])
    await c.submit(short_task, 1)
    prefix = s.task_prefixes["short_task"]
    assert 0 < prefix.duration_average < 0.2  # ~0.02s, not the 0.5s load
    assert prefix.all_durations["pervasive-load"] >= 0.4


@gen_cluster(client=True, nthreads=[("", 1)] * 4, timeout=60)
async def test_contexts_settle_under_memory_budget(c, s, *workers):
    names = [f"m{i}" for i in range(4)]
    ctxs = [dp.Context(n, load=functools.partial(load_sleep, seconds=0.2), device="cpu", nbytes="1MiB") for n in names]
    await dp.install(c, ctxs, max_bytes="1.5MiB")
    rng = random.Random(0)
    order = [rng.choice(names) for _ in range(200)]

    futs = []
    for i, n in enumerate(order):
        with dask.annotate(context=n):
            futs.append(c.submit(lambda i, n=n: (dp.get_context(n), i)[1], i, key=f"t-{n}-{i}"))
    assert await c.gather(futs) == list(range(200))
    total = await loads(c)
    assert total <= 8, await dp.stats(c)
    where = await dp.where(c)
    assert all(len(where[n]["resident"]) >= 1 for n in names)


@gen_cluster(client=True, nthreads=[("", 1)] * 2, timeout=60)
async def test_worker_views_are_kept_while_nothing_the_planner_reads_changed(c, s, a, b):
    """A view is rebuilt only when its worker reported: tasks starting and ending reach the planner
    in its QueuedWork, beside the views, and a running load keeps its view (the view carries the
    load's start time, not its age). A rebuilt view keeps the holdings its worker did not report."""
    plugin = await add_plugin(s, ContextSchedulerPlugin(interval="1h"))
    await dp.install(c, [SLOW], scheduler=False)
    await dp.prewarm(c, "slow", workers=[a.address], progress=False)
    now = time.monotonic()
    first = {v.address: v for v in plugin._worker_views(now)}
    assert first[a.address].contexts["slow"].state == "resident"
    assert {v.address: v for v in plugin._worker_views(now + 1)} == first
    plugin.queues.add("k", a.address, "slow")
    again = {v.address: v for v in plugin._worker_views(now + 2)}
    assert all(again[w] is first[w] for w in first)
    assert plugin._queued_work({"slow": 0.1}).tasks == {a.address: {"slow": 1}}
    plugin.queues.discard("k")
    assert plugin._queued_work({"slow": 0.1}).tasks == {}
    b.log_event(EVENT_TOPIC, {"action": "context-state", "context": "slow", "state": "loading", "loads": 0})
    await async_poll_for(lambda: plugin.warm["slow"][b.address].state is State.LOADING, timeout=10.0)
    loading = {v.address: v for v in plugin._worker_views(now + 4)}
    assert loading[b.address] is not first[b.address]  # b reported
    later = {v.address: v for v in plugin._worker_views(now + 9)}
    assert later[b.address] is loading[b.address]
    assert later[b.address].contexts["slow"].loading_since == plugin.warm["slow"][b.address].loading_since
    # a report of one context rebuilds the view, keeping the holdings of the others
    a.log_event(EVENT_TOPIC, {"action": "context-state", "context": "other", "state": "loading", "loads": 0})
    await async_poll_for(lambda: a.address in plugin.warm.get("other", {}), timeout=10.0)
    both = {v.address: v for v in plugin._worker_views(now + 10)}
    assert both[a.address] is not first[a.address]
    assert both[a.address].contexts["slow"] is first[a.address].contexts["slow"]
    assert both[a.address].contexts["other"].state == "loading"


@gen_cluster(client=True, nthreads=[("", 1)] * 3, timeout=60)
async def test_lost_warm_worker_tasks_go_to_survivors(c, s, a, b, w3):
    plugin = ContextSchedulerPlugin(prewarm_backlog=1)
    await dp.install(c, [SLOW], scheduler=False)
    await add_plugin(s, plugin)
    await dp.prewarm(c, "slow", workers=[a.address, b.address], progress=False)
    plugin.plans["slow"].load_seconds = 100.0  # warming w3 is never worth it here
    futs = c.map(short_task, range(60), seconds=0.05)
    while sum(f.done() for f in futs) < 5:
        await asyncio.sleep(0.01)
    assert plugin.plans["slow"].members == {a.address, b.address}
    assert plugin.plans["slow"].resident == {a.address, b.address}
    done_before = {f.key for f in futs if f.done()}
    await a.close()
    assert await c.gather(futs) == [x + 1 for x in range(60)]
    assert a.address not in plugin.plans["slow"].members
    assert plugin.plans["slow"].resident == {b.address}
    assert all(a.address not in states for states in plugin.warm.values())
    assert a.address not in plugin.budgets
    # everything (including results lost with a) now lives on the warm survivor
    assert set(ran_on(s, futs)) == {b.address}
    assert len(done_before) >= 5
    assert await loads(c) == 1  # only b's prewarm is left to count; w3 never loaded


@gen_cluster(client=True, nthreads=[("", 1)], timeout=60)
async def test_only_warm_worker_lost_tasks_move_to_newcomer(c, s, a):
    await dp.install(c, [SLOW])
    futs = c.map(short_task, range(30), seconds=0.05)
    while sum(f.done() for f in futs) < 3:
        await asyncio.sleep(0.01)
    async with Worker(s.address, nthreads=1) as w:
        await a.close()
        assert await c.gather(futs) == [x + 1 for x in range(30)]
        assert set(ran_on(s, futs)) == {w.address}  # lost results recomputed there too
        assert (await dp.stats(c)).total("loads") == 1


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_decorated_tasks_restricted_without_annotation(c, s, a, b):
    plugin = ContextSchedulerPlugin()
    await dp.install(c, [SLOW], scheduler=False)
    await add_plugin(s, plugin)
    fut = c.submit(short_task, 1)
    plain = c.submit(inc, 1)
    await wait([fut, plain])
    assert s.tasks[fut.key].worker_restrictions
    assert not s.tasks[fut.key].loose_restrictions
    assert not s.tasks[plain.key].worker_restrictions
    # delayed and bag (the decorated function nested inside the task) too
    d = dask.delayed(short_task)(2)
    bag = db.from_sequence(range(6), npartitions=3).map(short_task)
    persisted = c.persist([d, bag])
    await wait(persisted)
    assert await c.compute(persisted[1]) == list(range(1, 7))
    assert len(plugin.plans["slow"].pending) == 0
    assert set(plugin.task_context) <= set(s.tasks)  # only tasks the scheduler still knows


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_annotated_tasks_with_dependencies(c, s, a, b):
    await dp.install(c, [SLOW])
    xs = c.map(slowinc, range(10), delay=0.01)
    with dask.annotate(context="slow"):
        ys = c.map(annotated_task, xs)
    assert await c.gather(ys) == [x + 2 for x in range(10)]
    assert all(s.tasks[y.key].worker_restrictions for y in ys)


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_user_restrictions_win(c, s, a, b):
    await dp.install(c, [SLOW])
    fut = c.submit(short_task, 1, workers=[b.address])
    await fut
    assert s.tasks[fut.key].worker_restrictions == {b.address}


@gen_cluster(client=True, nthreads=[("", 2)] * 2)
async def test_plain_tasks_are_untouched(c, s, a, b):
    await dp.install(c, [SLOW])
    futs = c.map(inc, range(200))
    await wait(futs)
    assert not any(s.tasks[f.key].worker_restrictions for f in futs)
    assert dp.ContextSchedulerPlugin.name in s.plugins
    assert not s.plugins["pervasive"].task_context


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_scheduler_plugin_after_warm_workers(c, s, a, b):
    await dp.install(c, [SLOW], scheduler=False)
    await dp.prewarm(c, "slow", workers=[b.address], progress=False)
    plugin = ContextSchedulerPlugin()
    await add_plugin(s, plugin)  # start() asks workers what they hold
    assert plugin.warm["slow"][b.address].state == "resident"
    where = await dp.where(c)
    assert where["slow"]["resident"] == [b.address]
    futs = c.map(short_task, range(5))
    await wait(futs)
    assert set(ran_on(s, futs)) == {b.address}


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_scheduler_plugin_without_worker_plugin(c, s, a, b):
    await c.register_plugin(ContextSchedulerPlugin())
    with pytest.raises(dp.PervasiveError, match="not installed"):
        await c.submit(short_task, 1)


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_failed_context_avoided(c, s, a, b):
    from loaders import load_fails

    broken = dp.Context("broken", load=load_fails, device="cpu")
    await dp.install(c, [broken])
    with dask.annotate(context="broken"):
        fut = c.submit(annotated_task, 1)
    with pytest.raises(dp.ContextLoadError):
        await fut
    where = await dp.where(c)
    assert len(where["broken"]["failed"]) == 1


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_several_clients(c, s, a, b):
    from distributed import Client

    await dp.install(c, [SLOW])
    async with Client(s.address, asynchronous=True) as c2:
        await dp.install(c2, [SLOW])  # idempotent from another client
        f1 = c.map(short_task, range(10))
        f2 = c2.map(short_task, range(10, 20))
        assert await c.gather(f1) + await c2.gather(f2) == [x + 1 for x in range(20)]
    assert await loads(c) <= 2


@gen_test()
async def test_one_deferred_replan_timer_and_the_earliest_wins():
    # A settling backlog schedules a re-plan in 1 s; a submit's within 50 ms must not wait for it.
    plugin = ContextSchedulerPlugin()
    loop = asyncio.get_running_loop()
    plugin._replan_after(1.0)
    late = plugin._replan_later
    plugin._replan_after(0.05)
    assert late.cancelled() and plugin._replan_later.when() <= loop.time() + 0.05
    soon = plugin._replan_later
    plugin._replan_after(1.0)  # later than the one due: kept
    assert plugin._replan_later is soon and not soon.cancelled()
    soon.cancel()
