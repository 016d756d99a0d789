"""The joint planner wired into the scheduler plugin: its measurements and views, on small clusters."""

from __future__ import annotations

import asyncio
import functools
import threading
import time

import dask
import pytest
from distributed import get_worker
from distributed.utils_test import async_poll_for, gen_cluster
from loaders import load_sleep
from plugin_helpers import add_plugin

import dask_pervasive as dp
from dask_pervasive.scheduler import ContextSchedulerPlugin

QUICK = dp.Context("quick", load=functools.partial(load_sleep, seconds=0.1), device="cpu")
# Loads of 1 s: a cold worker pays only for an imbalance of more than 2 s (10 tasks of 0.2 s) between two
# backlogs. Tasks of 0.2 s (not 0.04 s) keep scheduling overhead, which a busy machine inflates, a small part
# of each measured duration, so two prefixes' estimates stay within that margin of each other.
FIRST = dp.Context("first", load=functools.partial(load_sleep, seconds=1.0), device="cpu")
OTHER = dp.Context("other", load=functools.partial(load_sleep, seconds=1.0), device="cpu")

#: Addresses whose tasks take twice as long (the workers run in this process).
SLOW_WORKERS: set[str] = set()


@dp.uses_context("quick")
def timed_task(model, x):
    time.sleep(0.04 * (2 if get_worker().address in SLOW_WORKERS else 1))
    return model["value"] + x


@dp.uses_context("first")
def first_task(model, x, seconds=0.04):
    time.sleep(seconds)
    return model["value"] + x


@dp.uses_context("other")
def other_task(model, x, seconds=0.04):
    time.sleep(seconds)
    return model["value"] + x


def placements(s):
    return [m for _, m in s.get_events("pervasive") if m.get("action") == "placement"]


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_a_twice_slower_worker_is_measured_twice_slower(c, s, a, b):
    plugin = await add_plugin(s, ContextSchedulerPlugin(prewarm_backlog=1, interval="100ms"))
    await dp.install(c, [QUICK], scheduler=False)
    await dp.prewarm(c, "quick", workers=[a.address, b.address], progress=False)
    SLOW_WORKERS.add(b.address)
    try:
        await c.gather(c.map(timed_task, range(60)))
    finally:
        SLOW_WORKERS.clear()
    rates = plugin.rates
    assert rates[a.address].tasks > 0 and rates[b.address].tasks > 0
    # The prefix average lies between the two: the slow one is above 1, the fast one below, about 2x apart.
    assert rates[b.address].speed > 1.0 > rates[a.address].speed
    assert 1.4 < rates[b.address].speed / rates[a.address].speed < 3.0
    assert plugin.replan_seconds and max(plugin.replan_seconds) < 5.0


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_worker_views_are_rebuilt_only_when_the_worker_reports(c, s, a, b):
    plugin = await add_plugin(s, ContextSchedulerPlugin(interval="10s"))
    await dp.install(c, [QUICK], scheduler=False)
    await dp.prewarm(c, "quick", workers=[a.address], progress=False)
    plugin.replan("test-1")
    views = plugin._views
    before = {addr: entry[1] for addr, entry in views.items()}
    assert before[a.address].contexts["quick"].state == "resident"
    assert "quick" not in before[b.address].contexts
    plugin.replan("test-2")
    assert all(views[addr][1] is view for addr, view in before.items())  # nothing reported: reused
    await dp.prewarm(c, "quick", workers=[b.address], progress=False)
    plugin.replan("test-3")
    assert views[a.address][1] is before[a.address]
    assert views[b.address][1] is not before[b.address]
    assert views[b.address][1].contexts["quick"].state == "resident"
    assert views[b.address][1].contexts["quick"].load_seconds is not None  # its own load time


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_a_worker_serving_one_context_is_not_free_for_another(c, s, a, b):
    """Each context warm on its own worker, both with a backlog: neither takes the other's worker."""
    plugin = await add_plugin(s, ContextSchedulerPlugin(prewarm_backlog=2, interval="100ms"))
    await dp.install(c, [FIRST, OTHER], scheduler=False)
    await asyncio.gather(
        dp.prewarm(c, "first", workers=[a.address], progress=False),
        dp.prewarm(c, "other", workers=[b.address], progress=False),
    )
    for i in range(2):  # Dask learns both durations
        await c.submit(first_task, -1 - i, seconds=0.2, workers=[a.address])
        await c.submit(other_task, -1 - i, seconds=0.2, workers=[b.address])
    # One graph, so both backlogs are known to the same plan (two maps would let the first take b).
    # 4 s of backlog each: seen one context at a time, the other's worker looks free and joining it
    # cold would pay ((4 + 1) / 2 < 4); seen jointly it is busy for as long.
    tasks = [dask.delayed(first_task)(i, seconds=0.2) for i in range(20)]
    tasks += [dask.delayed(other_task)(i, seconds=0.2) for i in range(20)]
    await c.gather(c.compute(tasks))
    assert plugin.plans["first"].cold_placements == 0 and plugin.plans["other"].cold_placements == 0
    assert (await dp.stats(c)).total("loads") == 2
    assert {e["reason"].split(" (")[0] for e in placements(s)} == {"first worker"}


#: Per-worker gates for ``gated_task`` (the workers run in this process).
GATES: dict[str, threading.Event] = {}


@dp.uses_context("quick")
def gated_task(model, x):
    assert GATES[get_worker().address].wait(timeout=30)
    return get_worker().address


def plain_gated(x):
    assert GATES[get_worker().address].wait(timeout=30)
    return x


def processing_of(s, addr):
    return sum(1 for ts in s.workers[addr].processing if ts.key in s.plugins[ContextSchedulerPlugin.name].task_context)


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_queued_work_per_worker_follows_transitions(c, s, a, b):
    """The index behind the planner's queued work matches Dask's processing sets, and empties;
    plain tasks count as the worker's occupancy beyond ours."""
    plugin = await add_plugin(s, ContextSchedulerPlugin(prewarm_backlog=1, interval="10s"))
    await dp.install(c, [QUICK], scheduler=False)
    await dp.prewarm(c, "quick", workers=[a.address, b.address], progress=False)
    GATES.update({a.address: threading.Event(), b.address: threading.Event()})
    GATES[a.address].set()
    await c.submit(gated_task, -1, workers=[a.address])  # Dask learns the duration (user restricted: not ours)
    GATES[a.address] = threading.Event()
    try:
        futures = c.map(gated_task, range(6))
        plain = c.submit(plain_gated, 1, workers=[a.address])
        await async_poll_for(lambda: sum(len(ws.processing) for ws in s.workers.values()) == 7, timeout=10)
        for addr in (a.address, b.address):
            assert plugin.queues.count(addr, "quick") == processing_of(s, addr)
        plugin.replan("test")
        duration = s.task_prefixes["gated_task"].duration_average
        assert duration > 0
        queued = plugin._queued_work({"quick": duration})
        assert queued.tasks == {
            addr: {"quick": processing_of(s, addr)} for addr in (a.address, b.address) if processing_of(s, addr)
        }
        assert queued.plain_seconds.keys() == {a.address}
        ours = processing_of(s, a.address) * duration
        assert queued.plain_seconds[a.address] == pytest.approx(s.workers[a.address].occupancy - ours)
        for gate in GATES.values():
            gate.set()
        await c.gather(futures + [plain])
        assert len(plugin.queues) == 0 and plugin.queues.tasks == {}
    finally:
        GATES.clear()


@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 2,
    config={"distributed.scheduler.work-stealing-interval": "1h"},  # Dask's own balancing never runs
)
async def test_a_member_that_runs_dry_takes_queued_work_from_another(c, s, a, b):
    """Both warm, tasks split between them; the one that finishes first takes the other's queued task."""
    plugin = await add_plugin(s, ContextSchedulerPlugin(prewarm_backlog=1, interval="10s"))
    await dp.install(c, [QUICK], scheduler=False)
    await dp.prewarm(c, "quick", workers=[a.address, b.address], progress=False)
    GATES.update({a.address: threading.Event(), b.address: threading.Event()})
    try:
        futures = c.map(gated_task, range(4))
        await async_poll_for(lambda: sum(len(ws.processing) for ws in s.workers.values()) == 4, timeout=10)
        assert plugin.plans["quick"].members == {a.address, b.address}
        first, other = sorted((a.address, b.address), key=lambda addr: processing_of(s, addr))
        assigned = processing_of(s, first)
        assert 1 <= assigned <= 2 and processing_of(s, other) - 1 >= 1  # ``other`` has a task queued
        GATES[first].set()  # only ``first`` runs: ``other`` stays busy with its running task
        await async_poll_for(lambda: sum(f.done() for f in futures) == 4 - 1, timeout=10)
        done = await c.gather([f for f in futures if f.done()])
        assert done == [first] * 3  # it ran its own and took the one queued behind ``other``'s running task
        GATES[other].set()
        assert sorted(await c.gather(futures)) == sorted([first] * 3 + [other])
    finally:
        for gate in GATES.values():
            gate.set()
        GATES.clear()
