"""Liveness: failures while preparing a load, pins of cancelled tasks, re-installation, fan-out helpers."""

from __future__ import annotations

import asyncio
import threading

import dask
import numpy as np
import pytest
from distributed import Worker
from distributed.utils_test import async_poll_for, gen_cluster

import dask_pervasive as dp
from dask_pervasive._protocol import EVENT_TOPIC

GATE = threading.Event()
LOADING = threading.Event()


def load_gated(path, device):
    """Loads until GATE is set (the test releases it)."""
    LOADING.set()
    assert GATE.wait(30), "test never opened the gate"
    return {"value": 1}


def load_value(path, device):
    return {"value": 1}


class Wrapper:
    """A user object holding its weights in an attribute."""

    def __init__(self, weights):
        self.weights = weights


def load_linear_dict(path, device):
    import torch

    return {"model": torch.nn.Linear(4096, 4096), "note": "64 MiB of float32 weights"}


def load_wrapped_array(path, device):
    return Wrapper(np.ones(2**23))  # 64 MiB


HELD = threading.Event()
RELEASE = threading.Event()


def load_fresh(path, device):
    return {"value": 1, "torn": False}


def mark_torn(obj):
    obj["torn"] = True


def hold_held(x):
    """Holds context "held" until RELEASE; returns whether it was torn down under it."""
    model = dp.get_context("held")
    HELD.set()
    assert RELEASE.wait(30), "test never released the task"
    return model["torn"]


def broken_cuda(*args, **kwargs):
    raise OSError("libcudart.so.12: cannot open shared object file: No such file or directory")


@gen_cluster(client=True, nthreads=[("", 2)])
async def test_broken_cuda_runtime_fails_load_and_later_tasks_fast(c, s, a, monkeypatch):
    """Item 8: `import torch`/CUDA probing raising OSError ends in `failed` with ContextLoadError."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", broken_cuda)
    await dp.install(c, [dp.Context("gpu", load=load_value, device="auto")], scheduler=False)
    with pytest.raises(dp.ContextLoadError) as info:
        await c.submit(dp.get_context, "gpu", pure=False)
    assert info.value.worker == a.address
    assert isinstance(info.value.__cause__, OSError) and "libcudart" in str(info.value)
    # Later tasks of that context fail fast with the same error instead of waiting on a "loading" entry.
    with pytest.raises(dp.ContextLoadError, match="libcudart"):
        await asyncio.wait_for(c.submit(dp.get_context, "gpu", pure=False), 10)
    (row,) = [r for r in await dp.stats(c) if r["context"] == "gpu"]
    assert row["state"] == "failed" and row["failures"] == 1
    # The scheduler heard of it.
    await async_poll_for(
        lambda: any(m.get("context") == "gpu" and m.get("state") == "failed" for _, m in s.get_events(EVENT_TOPIC)),
        timeout=10.0,
    )


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_cancelling_a_task_while_its_context_loads_releases_the_pin(c, s, a):
    """Item 9: pins follow the task's life, also when it is cancelled mid-load."""
    GATE.clear()
    LOADING.clear()
    await dp.install(c, [dp.Context("slowload", load=load_gated, device="cpu")], scheduler=False)
    fut = c.submit(dp.get_context, "slowload", key="pinned-task")
    await async_poll_for(LOADING.is_set, timeout=10.0)
    await fut.cancel()
    # The worker keeps the task "cancelled" while its thread loads.
    await async_poll_for(lambda: getattr(a.state.tasks.get("pinned-task"), "state", None) == "cancelled", timeout=10.0)
    GATE.set()
    await async_poll_for(
        lambda: "pinned-task" not in a.state.tasks or a.state.tasks["pinned-task"].state == "released", timeout=10.0
    )
    (row,) = [r for r in await dp.stats(c) if r["context"] == "slowload"]
    assert row["state"] == "resident" and row["users"] == 0
    assert await dp.evict(c, "slowload") == {a.address: "evicted"}


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_undeclared_sizes_are_measured_deeply(c, s, a):
    """Item 11: a dict holding a module, an object wrapping an array: measured, so the budget holds."""
    pytest.importorskip("torch")
    loaders = [load_linear_dict, load_linear_dict, load_wrapped_array, load_wrapped_array, load_wrapped_array]
    ctxs = [dp.Context(f"m{i}", load=f, device="cpu") for i, f in enumerate(loaders)]
    await dp.install(c, ctxs, max_bytes="100MiB", scheduler=False)
    for ctx in ctxs:
        await c.submit(dp.get_context, ctx.name, pure=False)
        rows = {r["context"]: r for r in await dp.stats(c)}
        resident = [r for r in rows.values() if r["state"] == "resident"]
        assert [r["context"] for r in resident] == [ctx.name]
        assert 64 * 2**20 <= rows[ctx.name]["host_bytes"] < 65 * 2**20
    assert sum(r["evictions"] for r in rows.values()) == 4


@gen_cluster(client=True, nthreads=[])
async def test_install_on_preloaded_workers_keeps_contexts_in_use(c, s):
    """Item 10: dp.install replaces the --preload plugin; contexts (and what tasks hold) survive."""
    HELD.clear()
    RELEASE.clear()
    module = __name__
    entry = {"name": "held", "load": f"{module}:load_fresh", "teardown": f"{module}:mark_torn", "device": "cpu"}
    with dask.config.set({"pervasive.contexts": [entry]}):
        async with Worker(s.address, nthreads=2, preload=["dask_pervasive.preload"]) as w:
            fut = c.submit(hold_held, 1, workers=[w.address])
            await async_poll_for(HELD.is_set, timeout=10.0)
            await dp.install(c, [dp.Context("extra", load=load_value, device="cpu")], max_bytes="1GiB", scheduler=False)
            RELEASE.set()
            assert await fut is False  # not torn down under the running task
            rows = {r["context"]: r for r in await dp.stats(c)}
            assert rows["held"]["state"] == "resident" and rows["held"]["users"] == 0
            assert rows["held"]["loads"] == 1 and rows["held"]["evictions"] == 0
            assert w.plugins["pervasive"].cache.max_bytes == 2**30  # the new budget applies
            assert await c.submit(lambda: dp.get_context("extra")["value"], workers=[w.address]) == 1
            assert await c.submit(lambda: dp.get_context("held")["torn"], workers=[w.address]) is False
            assert {r["context"]: r["loads"] for r in await dp.stats(c)} == {"held": 1, "extra": 1}


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_prewarm_tolerates_a_worker_leaving_mid_call(c, s, a, b):
    """Item 13: prewarm warms the workers that stay and names the ones that left."""
    GATE.clear()
    LOADING.clear()
    await dp.install(c, [dp.Context("slowload", load=load_gated, device="cpu")], scheduler=False)
    call = asyncio.ensure_future(dp.prewarm(c, "slowload", workers=[a.address, b.address], progress=False))
    leaving = b.plugins["pervasive"].cache.entries["slowload"]
    await async_poll_for(lambda: leaving.state.value == "loading", timeout=10.0)
    await b.close()
    GATE.set()
    warm = await asyncio.wait_for(call, 30)
    assert warm == [a.address] and warm.left == [b.address]
    assert (await dp.where(c))["slowload"]["resident"] == [a.address]
    # The helpers that fan out keep working with the worker gone.
    assert await dp.evict(c, "slowload") == {a.address: "evicted"}


@dp.uses_context("big")
def use_big(model, x):
    return model["value"] + x


@gen_cluster(client=True, nthreads=[])
async def test_tasks_go_only_to_workers_that_can_hold_the_context(c, s):
    """Item 12: declared sizes reach the scheduler before the first load; small workers get none of its tasks.

    Three workers with a 100 MB budget (0.5 of 200 MB), one with 2 GB, a 300 MB context.
    """
    async with (
        Worker(s.address, nthreads=2, memory_limit="200MB") as small,
        Worker(s.address, nthreads=2, memory_limit="200MB") as small2,
        Worker(s.address, nthreads=2, memory_limit="200MB") as small3,
        Worker(s.address, nthreads=2, memory_limit="4GB") as big,
    ):
        await dp.install(c, [dp.Context("big", load=load_value, device="cpu", nbytes="300MB")], max_bytes=0.5)
        # The big worker is the busiest (occupancy is the planner's tie-break between cold
        # workers): only knowing the size keeps the tasks off the idle small ones.
        GATE.clear()
        blocker = c.submit(wait_for_gate, workers=[big.address], pure=False)
        await async_poll_for(lambda: s.workers[big.address].occupancy > 0, timeout=10.0)
        try:
            futures = c.map(use_big, range(40))
            assert await c.gather(futures) == [x + 1 for x in range(40)]
        finally:
            GATE.set()
        await blocker
        ran_on = await c.run_on_scheduler(_where_ran, [f.key for f in futures])
        assert set(ran_on.values()) == {big.address}
        rows = {r["worker"]: r for r in await dp.stats(c) if r["context"] == "big"}
        for w in (small, small2, small3):
            assert rows[w.address]["failures"] == 0 and rows[w.address]["loads"] == 0


def load_150mb(path, device):
    return {"weights": np.ones(150 * 2**20 // 8)}  # 150 MiB, measured after the load (not declared)


@dp.uses_context("grows")
def use_grows(model, x):
    return len(model["weights"]) * 0 + x + 1


# The small worker's 200 MB is below this test process's own RSS: keep Dask's memory monitor from
# pausing it (a paused worker gets no tasks; the budget is what this test is about).
NO_MEMORY_MONITOR = {f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause", "terminate")}


# Work stealing off: it would move the queued tasks to an idle big worker by itself, hiding whether
# the scheduler plugin moves them (it must: stealing is off on some clusters, and skips busy targets).
@gen_cluster(
    client=True, nthreads=[], timeout=90, config={**NO_MEMORY_MONITOR, "distributed.scheduler.work-stealing": False}
)
async def test_queued_tasks_leave_a_worker_found_too_small_after_they_were_sent(c, s):
    """Item 12, size learnt late: tasks already queued on a worker that cannot hold the context move.

    The context declares no size. Its tasks go to the only worker there is (100 MB budget) and wait
    there behind a blocked task; a big worker then loads it (150 MiB, measured): the queued tasks must
    run on the big worker while the small one is still blocked, and nothing loads or fails on the small one.
    """
    grows = dp.Context("grows", load=load_150mb, device="cpu")
    async with Worker(s.address, nthreads=1, memory_limit="200MB") as small:
        await dp.install(c, [grows], max_bytes=0.5)
        GATE.clear()
        blocker = c.submit(wait_for_gate, workers=[small.address], pure=False)
        try:
            futures = c.map(use_grows, range(10))
            await async_poll_for(lambda: all(_processing_on(s, f.key) == small.address for f in futures), timeout=10.0)
            async with Worker(s.address, nthreads=2, memory_limit="4GB") as big:
                await dp.prewarm(c, "grows", workers=[big.address], progress=False)
                # the small worker is still blocked: these can only finish on the big one
                assert await asyncio.wait_for(c.gather(futures), 60) == [x + 1 for x in range(10)]
                ran_on = await c.run_on_scheduler(_where_ran, [f.key for f in futures])
                assert set(ran_on.values()) == {big.address}
        finally:
            GATE.set()
        await blocker
        row = {r["worker"]: r for r in await dp.stats(c) if r["context"] == "grows"}.get(small.address, {})
        assert row.get("loads", 0) == 0 and row.get("failures", 0) == 0


def _processing_on(s, key):
    ts = s.tasks.get(key)
    return ts.processing_on.address if ts is not None and ts.processing_on is not None else None


def wait_for_gate():
    assert GATE.wait(30), "test never opened the gate"


def _where_ran(keys, dask_scheduler):
    return {k: next(iter(ts.who_has)).address for k in keys if (ts := dask_scheduler.tasks.get(k)) and ts.who_has}


@gen_cluster(client=True, nthreads=[])
async def test_conflicting_replacement_on_preloaded_workers_is_refused_and_keeps_the_resident(c, s):
    """Item 10: a replacing plugin redefining a resident context is refused; the resident one stays."""
    module = __name__
    entry = {"name": "held", "load": f"{module}:load_fresh", "teardown": f"{module}:mark_torn", "device": "cpu"}
    with dask.config.set({"pervasive.contexts": [entry]}):
        async with Worker(s.address, nthreads=1, preload=["dask_pervasive.preload"]) as w:
            model_value = await c.submit(lambda: dp.get_context("held")["value"], workers=[w.address])
            assert model_value == 1
            held = w.plugins["pervasive"].cache.entries["held"].value
            other = dp.Context("held", load=load_value, device="cpu")  # same name, another definition
            with pytest.raises(Exception, match="different definition"):
                await c.register_plugin(dp.ContextWorkerPlugin([other]))
            entry_now = w.plugins["pervasive"].cache.entries["held"]
            assert entry_now.state.value == "resident" and entry_now.value is held and held["torn"] is False
