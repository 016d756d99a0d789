"""Preemption: worker processes SIGKILLed or retired while 1,000 context tasks run.

Real worker processes (``LocalCluster``, Nanny), one thread each. Every
result must arrive exactly once and be right, replacement workers must join
and get work, and the scheduler plugin (and its SourceCoordinator) must keep
no trace of the dead workers.
"""

from __future__ import annotations

import asyncio
import functools
import random

import dask
import pytest
from distributed import Client, LocalCluster
from distributed.utils_test import async_poll_for, gen_cluster, slowinc
from loaders import load_sleep, work
from plugin_helpers import add_plugin
from preemption_tools import (
    CONTEXT,
    assert_no_dead_worker_state,
    collect_once,
    load_files_slow,
    make_source,
    run_task,
    running_workers,
    sigkill,
    wait_for_drained,
    wait_until,
)

import dask_pervasive as dp
from dask_pervasive.scheduler import ContextSchedulerPlugin
from dask_pervasive.worker import EVENT_TOPIC

N_WORKERS = 4
task = dp.uses_context(CONTEXT)(run_task)


def _done(futures) -> int:
    return sum(f.done() for f in futures)


@pytest.mark.timeout(240)
def test_sigkill_and_retire_while_1000_context_tasks_run(tmp_path):
    rng = random.Random(8)
    source = make_source(str(tmp_path / "origin"))
    ctx = dp.Context(CONTEXT, load=functools.partial(load_files_slow, seconds=0.4), source=source, device="cpu")
    with (
        dask.config.set({"distributed.admin.low-level-log-length": 10_000}),  # keep every fault-exec event
        LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        dp.install(client, [ctx])
        original = set(running_workers(client))
        first = client.map(task, range(700), seconds=0.02)
        faults = []  # (kind, worker, results done when it was injected)

        # (a) SIGKILL, mid-run: the nanny starts a replacement (new address).
        wait_until(lambda: _done(first) >= 100, 60, "100 results")
        victim = rng.choice(running_workers(client))
        faults.append(("sigkill", victim, _done(first)))
        sigkill(client, victim)

        # (b) graceful retirement, replaced through cluster.scale.
        wait_until(lambda: _done(first) >= 250, 60, "250 results")
        retired = rng.choice([w for w in running_workers(client) if w != victim])
        name = client.scheduler_info()["workers"][retired]["name"]
        faults.append(("retire", retired, _done(first)))
        client.retire_workers([retired])

        # (a) again, on whichever worker is running now.
        wait_until(lambda: _done(first) >= 400, 60, "400 results")
        victim2 = rng.choice([w for w in running_workers(client) if w not in (victim, retired)])
        faults.append(("sigkill", victim2, _done(first)))
        sigkill(client, victim2)

        cluster.sync(cluster.workers.pop(name).close)  # the retired worker's nanny would otherwise stay
        cluster.scale(N_WORKERS)  # its replacement: same name, new address
        dead = {victim, retired, victim2}
        wait_until(
            lambda: len(set(running_workers(client)) - dead) >= N_WORKERS, 60, "replacement workers", interval=0.1
        )
        assert all(done < len(first) for _, _, done in faults), faults  # each hit a running computation
        replacements = set(running_workers(client)) - original
        assert len(replacements) >= len(original & dead) >= 1, (replacements, faults)
        # A backlog after the replacements joined: they should be warmed and used.
        second = client.map(task, range(700, 1000), seconds=0.02)
        results = collect_once(first + second)

        assert sorted(results) == list(range(1000))
        assert all(value == x + 1 for x, (value, _) in results.items())
        ran_on = {w for _, w in results.values()}
        assert ran_on & replacements, (ran_on, replacements)
        # Re-executions after a kill are allowed (Dask recomputes lost results); lost or
        # duplicated results are not. Events of a killed worker may die with it.
        executed = [msg["x"] for _, msg in client.get_events("fault-exec")]
        assert len(set(executed)) >= 900, len(set(executed))
        print(
            f"preemption: faults={faults}, executions seen={len(executed)} for 1000 results, "
            f"replacements used={len(ran_on & replacements)}/{len(replacements)}"
        )

        state = assert_no_dead_worker_state(client)
        assert set(state["alive"]).isdisjoint(dead)
        assert not any(state["loading"].values()), state["loading"]
        first.clear()  # release the futures: the plugin must forget their tasks
        second.clear()
        drained = wait_for_drained(client)
        assert drained["task_context"] == 0 and not any(drained["pending"].values()), drained
        # The load estimate is the real load (0.4 s plus a small copy), not time lost to kills.
        load_seconds = drained["load_seconds"][CONTEXT]
        assert load_seconds is not None and load_seconds < 10, drained
        assert dp.stats(client).total("failures") == 0


# -- re-planning when workers change state (in-process cluster, ticks switched off) ---------------
SLOW = dp.Context("slow", load=functools.partial(load_sleep, seconds=0.5), device="cpu")
slow_task = dp.uses_context("slow")(work)


def _restrictions(s, futures) -> list[set]:
    return [
        set(s.tasks[f.key].worker_restrictions or ())
        for f in futures
        if f.key in s.tasks and s.tasks[f.key].state in ("waiting", "no-worker", "processing")
    ]


@gen_cluster(client=True, nthreads=[("", 1)] * 2, timeout=60)
async def test_member_evicting_its_context_stops_getting_tasks_at_once(c, s, a, b):
    plugin = await add_plugin(s, ContextSchedulerPlugin(interval="1h"))
    await dp.install(c, [SLOW], scheduler=False)
    await dp.prewarm(c, "slow", progress=False)
    futures = c.map(slow_task, range(200), seconds=0.05)  # ~5 s of work
    await async_poll_for(lambda: plugin.plans["slow"].members == {a.address, b.address}, timeout=10.0)
    # b's cache evicts the context under memory pressure and says so
    b.log_event(EVENT_TOPIC, {"action": "context-state", "context": "slow", "state": "evicted", "loads": 1})
    await async_poll_for(lambda: plugin.warm["slow"][b.address].state == "evicted", timeout=10.0)
    assert plugin.plans["slow"].resident == {a.address}
    await async_poll_for(lambda: set(map(frozenset, _restrictions(s, futures))) == {frozenset({a.address})}, timeout=1)
    assert plugin.plans["slow"].members == {a.address}
    assert await c.gather(futures) == [x + 1 for x in range(200)]


@gen_cluster(client=True, nthreads=[("", 1)] * 2, timeout=60)
async def test_worker_turning_warm_joins_the_set_without_waiting_for_a_tick(c, s, a, b):
    plugin = await add_plugin(s, ContextSchedulerPlugin(interval="1h", prewarm=False))
    await dp.install(c, [SLOW], scheduler=False)
    await dp.prewarm(c, "slow", workers=[a.address], progress=False)
    plugin.plans["slow"].load_seconds = 100.0  # warming b for this backlog is never worth it
    futures = c.map(slow_task, range(150), seconds=0.05)  # ~7 s of work on a alone
    await async_poll_for(lambda: sum(f.done() for f in futures) >= 3, timeout=10.0)
    assert plugin.plans["slow"].members == {a.address}
    await dp.prewarm(c, "slow", workers=[b.address], progress=False)  # b gets it anyway (another job)
    await async_poll_for(lambda: b.address in plugin.plans["slow"].members, timeout=2)
    await c.gather(futures)
    assert b.address in {next(iter(s.tasks[f.key].who_has)).address for f in futures}


@gen_cluster(client=True, nthreads=[("", 1)] * 2, timeout=60)
async def test_submit_restricts_only_new_tasks_when_sets_are_unchanged(c, s, a, b):
    plugin = await add_plugin(s, ContextSchedulerPlugin(interval="1h"))
    await dp.install(c, [SLOW], scheduler=False)
    await dp.prewarm(c, "slow", workers=[a.address], progress=False)
    plugin.plans["slow"].load_seconds = 100.0
    old = c.map(slow_task, range(30), seconds=0.1)
    await async_poll_for(lambda: sum(f.done() for f in old) >= 1, timeout=10.0)
    assert plugin.plans["slow"].members == {a.address}
    applied: list[int] = []
    apply = plugin._apply

    def spy(plan, stimulus_id, keys=None):
        applied.append(len(plan.pending) if keys is None else len(keys))
        return apply(plan, stimulus_id, keys)

    plugin._apply = spy
    new = c.map(slow_task, range(100, 102), seconds=0.1)
    await async_poll_for(lambda: all(f.key in plugin.task_context for f in new), timeout=10.0)
    assert applied == [2]  # O(new tasks), not O(pending)
    assert all(r == {a.address} for r in _restrictions(s, new))
    await c.gather(old + new)


@gen_cluster(client=True, nthreads=[("", 1)] * 2, timeout=30)
async def test_context_task_left_without_a_valid_worker_is_revived(c, s, a, b):
    plugin = await add_plugin(s, ContextSchedulerPlugin(interval="100ms"))
    await dp.install(c, [SLOW], scheduler=False)
    gate = c.submit(slowinc, 1, delay=0.5)
    futures = [c.submit(slow_task, gate, pure=False) for _ in range(3)]
    await async_poll_for(lambda: all(f.key in plugin.task_context for f in futures), timeout=10.0)
    # Something (a restriction applied before a worker left, say) points one task at nowhere.
    s.tasks[futures[0].key].worker_restrictions = {"tcp://127.0.0.1:1"}
    assert await asyncio.wait_for(c.gather(futures), 15) == [3, 3, 3]
