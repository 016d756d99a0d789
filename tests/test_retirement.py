"""Scaling down with contexts: which workers Dask gives back, and how a leaving worker leaves."""

from __future__ import annotations

import asyncio
import functools
import time
import types

import dask
import pytest
from distributed import LocalCluster, Nanny, Worker
from distributed.core import Status
from distributed.utils_test import gen_cluster
from loaders import load_sleep
from plugin_helpers import add_plugin
from transfer_helpers import caps, fake_scheduler, make_model, model_context

import dask_pervasive as dp
from dask_pervasive import scheduler as scheduler_module
from dask_pervasive._protocol import Action, State
from dask_pervasive._retirement import retirement_candidates
from dask_pervasive.scheduler import ContextSchedulerPlugin
from dask_pervasive.transfer import ORIGIN, SourceCoordinator

QUICK = dp.Context("quick", load=functools.partial(load_sleep, seconds=0.05), device="cpu")


@dp.uses_context("quick")
def use_quick(model, x, seconds=0.0):
    time.sleep(seconds)
    return model["value"] + x


def last_joined(s, n: int) -> list[str]:
    """The workers Dask itself closes first among equals (it pops its candidates from the end)."""
    return list(s.workers)[-n:]


def leaving_events(s) -> list[dict]:
    return [m for _, m in s.get_events("pervasive") if m.get("action") == Action.WORKER_LEAVING.value]


# -- the choice alone ----------------------------------------------------------------------------
def _ws(addr: str, nthreads: int = 1):
    return types.SimpleNamespace(address=addr, nthreads=nthreads)


def _wc(state: State, files: bool = True):
    return types.SimpleNamespace(state=state, files=files)


def test_candidates_keep_the_last_holder_of_a_context_in_demand_and_order_the_rest():
    wss = [_ws(a) for a in ("w1", "w2", "w3", "w4", "w5")]
    warm = {
        "busy": {"w4": _wc(State.RESIDENT), "w5": _wc(State.LOADING, files=False)},
        "idle": {"w2": _wc(State.RESIDENT)},
        "gone": {"w1": _wc(State.EVICTED, files=True)},
    }
    staying = {ws.address for ws in wss}
    out = [ws.address for ws in retirement_candidates(wss, staying, warm, demand={"busy"})]
    # w4 (resident) keeps "busy"; w5 holds it too (redundant), w2 only an idle context,
    # w1 only cached files, w3 nothing: Dask closes from the end
    assert out == ["w5", "w2", "w1", "w3"]
    # the idle context in demand too: w2 is kept as well
    out = [ws.address for ws in retirement_candidates(wss, staying, warm, demand={"busy", "idle"})]
    assert out == ["w5", "w1", "w3"]
    # a holder that is not a candidate (busy with a long-running task, leaving excluded) keeps it
    out = [ws.address for ws in retirement_candidates(wss[:4], staying, warm, demand={"busy"})]
    assert "w4" in out
    # a holder that is leaving does not count
    out = [ws.address for ws in retirement_candidates(wss[:4], staying - {"w5"}, warm, demand={"busy"})]
    assert "w4" not in out
    # one worker holding two contexts in demand keeps both
    warm2 = {"x": {"w1": _wc(State.RESIDENT), "w2": _wc(State.RESIDENT)}, "y": {"w2": _wc(State.RESIDENT)}}
    out = [ws.address for ws in retirement_candidates(wss, staying, warm2, demand={"x", "y"})]
    assert "w2" not in out and "w1" in out


def test_candidates_unchanged_with_nothing_warm():
    wss = [_ws("b"), _ws("a")]
    assert [ws.address for ws in retirement_candidates(wss, {"a", "b"}, {}, demand=set())] == ["b", "a"]
    cold = {"m": {"a": _wc(State.EVICTED, files=False)}}
    assert [ws.address for ws in retirement_candidates(wss, {"a", "b"}, cold, demand={"m"})] == ["b", "a"]


# -- retire_workers(n=...) --------------------------------------------------------------------------
@gen_cluster(client=True, nthreads=[("", 1)] * 5)
async def test_retire_n_keeps_both_warm_workers(c, s, *workers):
    await dp.install(c, [QUICK])
    warm = last_joined(s, 2)  # the two Dask alone would close first
    await dp.prewarm(c, "quick", workers=warm, progress=False)
    retired = await c.retire_workers(n=3)
    assert len(retired) == 3
    assert set(s.workers) == set(warm)
    assert (await dp.where(c))["quick"]["resident"] == sorted(warm)


@gen_cluster(client=True, nthreads=[("", 1)] * 5)
async def test_retire_n_without_scheduler_plugin_drops_warm_workers(c, s, *workers):
    """The control for the test above: Dask's own choice closes warm workers here."""
    await dp.install(c, [QUICK], scheduler=False)
    warm = last_joined(s, 2)
    await dp.prewarm(c, "quick", workers=warm, progress=False)
    await c.retire_workers(n=3)
    assert not set(warm) <= set(s.workers)


@gen_cluster(client=True, nthreads=[("", 1)] * 4)
async def test_plain_cluster_unaffected(c, s, *workers):
    plugin = await add_plugin(s, ContextSchedulerPlugin())
    candidates = list(s.workers.values())
    assert plugin.valid_workers_downscaling(s, candidates) is candidates
    expected = s.workers_to_close(n=2)
    assert len(expected) == 2
    assert set(await c.retire_workers(n=2)) == set(expected)


@gen_cluster(client=True, nthreads=[("", 1)] * 3)
async def test_falls_back_to_dasks_choice_on_error(c, s, *workers):
    await dp.install(c, [QUICK])
    warm = last_joined(s, 1)
    await dp.prewarm(c, "quick", workers=warm, progress=False)
    plugin = s.plugins["pervasive"]
    original = scheduler_module.retirement_candidates

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    scheduler_module.retirement_candidates = broken
    try:
        candidates = list(s.workers.values())
        assert plugin.valid_workers_downscaling(s, candidates) is candidates
        assert len(await c.retire_workers(n=2)) == 2  # Dask's choice, whatever it is
    finally:
        scheduler_module.retirement_candidates = original


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config={"pervasive.scheduler.keep-warm": 0})
async def test_idle_context_not_kept_without_keep_warm(c, s, *workers):
    await dp.install(c, [QUICK])
    warm = last_joined(s, 1)
    await dp.prewarm(c, "quick", workers=warm, progress=False)
    # no pending tasks and keep-warm 0: the warm worker may go, but it goes last
    order = s.plugins["pervasive"].valid_workers_downscaling(s, list(s.workers.values()))
    assert order[0].address == warm[0]
    await c.retire_workers(n=3)
    assert not s.workers


@gen_cluster(client=True, nthreads=[("", 1)] * 3, timeout=60)
async def test_retiring_the_warm_worker_with_queued_tasks_retargets_them(c, s, *workers):
    plugin = ContextSchedulerPlugin(prewarm_backlog=1000)  # one warm worker serves the whole backlog
    await dp.install(c, [QUICK], scheduler=False)
    await add_plugin(s, plugin)
    futs = c.map(use_quick, range(40), seconds=0.05)
    while sum(f.done() for f in futs) < 3:
        await asyncio.sleep(0.01)
    (warm,) = plugin.plans["quick"].members
    # the keeper is protected from workers_to_close, but an explicit retirement is obeyed
    assert warm not in s.workers_to_close(n=2)
    await c.retire_workers(workers=[warm])
    assert warm not in s.workers
    assert await c.gather(futs) == [x + 1 for x in range(40)]
    (event,) = [e for e in leaving_events(s) if e["worker"] == warm]
    assert event["status"] == "closing_gracefully" and event["affinity"] == ["quick"]
    assert plugin.plans["quick"].members.isdisjoint({warm})


# -- adapt -------------------------------------------------------------------------------------------
async def _adapt_down_to_one(scheduler_plugin: bool) -> tuple[str, list[str]]:
    cluster = LocalCluster(
        n_workers=5, threads_per_worker=1, processes=False, asynchronous=True, dashboard_address=":0"
    )
    async with cluster, cluster.get_client() as c:
        await dp.install(c, [QUICK], scheduler=scheduler_plugin)
        s = cluster.scheduler
        warm = last_joined(s, 1)[0]
        await dp.prewarm(c, "quick", workers=[warm], progress=False)
        cluster.adapt(minimum=1, maximum=5, interval="50ms", wait_count=1)
        while len(s.workers) > 1:
            await asyncio.sleep(0.02)
        return warm, list(s.workers)


@pytest.mark.parametrize("scheduler_plugin", [True, False])
def test_adapt_on_idle_cluster_keeps_the_warm_worker(scheduler_plugin):
    warm, left = asyncio.run(asyncio.wait_for(_adapt_down_to_one(scheduler_plugin), 60))
    if scheduler_plugin:
        assert left == [warm]
    else:  # the control: Dask alone keeps a cold one here
        assert left != [warm]


# -- graceful leave --------------------------------------------------------------------------------
def _start_leaving(s, addr: str) -> None:
    """What ``Scheduler.retire_workers`` does first: closing_gracefully, on both sides."""
    s.handle_worker_status_change(Status.closing_gracefully, s.workers[addr], "test-leave")
    s.stream_comms[addr].send({"op": "worker-status-change", "status": "closing_gracefully", "stimulus_id": "t"})


@gen_cluster(client=True, nthreads=[("", 1)] * 2, timeout=60)
async def test_leaving_worker_takes_no_new_tasks_and_serves_its_files(c, s, a, b, http_origin):
    make_model(http_origin)
    await dp.install(c, [model_context(http_origin)])
    await dp.prewarm(c, "m", workers=[a.address], progress=False)
    origin_bytes = http_origin.bytes_served
    _start_leaving(s, a.address)
    while a.status != Status.closing_gracefully:
        await asyncio.sleep(0.01)
    (event,) = leaving_events(s)
    assert event["worker"] == a.address and event["contexts"] == ["m"]
    # new context tasks go to the staying worker, which copies the files from the leaving one
    with dask.annotate(context="m"):
        futs = [c.submit(dp.get_context, key=f"get-{i}", pure=False) for i in range(5)]
    await c.gather(futs)
    assert {next(iter(s.tasks[f.key].who_has)).address for f in futs} == {b.address}
    rows = {r["worker"]: r for r in await dp.stats(c) if r["context"] == "m"}
    assert rows[b.address]["bytes_from_peers"] > 0 and rows[b.address]["bytes_from_origin"] == 0
    assert http_origin.bytes_served == origin_bytes


@gen_cluster(client=True, Worker=Nanny, nthreads=[("", 1)] * 2, timeout=120)
async def test_worker_closed_by_its_nanny_counts_as_leaving(c, s, a, b):
    """The orderly close ``dask worker`` does on SIGTERM/SIGINT (nanny closes its worker)."""
    await dp.install(c, [QUICK])
    await dp.prewarm(c, "quick", workers=[a.worker_address], progress=False)
    addr = a.worker_address
    await a.close()
    event = next(e for e in leaving_events(s) if e["worker"] == addr)
    assert event["status"] == "closing" and event["contexts"] == ["quick"]


def test_coordinator_prefers_staying_holders_but_uses_a_leaving_one():
    async def run():
        files = types.SimpleNamespace(files=True)
        s = fake_scheduler("w1", "w2", "w3")
        s.workers["w1"] = types.SimpleNamespace(status=Status.closing_gracefully)
        s.workers["w2"] = types.SimpleNamespace(status=Status.running)
        warm = {"m": {"w1": files, "w2": files}, "n": {"w1": files}}
        co = SourceCoordinator(s, warm, caps(1, 2))
        assert co.holders("m") == ["w2", "w1"]
        for _ in range(2):
            assert (await co.acquire("m", "w3"))["source"] == "w2"
            co.leases.clear()  # keep w2's uploads counted, as if the copies were still running
        # w2's slots are full: the leaving holder still serves
        assert co.uploads["w2"] == 2 and (await co.acquire("m", "w3"))["source"] == "w1"
        # the only holder is leaving: it serves, rather than the origin
        assert (await co.acquire("n", "w3"))["source"] == "w1" != ORIGIN

    asyncio.run(run())


@gen_cluster(client=True, nthreads=[("", 1)], timeout=60)
async def test_replacement_bootstraps_from_the_retiring_worker(c, s, a, http_origin):
    """A worker retiring while a replacement joins: the newcomer copies from it, not from the origin."""
    make_model(http_origin)
    await dp.install(c, [model_context(http_origin)])
    await dp.prewarm(c, "m", progress=False)
    origin_bytes = http_origin.bytes_served
    _start_leaving(s, a.address)
    async with Worker(s.address, nthreads=1) as w:
        await dp.prewarm(c, "m", workers=[w.address], progress=False)
        rows = {r["worker"]: r for r in await dp.stats(c) if r["context"] == "m"}
        assert rows[w.address]["bytes_from_peers"] > 0 and rows[w.address]["bytes_from_origin"] == 0
        assert http_origin.bytes_served == origin_bytes


# -- dp.scale_down ---------------------------------------------------------------------------------
async def _scale_down_keeps_warm() -> tuple[str, dict, list]:
    cluster = LocalCluster(
        n_workers=4, threads_per_worker=1, processes=False, asynchronous=True, dashboard_address=":0"
    )
    async with cluster, cluster.get_client() as c:
        await dp.install(c, [QUICK])
        s = cluster.scheduler
        warm = last_joined(s, 1)[0]  # cluster.scale(1) would remove its spec first
        await dp.prewarm(c, "quick", workers=[warm], progress=False)
        retired = await dp.scale_down(c, 3)
        await cluster  # the spec change has settled
        return warm, {"retired": retired, "spec": sorted(map(str, cluster.worker_spec))}, list(s.workers)


def test_scale_down_keeps_the_warm_worker_and_updates_the_spec():
    warm, out, left = asyncio.run(asyncio.wait_for(_scale_down_keeps_warm(), 60))
    assert left == [warm] and len(out["retired"]) == 3 and warm not in out["retired"]
    assert len(out["spec"]) == 1  # not started again


def test_scale_down_with_a_blocking_client_and_bad_input():
    cluster = LocalCluster(n_workers=3, threads_per_worker=1, processes=False, dashboard_address=":0")
    with cluster, cluster.get_client() as c:
        dp.install(c, [QUICK])
        warm = list(cluster.scheduler.workers)[-1]
        dp.prewarm(c, "quick", workers=[warm], progress=False)
        with pytest.raises(dp.ContextUsageError):
            dp.scale_down(c, -1)
        assert dp.scale_down(c, 0) == []
        assert len(dp.scale_down(c, 2)) == 2
        assert list(cluster.scheduler.workers) == [warm]
        assert len(cluster.worker_spec) == 1
