"""The worker plugin and client helpers on in-process clusters."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time

import dask
import dask.bag as db
import pytest
from distributed import Worker, wait
from distributed.utils_test import gen_cluster
from loaders import add_one_with, load_array, load_fails, load_slow

import dask_pervasive as dp

VALUE = dp.Context("v", load=lambda path, device: {"value": 10}, device="cpu")


def use_value(x):
    return dp.get_context("v")["value"] + x


def annotated(x):
    return dp.get_context()["value"] + x


@dp.uses_context("v")
def decorated(model, x):
    return model["value"] + x


HELD, RELEASE = threading.Event(), threading.Event()


def hold_until_released(x):
    """Holds context "v" until the test sets RELEASE (in-process workers share the events)."""
    dp.get_context("v")
    HELD.set()
    assert RELEASE.wait(30)
    return x


async def total(c, key, context=None):
    return (await dp.stats(c)).total(key, context)


@gen_cluster(client=True, nthreads=[("", 4)] * 2)
async def test_many_tasks_one_load_per_worker(c, s, a, b):
    await dp.install(c, [VALUE], scheduler=False)
    results = await c.gather(c.map(use_value, range(100)))
    assert results == [x + 10 for x in range(100)]
    assert await total(c, "loads", "v") <= 2
    assert await total(c, "loads") + await total(c, "hits") == 100


@gen_cluster(client=True)
async def test_annotation_and_decorator(c, s, a, b):
    await dp.install(c, [VALUE], scheduler=False)
    with dask.annotate(context="v"):
        assert await c.submit(annotated, 1) == 11
    assert await c.submit(decorated, 2) == 12
    assert await c.compute(dask.delayed(decorated)(3)) == 13
    bag = db.from_sequence(range(10), npartitions=3).map(decorated)
    assert sorted(await c.compute(bag)) == list(range(10, 20))
    with dask.annotate(context="v"):
        total_ = db.from_sequence(range(10), npartitions=3).map(annotated).sum()
        assert await c.compute(total_, optimize_graph=False) == sum(range(10, 20))


@gen_cluster(client=True)
async def test_missing_annotation_is_clear(c, s, a, b):
    await dp.install(c, [VALUE], scheduler=False)
    with pytest.raises(dp.PervasiveError, match="annotate"):
        await c.submit(annotated, 1)
    with dask.annotate(context=["v"]), pytest.raises(TypeError, match="must be a string"):
        await c.submit(annotated, 1, pure=False)


@gen_cluster(client=True)
async def test_unknown_context_fails_fast(c, s, a, b):
    await dp.install(c, [VALUE], scheduler=False)
    start = time.monotonic()
    with pytest.raises(dp.UnknownContextError, match="known contexts: 'v'"):
        await c.submit(dp.get_context, "nope")
    assert time.monotonic() - start < 5
    with pytest.raises(dp.UnknownContextError):
        await dp.prewarm(c, "nope", progress=False)
    with pytest.raises(dp.UnknownContextError):
        await dp.evict(c, "nope")


@gen_cluster(client=True)
async def test_loader_failure_names_worker_and_context(c, s, a, b):
    await dp.install(c, [dp.Context("broken", load=load_fails, device="cpu")], scheduler=False)
    fut = c.submit(dp.get_context, "broken", workers=[a.address])
    with pytest.raises(dp.ContextLoadError) as info:
        await fut
    err = info.value
    assert err.context == "broken" and err.worker == a.address
    assert "weights are corrupt" in str(err)
    assert await total(c, "failures", "broken") == 1
    # failing again is immediate, without a retry loop
    with pytest.raises(dp.ContextLoadError):
        await c.submit(dp.get_context, "broken", workers=[a.address], pure=False)
    assert await total(c, "failures", "broken") == 1


@gen_cluster(client=True, nthreads=[("", 2)])
async def test_budget_alternation_evicts_and_reloads(c, s, a):
    ctxs = [dp.Context(n, load=load_array, device="cpu", nbytes="1MiB") for n in "ab"]
    await dp.install(c, ctxs, max_bytes="1.5MiB", scheduler=False)
    for i in range(6):
        name = "ab"[i % 2]
        await c.submit(dp.get_context, name, pure=False)
    rows = {r["context"]: r for r in await dp.stats(c)}
    assert rows["a"]["loads"] == 3 and rows["b"]["loads"] == 3
    assert rows["a"]["evictions"] == 3 and rows["b"]["evictions"] == 2
    assert (await dp.where(c))["b"]["resident"] == [a.address]


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_too_large_context(c, s, a):
    await dp.install(
        c, [dp.Context("big", load=load_array, nbytes="10GiB", device="cpu")], max_bytes="1GiB", scheduler=False
    )
    with pytest.raises(dp.ContextTooLargeError, match="max_bytes"):
        await c.submit(dp.get_context, "big")
    await dp.install(c, [dp.Context("measured", load=load_array, device="cpu")], scheduler=False)
    # a second cluster-wide budget does not apply (install is idempotent); check the measured path directly
    a.plugins["pervasive"].cache.max_bytes = 1000
    with pytest.raises(dp.ContextTooLargeError):
        await c.submit(dp.get_context, "measured")


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_register_later_and_new_workers(c, s, a):
    await dp.install(c, [VALUE], scheduler=False)
    extra = dp.Context("late", load=lambda path, device: {"value": 100}, device="cpu")
    assert await dp.register(c, extra) is True
    assert await dp.register(c, extra) is False  # idempotent
    with pytest.raises(ValueError, match="different context"):
        await dp.register(c, dp.Context("late", load=load_slow, device="cpu"))
    async with Worker(s.address, nthreads=1) as w:
        assert w.plugins["pervasive"].cache.entries.keys() == {"v", "late"}
        fut = c.submit(decorated, 1, workers=[w.address])
        assert await fut == 11
        assert await c.submit(lambda: dp.get_context("late")["value"], workers=[w.address]) == 100


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_declaration_before_plugin(c, s, a):
    """register() before the worker plugin: the context waits and is picked up."""
    await dp.register(c, VALUE)
    with pytest.raises(dp.PervasiveError, match="not installed"):
        await c.submit(use_value, 1)
    await dp.install(c, scheduler=False)
    assert await c.submit(use_value, 1, pure=False) == 11


@gen_cluster(client=True, nthreads=[("", 1)] * 3)
async def test_prewarm_where_evict(c, s, a, b, w3):
    await dp.install(c, [dp.Context("slow", load=load_slow, device="cpu")], scheduler=False)
    warm = await dp.prewarm(c, "slow", n_workers=2, progress=False)
    assert len(warm) == 2
    placement = await dp.where(c)
    assert sorted(placement["slow"]["resident"]) == sorted(warm)
    assert await dp.prewarm(c, "slow", workers=[a.address], progress=False) == [a.address]
    await dp.prewarm(c, "slow", progress=False)
    assert len((await dp.where(c))["slow"]["resident"]) == 3
    assert await total(c, "loads", "slow") == 3
    result = await dp.evict(c, "slow", workers=[a.address])
    assert result == {a.address: "evicted"}
    assert a.address not in (await dp.where(c))["slow"]["resident"]
    assert set((await dp.evict(c, "slow")).values()) == {"evicted", "not-resident"}


@gen_cluster(client=True, nthreads=[("", 2)])
async def test_evict_refuses_in_use(c, s, a):
    await dp.install(c, [VALUE], scheduler=False)

    HELD.clear()
    RELEASE.clear()
    fut = c.submit(hold_until_released, 1)
    while not HELD.is_set():  # the task holds the context until we release it: no timing margin
        await asyncio.sleep(0.01)
    try:
        assert await dp.evict(c, "v") == {a.address: "in-use"}
    finally:
        RELEASE.set()
    await fut
    assert await dp.evict(c, "v") == {a.address: "evicted"}


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_state_events_reach_scheduler(c, s, a):
    await dp.install(c, [VALUE], scheduler=False)
    await c.submit(use_value, 1)

    def states_seen():
        return [m["state"] for _, m in s.get_events("pervasive") if m["action"] == "context-state"]

    deadline = time.monotonic() + 10
    while "resident" not in states_seen() and time.monotonic() < deadline:  # events travel asynchronously
        await asyncio.sleep(0.01)
    events = [m for _, m in s.get_events("pervasive")]
    states = [m["state"] for m in events if m["action"] == "context-state"]
    assert states[-2:] == ["loading", "resident"]
    budgets = [m for m in events if m["action"] == "worker-budget"]
    assert budgets and budgets[0]["worker"] == a.address and budgets[0]["max_bytes"] > 0


def test_stats_to_pandas_without_pandas_names_the_extra(monkeypatch):
    import sys

    from dask_pervasive.client import ContextStatsTable

    monkeypatch.setitem(sys.modules, "pandas", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"needs pandas.*dask-pervasive\[pandas\]"):
        ContextStatsTable([{"worker": "w", "context": "v", "loads": 1}]).to_pandas()


@gen_cluster(client=True)
async def test_stats_to_pandas(c, s, a, b):
    pytest.importorskip("pandas")
    await dp.install(c, [VALUE], scheduler=False)
    await wait(c.map(use_value, range(10)))
    df = (await dp.stats(c)).to_pandas()
    for col in (
        "worker",
        "context",
        "loads",
        "hits",
        "evictions",
        "load_seconds",
        "bytes_from_peers",
        "bytes_from_origin",
        "failures",
    ):
        assert col in df.columns
    assert df["loads"].sum() + df["hits"].sum() == 10


@gen_cluster(client=True)
async def test_direct_plugin_registration(c, s, a, b):
    await c.register_plugin(dp.ContextWorkerPlugin([VALUE], max_bytes="1GiB"))
    assert await c.submit(decorated, 5) == 15
    assert a.plugins["pervasive"].cache.max_bytes == 2**30
    with pytest.raises(ValueError, match="different context"):
        await dp.register(c, dp.Context("v", load=load_slow, device="cpu"))


def test_get_context_outside_worker():
    with pytest.raises(dp.PervasiveError, match="inside a task"):
        dp.get_context("v")


def test_bad_plugin_arguments():
    with pytest.raises(ValueError, match="max_bytes"):
        dp.ContextWorkerPlugin(max_bytes="lots")
    with pytest.raises(TypeError, match="Context"):
        dp.ContextWorkerPlugin(["not a context"])
    with pytest.raises(ValueError, match="two different contexts"):
        dp.ContextWorkerPlugin([VALUE, dp.Context("v", load=load_slow)])
    with pytest.raises(TypeError):
        dp.uses_context(3)


def test_uses_context_decorator_keeps_metadata():
    assert decorated.__name__ == "decorated"
    from dask_pervasive.task import context_of

    assert context_of(decorated) == "v" and context_of(use_value) is None
    assert add_one_with({"value": 1}, 1) == 2


def test_origin_retry_settings_travel_with_the_plugin():
    """pervasive.transfer.retries/backoff/stall-timeout are read on the client, like the other settings."""
    with dask.config.set(
        {
            "pervasive.transfer.retries": 0,
            "pervasive.transfer.retry-backoff": "10ms",
            "pervasive.transfer.stall-timeout": "7s",
        }
    ):
        plugin = dp.ContextWorkerPlugin([])
    transfer = pickle.loads(pickle.dumps(plugin)).settings.transfer
    assert (transfer.retries, transfer.retry_backoff, transfer.stall_timeout) == (0, 0.01, 7.0)
    with dask.config.set({"pervasive.transfer.retries": "lots"}), pytest.raises(dp.ConfigurationError):
        dp.ContextWorkerPlugin([])
    with dask.config.set({"pervasive.transfer.retries": -1}), pytest.raises(dp.ConfigurationError):
        dp.ContextWorkerPlugin([])
