"""Workers killed in the middle of loading (or copying) a context.

The task must be rescheduled and succeed on another worker; the scheduler
plugin must forget the dead worker's in-flight load (``loading_since``), not
keep the affinity set on it, not learn a wrong load time from the killed
attempt, and free the origin / upload slots the dead worker held.
"""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path

import pytest
from distributed import Client, LocalCluster
from loaders import load_sleep
from preemption_tools import (
    assert_no_dead_worker_state,
    collect_once,
    load_files_slow,
    run_task,
    running_workers,
    sigkill,
    wait_until,
    worker_references,
)
from transfer_helpers import caps, fake_scheduler

import dask_pervasive as dp
from dask_pervasive.transfer import ORIGIN, WAIT, SourceCoordinator

LOAD_SECONDS = 4.0


def _loading(client, name: str) -> list[str]:
    return client.run_on_scheduler(worker_references)["loading"].get(name, [])


@pytest.mark.timeout(180)
def test_worker_killed_while_loading_task_moves_and_state_is_clean():
    ctx = dp.Context("midload", load=functools.partial(load_sleep, seconds=LOAD_SECONDS), device="cpu")
    task = dp.uses_context("midload")(run_task)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        dp.install(client, [ctx])
        futures = client.map(task, range(6))
        wait_until(lambda: _loading(client, "midload"), 30, "a worker loading the context", interval=0.05)
        (victim,) = _loading(client, "midload")
        sigkill(client, victim)  # in the middle of its 4 s load

        results = collect_once(futures)
        assert {x: v for x, (v, _) in results.items()} == {x: x + 1 for x in range(6)}
        assert victim not in {w for _, w in results.values()}
        state = assert_no_dead_worker_state(client)
        assert victim not in state["members"].get("midload", [])
        assert not state["loading"]["midload"], state["loading"]
        # The estimate is the successful load; the killed attempt taught it nothing.
        measured = state["load_seconds"]["midload"]
        assert measured is not None and 0.9 * LOAD_SECONDS <= measured < 2 * LOAD_SECONDS, measured
        # The load was taken out of the tasks' durations (get_context time is not compute time).
        prefix = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.task_prefixes["run_task"].duration_average
        )
        assert 0 <= prefix < 1.0, prefix


def _registered(dask_scheduler) -> list[str]:
    return sorted(dask_scheduler.workers)


def _origin_readers(dask_scheduler) -> list[str]:
    transfer = dask_scheduler.plugins["pervasive"].transfer
    return [lease.receiver for lease in transfer.leases.values() if lease.source == "origin"]


@pytest.mark.timeout(180)
def test_worker_killed_while_reading_the_origin_frees_its_slot(http_origin):
    model = Path(http_origin.directory, "model")
    model.mkdir()
    for i in range(2):
        (model / f"w{i}.bin").write_bytes(os.urandom(12 * 2**20))  # ~1.2 s at the origin's 20 MB/s
    ctx = dp.Context(
        "midfetch",
        load=functools.partial(load_files_slow, seconds=0.1),
        source=http_origin.url("model/"),
        device="cpu",
    )
    task = dp.uses_context("midfetch")(run_task)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        dp.install(client, [ctx])
        futures = client.map(task, range(4))
        wait_until(lambda: client.run_on_scheduler(_origin_readers), 30, "an origin reader", interval=0.02)
        (victim,) = client.run_on_scheduler(_origin_readers)
        sigkill(client, victim)

        results = collect_once(futures)
        assert {x: v for x, (v, _) in results.items()} == {x: x + 1 for x in range(4)}
        assert victim not in {w for _, w in results.values()}
        state = assert_no_dead_worker_state(client)  # no lease, no origin slot, no upload slot left
        assert victim not in state["alive"]
        # The nanny's replacement registers first and reports "running" a moment later: wait for
        # every registered worker to be running (compared at one instant, this raced).
        wait_until(
            lambda: set(running_workers(client)) == set(client.run_on_scheduler(_registered)),
            60,
            "every registered worker running",
            describe=lambda: (running_workers(client), client.run_on_scheduler(_registered)),
        )


def test_receiver_dying_while_waiting_for_a_source_gets_no_lease():
    """A worker long-polling for a source dies; the slot that frees up later must not be leased to it."""

    async def run():
        s = fake_scheduler("w1", "w2")
        co = SourceCoordinator(s, {}, caps(1, 1))
        first = await co.acquire("other", "w1")
        assert first["source"] == ORIGIN  # the one origin slot
        waiter = asyncio.ensure_future(co.acquire("m", "w2", wait=5))  # nobody has "m": waits for the origin
        await asyncio.sleep(0.05)
        assert not waiter.done()
        del s.workers["w2"]  # the waiting receiver dies ...
        co.remove_worker("w2")
        co.release(first["lease"], ok=True)  # ... before the origin slot frees up
        reply = await asyncio.wait_for(waiter, 2)
        assert reply["lease"] is None and reply["source"] == WAIT
        assert not co.leases and co.origin_active == 0

    asyncio.run(run())
