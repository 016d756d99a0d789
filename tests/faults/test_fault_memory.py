"""Fault injection: memory. Contexts too large, budgets exhausted by contexts in use, GPU OOM in load.

Cache-level tests drive :class:`ContextCache` with real threads; cluster tests
check what the client sees. CUDA is simulated on CPU: ``torch.cuda.OutOfMemoryError``
is constructible without a GPU, and ``devices.cuda_device_count`` is patched
so a ``cuda`` context passes the device check.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

import dask
import pytest
from distributed.utils_test import captured_logger, gen_cluster
from loaders import load_array

import dask_pervasive as dp
from dask_pervasive import devices
from dask_pervasive.cache import ContextCache

torch = pytest.importorskip("torch")

MiB = 2**20


class Blob:
    """A loaded object we can watch die (weakref) and size (``__sizeof__``)."""

    def __init__(self, nbytes: int = 100) -> None:
        self.nbytes = nbytes

    def __sizeof__(self) -> int:
        return self.nbytes


class Loader:
    """Counts calls; returns a fresh ``Blob``; can fail with a given exception first."""

    def __init__(self, nbytes: int = 100, fail_with=(), partial_refs=None) -> None:
        self.nbytes = nbytes
        self.failures = list(fail_with)
        self.calls = 0
        self.objects: list[weakref.ref] = []
        self.partial_refs = partial_refs

    def __call__(self, path, device):
        self.calls += 1
        if self.failures:
            partial = Blob(self.nbytes)  # what a half-done load holds when it fails
            if self.partial_refs is not None:
                self.partial_refs.append(weakref.ref(partial))
            raise self.failures.pop(0)
        obj = Blob(self.nbytes)
        self.objects.append(weakref.ref(obj))
        return obj


def oom() -> BaseException:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def make_cache(tmp_path, **kw) -> ContextCache:
    return ContextCache("tcp://w:1", str(tmp_path / "cache"), **kw)


def states(cache: ContextCache) -> dict[str, str]:
    return {r["context"]: r["state"] for r in cache.snapshot()}


def host_used(cache: ContextCache) -> int:
    return sum(r["host_bytes"] for r in cache.snapshot() if r["state"] in ("resident", "loading", "fetching"))


def in_thread(fn, *args):
    """Run ``fn(*args)`` in a thread; returns (thread, box) with box["value"] or box["error"]."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, box


# -- (a) contexts larger than the budget ------------------------------------------------
def test_measured_too_large_is_released(tmp_path):
    """Undeclared size: measured after load, refused, torn down and garbage (nothing keeps it)."""
    torn = []
    load = Loader(nbytes=10_000)
    cache = make_cache(tmp_path, max_bytes=1000)
    cache.declare(dp.Context("big", load=load, device="cpu", teardown=torn.append))
    with pytest.raises(dp.ContextTooLargeError) as info:
        cache.acquire("big", key="t1")
    err = info.value
    assert (err.context, err.budget, err.worker) == ("big", 1000, "tcp://w:1") and err.nbytes >= 10_000
    del info, err
    gc.collect()
    assert len(torn) == 1
    torn.clear()
    assert load.objects[0]() is None  # no reference left: the memory really went back
    (row,) = cache.snapshot()
    assert row["state"] == "failed" and row["host_bytes"] == 0 and row["users"] == 0


def test_failed_load_keeps_nothing_alive(tmp_path):
    """Whatever the loader held when it raised is freed, although the error is kept for fail-fast."""
    partial: list = []
    cache = make_cache(tmp_path)
    cache.declare(dp.Context("bad", load=Loader(fail_with=[RuntimeError("corrupt")], partial_refs=partial)))
    with pytest.raises(dp.ContextLoadError):
        cache.acquire("bad")
    gc.collect()
    assert cache.entries["bad"].error is not None
    assert partial[0]() is None


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_too_large_reaches_client_with_what_to_do(c, s, a):
    from loaders import LOADS

    before = len(LOADS)
    big = dp.Context("big", load=load_array, nbytes="10GiB", device="cpu")
    measured = dp.Context("measured", load=load_array, device="cpu")  # 1 MiB once loaded
    await dp.install(c, [big, measured], max_bytes="100KiB", scheduler=False)
    with pytest.raises(dp.ContextTooLargeError) as info:
        await c.submit(dp.get_context, "big")
    msg = str(info.value)
    for part in ("'big'", "10.00 GiB", "100.00 kiB", a.address, "raise max_bytes", "pervasive.worker.max-bytes"):
        assert part in msg, (part, msg)
    assert len(LOADS) == before  # declared size: refused before loading
    with pytest.raises(dp.ContextTooLargeError) as info:
        await c.submit(dp.get_context, "measured")
    assert info.value.context == "measured" and info.value.nbytes >= MiB and info.value.worker == a.address
    rows = {r["context"]: r for r in await dp.stats(c)}
    assert rows["big"]["state"] == rows["measured"]["state"] == "failed"
    assert rows["measured"]["host_bytes"] == 0


# -- (b) budget exhausted by contexts in use ----------------------------------------------
def test_load_waits_for_in_use_context_then_succeeds(tmp_path):
    """Room is taken by a pinned context: the load waits (not over budget) and proceeds on release."""
    b_load = Loader()
    cache = make_cache(tmp_path, max_bytes=150, budget_wait=30)
    cache.declare(dp.Context("a", load=Loader(), nbytes=100, device="cpu"))
    cache.declare(dp.Context("b", load=b_load, nbytes=100, device="cpu"))
    cache.acquire("a", key="t1")
    t, box = in_thread(cache.acquire, "b", "t2")
    time.sleep(0.3)
    assert t.is_alive() and b_load.calls == 0  # waiting before loading, not loaded over budget
    assert host_used(cache) <= 150
    cache.release("t1")
    t.join(10)
    assert "error" not in box and isinstance(box["value"], Blob)
    assert states(cache) == {"a": "evicted", "b": "resident"}
    assert host_used(cache) <= 150


def test_load_gives_up_after_budget_wait(tmp_path):
    """Nobody releases: BudgetExhaustedError naming the holders; not 'failed', retried on the next use."""
    b_load = Loader()
    cache = make_cache(tmp_path, max_bytes=150, budget_wait=0.3, retry_failed_after=60)
    cache.declare(dp.Context("a", load=Loader(), nbytes=100, device="cpu"))
    cache.declare(dp.Context("b", load=b_load, nbytes=100, device="cpu"))
    a_obj = cache.acquire("a", key="t1")
    start = time.monotonic()
    with pytest.raises(dp.BudgetExhaustedError, match="exhausted by contexts in use: 'a'") as info:
        cache.acquire("b", key="t2")
    assert time.monotonic() - start >= 0.3
    err = info.value
    assert (err.context, err.budget, err.kind, err.worker) == ("b", 150, "host", "tcp://w:1")
    assert err.in_use == [("a", 100, 1)] and "budget-wait" in str(err)
    assert b_load.calls == 0
    assert states(cache) == {"a": "resident", "b": "absent"}  # not failed: no fail-fast window
    assert cache.acquire("a") is a_obj  # the holder is untouched
    cache.release("t1")
    cache.release("t2")
    assert isinstance(cache.acquire("b", key="t3"), Blob)  # at once, despite retry_failed_after=60
    assert states(cache) == {"a": "evicted", "b": "resident"}


def test_undeclared_size_waits_after_load_and_releases_on_timeout(tmp_path):
    """Size known only after load: the object waits for room, and is dropped if none comes."""
    torn = []
    b_load = Loader(nbytes=100)
    cache = make_cache(tmp_path, max_bytes=150, budget_wait=0.3)
    cache.declare(dp.Context("a", load=Loader(), nbytes=100, device="cpu"))
    cache.declare(dp.Context("b", load=b_load, device="cpu", teardown=torn.append))
    cache.acquire("a", key="t1")
    with pytest.raises(dp.BudgetExhaustedError):
        cache.acquire("b", key="t2")
    gc.collect()
    assert b_load.calls == 1 and len(torn) == 1
    torn.clear()
    assert b_load.objects[0]() is None
    assert host_used(cache) == 100
    # and the success path: the holder releases while b waits
    cache.budget_wait = 30
    t, box = in_thread(cache.acquire, "b", "t3")
    time.sleep(0.3)
    cache.release("t1")
    t.join(10)
    assert isinstance(box.get("value"), Blob)
    assert states(cache) == {"a": "evicted", "b": "resident"} and host_used(cache) <= 150


def test_own_holdings_fail_at_once(tmp_path):
    """A task holding 'a' asks for 'b' and a+b exceed the budget: waiting cannot help."""
    cache = make_cache(tmp_path, max_bytes=150, budget_wait=30)
    cache.declare(dp.Context("a", load=Loader(), nbytes=100, device="cpu"))
    cache.declare(dp.Context("b", load=Loader(), nbytes=100, device="cpu"))
    cache.acquire("a", key="t1")
    start = time.monotonic()
    with pytest.raises(dp.BudgetExhaustedError, match="'a'"):
        cache.acquire("b", key="t1")
    assert time.monotonic() - start < 10  # far below budget_wait=30


def test_threads_waiting_on_one_load_share_its_outcome(tmp_path):
    """Several tasks wanting the same context: one wait, one error for all (no chain of waits)."""
    cache = make_cache(tmp_path, max_bytes=150, budget_wait=0.5)
    cache.declare(dp.Context("a", load=Loader(), nbytes=100, device="cpu"))
    cache.declare(dp.Context("b", load=Loader(), nbytes=100, device="cpu"))
    cache.acquire("a", key="holder")
    runs = [in_thread(cache.acquire, "b", f"t{i}") for i in range(4)]
    for t, _ in runs:
        t.join(20)
    assert all(isinstance(box.get("error"), dp.BudgetExhaustedError) for _, box in runs)
    assert cache.entries["b"].attempt == 1


def test_gpu_budget_waits_too(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 1)
    cache = make_cache(tmp_path, device_max_bytes=lambda d: 150, budget_wait=0.2)
    cache.declare(dp.Context("g1", load=Loader(), nbytes=100, device="cuda"))
    cache.declare(dp.Context("g2", load=Loader(), nbytes=100, device="cuda:0"))
    cache.declare(dp.Context("h", load=Loader(), nbytes=100, device="cpu"))
    cache.acquire("g1", key="t1")
    with pytest.raises(dp.BudgetExhaustedError, match="device budget") as info:
        cache.acquire("g2", key="t2")
    assert info.value.kind == "device" and "device_max_bytes" in str(info.value)
    assert isinstance(cache.acquire("h", key="t3"), Blob)  # host budget unaffected


@gen_cluster(client=True, nthreads=[("", 3)])
async def test_in_use_budget_on_a_worker(c, s, a):
    """Two tasks hold two contexts; a third context waits for room, or fails after budget-wait."""
    ctxs = [dp.Context(n, load=load_array, device="cpu", nbytes="1MiB") for n in ("a", "b", "c")]
    with dask.config.set({"pervasive.worker.budget-wait": "30s"}):
        await dp.install(c, ctxs, max_bytes="2.5MiB", scheduler=False)
    cache = a.plugins["pervasive"].cache
    holders = [c.submit(hold, n, 1.0, pure=False) for n in ("a", "b")]
    while sum(r["users"] for r in cache.snapshot()) < 2:
        await asyncio_sleep()
    third = c.submit(hold, "c", 0, pure=False)
    peak = 0
    while not third.done():
        peak = max(peak, host_used(cache))
        await asyncio_sleep()
    assert await third == "c" and await c.gather(holders) == ["a", "b"]
    assert peak <= 2.5 * MiB

    # the error path: holders outlast budget-wait
    cache.budget_wait = 0.3
    holders = [c.submit(hold, n, 3.0, pure=False) for n in ("a", "b")]
    while sum(r["users"] for r in cache.snapshot()) < 2:
        await asyncio_sleep()
    with pytest.raises(dp.BudgetExhaustedError) as info:
        await c.submit(hold, "c", 0, pure=False)
    msg = str(info.value)
    assert "'c'" in msg and a.address in msg and "in use" in msg and ("'a'" in msg or "'b'" in msg)
    assert await c.gather(holders) == ["a", "b"]
    assert await c.submit(hold, "c", 0, pure=False) == "c"  # no fail-fast window afterwards


def hold(name, seconds):
    dp.get_context(name)
    time.sleep(seconds)
    return name


async def asyncio_sleep():
    import asyncio

    await asyncio.sleep(0.02)


# -- (c) GPU out of memory during load ----------------------------------------------------
def test_oom_in_load_is_a_load_error_and_state_stays_consistent(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 1)
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    partial: list = []
    bad = Loader(fail_with=[oom()], partial_refs=partial)
    cache = make_cache(tmp_path, retry_failed_after=60)
    cache.declare(dp.Context("held", load=Loader(), nbytes=50, device="cuda"))
    cache.declare(dp.Context("cpu", load=Loader(), device="cpu"))
    cache.declare(dp.Context("big", load=bad, nbytes=100, device="cuda:0"))
    held = cache.acquire("held", key="t1")  # pinned on the same GPU
    cpu = cache.acquire("cpu")
    with pytest.raises(dp.ContextLoadError, match="OutOfMemoryError") as info:
        cache.acquire("big", key="t2")
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    assert info.value.context == "big" and info.value.worker == "tcp://w:1"
    del info
    gc.collect()
    assert partial[0]() is None  # the failed load's frames were cleared
    assert bad.calls == 1  # nothing idle on that GPU to evict: no pointless retry
    rows = {r["context"]: r for r in cache.snapshot()}
    assert rows["big"]["state"] == "failed" and rows["big"]["device_bytes"] == rows["big"]["host_bytes"] == 0
    assert rows["held"]["state"] == rows["cpu"]["state"] == "resident"
    assert cache.acquire("held") is held and cache.acquire("cpu") is cpu
    assert emptied == []  # CUDA not available: empty_cache not called


def test_oom_evicts_idle_contexts_on_that_gpu_and_retries_once(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 1)
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    partial: list = []
    # record, at each empty_cache, whether the failed attempt's partial object was already freed
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(all(r() is None for r in partial)))
    cache = make_cache(tmp_path)
    cache.declare(dp.Context("idle", load=Loader(), nbytes=50, device="cuda"))
    cache.declare(dp.Context("cpu", load=Loader(), device="cpu"))
    big = Loader(fail_with=[oom()], partial_refs=partial)
    cache.declare(dp.Context("big", load=big, nbytes=100, device="cuda"))
    cache.acquire("idle")
    cpu = cache.acquire("cpu")
    with captured_logger("dask_pervasive.cache") as log:
        assert isinstance(cache.acquire("big"), Blob)
    assert big.calls == 2 and "retrying once" in log.getvalue()
    assert states(cache) == {"idle": "evicted", "cpu": "resident", "big": "resident"}
    assert cache.acquire("cpu") is cpu
    assert emptied and emptied[0] is True  # partial tensors freed before empty_cache and the retry

    # twice out of memory: one retry only, then a load error
    cache.acquire("idle")
    twice = Loader(fail_with=[oom(), oom()])
    cache.declare(dp.Context("twice", load=twice, nbytes=100, device="cuda"))
    with pytest.raises(dp.ContextLoadError):
        cache.acquire("twice")
    assert twice.calls == 2


def test_oom_then_retry_after_window_succeeds(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 1)
    load = Loader(fail_with=[oom()])
    cache = make_cache(tmp_path, retry_failed_after=60)
    cache.declare(dp.Context("g", load=load, nbytes=100, device="cuda"))
    with pytest.raises(dp.ContextLoadError):
        cache.acquire("g")
    with pytest.raises(dp.ContextLoadError):  # inside the window: fail fast, no load
        cache.acquire("g")
    assert load.calls == 1
    cache.retry_failed_after = 0  # the window is over (no sleep with a timing margin)
    assert isinstance(cache.acquire("g"), Blob)
    assert states(cache) == {"g": "resident"}
    assert cache.snapshot()[0]["device_bytes"] == 100


def load_oom(path, device):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_oom_reaches_client_chained(c, s, a):
    ok = dp.Context("ok", load=load_array, device="cpu")
    await dp.install(c, [ok, dp.Context("oom", load=load_oom, device="cpu")], scheduler=False)
    assert len(await c.submit(dp.get_context, "ok")) == 2**17
    with pytest.raises(dp.ContextLoadError, match="OutOfMemoryError: CUDA out of memory") as info:
        await c.submit(dp.get_context, "oom")
    assert isinstance(info.value.cause, torch.cuda.OutOfMemoryError) and info.value.worker == a.address
    rows = {r["context"]: r for r in await dp.stats(c)}
    assert rows["oom"]["state"] == "failed" and rows["ok"]["state"] == "resident"
    assert len(await c.submit(dp.get_context, "ok", pure=False)) == 2**17
