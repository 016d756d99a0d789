"""ContextCache unit tests: no cluster, real threads and files."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

import dask_pervasive as dp
from dask_pervasive.cache import ContextCache, State
from dask_pervasive.transfer import MANIFEST


def read_text(path, device):
    with open(path) as f:
        return f.read()


def make_cache(tmp_path, **kw) -> ContextCache:
    events = []
    cache = ContextCache(
        "tcp://w:1", str(tmp_path / "cache"), on_change=lambda e: events.append((e.name, e.state)), **kw
    )
    cache.events = events
    return cache


class Counter:
    """A loader that counts calls (thread-safe) and can be slowed down."""

    def __init__(self, delay=0.0, result=None):
        self.log = []  # list.append is atomic: safe to count from threads
        self.delay = delay
        self.result = result

    @property
    def calls(self):
        return len(self.log)

    def __call__(self, path, device):
        self.log.append(device)
        time.sleep(self.delay)
        return self.result if self.result is not None else {"path": path, "device": device}


def test_eight_threads_one_load(tmp_path):
    load = Counter(delay=0.3)
    cache = make_cache(tmp_path)
    cache.declare(dp.Context("m", load=load, device="cpu"))
    barrier = threading.Barrier(8)
    results = []

    def worker(i):
        barrier.wait()
        results.append(cache.acquire("m", key=f"task-{i}"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert load.calls == 1
    assert len(results) == 8 and all(r is results[0] for r in results)
    (row,) = cache.snapshot()
    assert row["loads"] == 1 and row["hits"] == 7 and row["users"] == 8
    for i in range(8):
        cache.release(f"task-{i}")
    assert cache.snapshot()[0]["users"] == 0
    assert ("m", State.LOADING) in cache.events and ("m", State.RESIDENT) in cache.events


def test_lru_eviction_and_reload_under_budget(tmp_path):
    a, b = Counter(), Counter()
    cache = make_cache(tmp_path, max_bytes=150)
    cache.declare(dp.Context("a", load=a, nbytes=100, device="cpu", teardown=lambda o: None))
    cache.declare(dp.Context("b", load=b, nbytes=100, device="cpu"))
    for _ in range(3):
        cache.acquire("a")
        cache.acquire("b")
    assert (a.calls, b.calls) == (3, 3)
    rows = {r["context"]: r for r in cache.snapshot()}
    assert rows["a"]["evictions"] == 3 and rows["b"]["evictions"] == 2
    assert rows["b"]["state"] == "resident" and rows["a"]["state"] == "evicted"
    assert rows["a"]["loads"] == 3


def test_both_fit_no_eviction(tmp_path):
    cache = make_cache(tmp_path, max_bytes=250)
    for n in "ab":
        cache.declare(dp.Context(n, load=Counter(), nbytes=100, device="cpu"))
    for _ in range(3):
        cache.acquire("a")
        cache.acquire("b")
    assert sum(r["loads"] for r in cache.snapshot()) == 2
    assert sum(r["hits"] for r in cache.snapshot()) == 4


def test_in_use_context_is_not_evicted_until_released(tmp_path):
    cache = make_cache(tmp_path, max_bytes=150, budget_wait=30)
    cache.declare(dp.Context("a", load=Counter(), nbytes=100, device="cpu"))
    cache.declare(dp.Context("b", load=Counter(), nbytes=100, device="cpu"))
    cache.acquire("a", key="t1")
    # "b" does not fit while t1 holds "a": its load waits for the release (budget-wait)
    loader = threading.Thread(target=cache.acquire, args=("b", "t2"))
    loader.start()
    # Wait for the loader to be in its wait for room (a condition, not a margin).
    deadline = time.monotonic() + 10
    while cache.entries["b"].state.value != "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    states = {r["context"]: r["state"] for r in cache.snapshot()}
    assert states == {"a": "resident", "b": "loading"}
    cache.release("t1")
    loader.join(10)
    states = {r["context"]: r["state"] for r in cache.snapshot()}
    assert states == {"a": "evicted", "b": "resident"}
    with pytest.raises(RuntimeError, match="in use"):
        cache.evict("b")
    cache.release("t2")
    assert cache.evict("b") is True


def test_declared_too_large_fails_before_loading(tmp_path):
    load = Counter()
    cache = make_cache(tmp_path, max_bytes=100)
    cache.declare(dp.Context("big", load=load, nbytes=1000, device="cpu"))
    with pytest.raises(dp.ContextTooLargeError, match="max_bytes") as info:
        cache.acquire("big")
    assert load.calls == 0
    assert info.value.nbytes == 1000 and info.value.budget == 100
    assert cache.snapshot()[0]["state"] == "failed"


def test_measured_too_large_is_torn_down(tmp_path):
    import numpy as np

    torn = []
    cache = make_cache(tmp_path, max_bytes=1000)
    cache.declare(dp.Context("big", load=Counter(result=np.zeros(10_000)), device="cpu", teardown=torn.append))
    with pytest.raises(dp.ContextTooLargeError):
        cache.acquire("big")
    assert len(torn) == 1
    row = cache.snapshot()[0]
    assert row["state"] == "failed" and row["host_bytes"] == 0


def test_teardown_runs_on_eviction(tmp_path):
    torn = []
    cache = make_cache(tmp_path)
    cache.declare(dp.Context("a", load=Counter(result=["model"]), device="cpu", teardown=torn.append))
    cache.acquire("a")
    assert cache.evict("a") is True
    assert torn == [["model"]]
    assert cache.evict("a") is False  # not resident any more


def test_failed_load_raises_and_fails_fast(tmp_path):
    calls = []

    def broken(path, device):
        calls.append(1)
        raise OSError("disk on fire")

    cache = make_cache(tmp_path, retry_failed_after=60)
    cache.declare(dp.Context("bad", load=broken, device="cpu"))
    with pytest.raises(dp.ContextLoadError) as info:
        cache.acquire("bad")
    err = info.value
    assert err.context == "bad" and err.worker == "tcp://w:1"
    assert isinstance(err.__cause__, OSError) and "disk on fire" in str(err)
    with pytest.raises(dp.ContextLoadError):  # within the window: no second attempt
        cache.acquire("bad")
    assert len(calls) == 1
    cache.retry_failed_after = 0  # the window is over (without sleeping through a timing margin)
    with pytest.raises(dp.ContextLoadError):
        cache.acquire("bad")
    assert len(calls) == 2
    assert cache.snapshot()[0]["failures"] == 2


def test_waiters_see_the_failure(tmp_path):
    def slow_broken(path, device):
        time.sleep(0.2)
        raise ValueError("nope")

    cache = make_cache(tmp_path)
    cache.declare(dp.Context("bad", load=slow_broken, device="cpu"))
    errors = []

    def go():
        try:
            cache.acquire("bad")
        except dp.ContextLoadError as e:
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(errors) == 4


def test_unknown_context_lists_known(tmp_path):
    cache = make_cache(tmp_path)
    cache.declare(dp.Context("a", load=Counter()))
    with pytest.raises(dp.UnknownContextError, match="'a'") as info:
        cache.acquire("zzz")
    assert info.value.known == ["a"]


def test_redeclare_with_different_definition(tmp_path):
    cache = make_cache(tmp_path)
    cache.declare(dp.Context("a", load=Counter(), device="cpu"))
    assert cache.declare(dp.Context("a", load=Counter(), device="cpu")) is False
    with pytest.raises(ValueError, match="different definition"):
        cache.declare(dp.Context("a", load=Counter(), device="cuda"))


def test_source_directory_fetched_once(tmp_path):
    src = tmp_path / "origin"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(os.urandom(10_000))
    paths = []
    cache = make_cache(tmp_path)
    ctx = dp.Context(
        "m", load=lambda p, d: paths.append(p) or sorted(os.listdir(p)), source=f"file://{src}", device="cpu"
    )
    cache.declare(ctx)
    assert cache.acquire("m") == [MANIFEST, "config.json", "sub"]
    row = cache.snapshot()[0]
    assert row["bytes_from_origin"] == 10_008 and row["files"]
    assert paths[0].startswith(str(tmp_path / "cache" / "m"))
    with open(os.path.join(paths[0], MANIFEST)) as f:
        manifest = json.load(f)
    assert set(manifest["files"]) == {"config.json", "sub/weights.bin"}
    # evict, reload: files-warm, no bytes from the origin
    cache.evict("m")
    cache.acquire("m")
    assert cache.snapshot()[0]["bytes_from_origin"] == 10_008
    assert cache.snapshot()[0]["loads"] == 2


def test_single_file_source(tmp_path):
    (tmp_path / "w.txt").write_text("hello")
    cache = make_cache(tmp_path)
    cache.declare(dp.Context("f", load=read_text, source=str(tmp_path / "w.txt"), device="cpu"))
    assert cache.acquire("f") == "hello"


def test_missing_source_is_load_error(tmp_path):
    cache = make_cache(tmp_path)
    cache.declare(dp.Context("m", load=Counter(), source=f"file://{tmp_path}/nothing-here", device="cpu"))
    with pytest.raises(dp.ContextLoadError, match="nothing-here") as info:
        cache.acquire("m")
    assert isinstance(info.value.__cause__, FileNotFoundError)
