"""Workers SIGKILLed in the middle of a transfer: nothing partial is trusted, nothing leaks.

Real worker processes (``Worker=Nanny``) killed with ``SIGKILL`` — no
goodbye, as on a preempted node — while they receive a context from the
origin or from a peer, and a holder killed while it uploads. The copy never
becomes trusted (no manifest), the task is rescheduled and succeeds
elsewhere, and the scheduler's :class:`~dask_pervasive.transfer.SourceCoordinator`
gives the origin slot and the upload slots back. Temporary files of a killed
copy are removed by the next fetch into the same directory, on both copy paths.

Functions used on the workers live in this module and in transfer_helpers: spawned workers import them
(their ``sys.path`` is the test process's).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from distributed import Nanny
from distributed.utils_test import gen_cluster
from transfer_helpers import coordinator, digests, load_digests, write_model

import dask_pervasive as dp
from dask_pervasive._settings import TransferSettings
from dask_pervasive.transfer import MANIFEST, ORIGIN, PART, cached_copy, fetch_source

CONFIG = {
    "pervasive.transfer.chunk-size": "32KiB",
    "pervasive.transfer.retries": 1,
    "pervasive.transfer.retry-backoff": "100ms",
    "pervasive.transfer.stall-timeout": "5s",
    "distributed.scheduler.worker-ttl": "10s",
}
SIZE = 1_500_000


def make_model(origin, size: int = SIZE, seed: int = 0) -> dict[str, bytes]:
    return write_model(origin.directory, "model", (size,), seed)


def context(origin) -> dp.Context:
    return dp.Context("m", load=load_digests, source=origin.url("model/"), device="cpu")


# -- run on workers ------------------------------------------------------------------------------
def files_dir(dask_worker, name: str = "m") -> str:
    cache = dask_worker.plugins["pervasive"].cache
    return cache.files_dir(cache.entries[name].context)


def slow_uploads(dask_worker, seconds: float = 0.05) -> None:
    """Make this worker serve each chunk ``seconds`` late (so a test can kill someone mid-transfer)."""
    serve = dask_worker.handlers["pervasive_read"]

    async def read(comm=None, **kwargs):
        await asyncio.sleep(seconds)
        return await serve(comm, **kwargs)

    dask_worker.handlers["pervasive_read"] = read


# -- scheduler-side probes -------------------------------------------------------------------------
async def until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def leases_of(s, worker: str) -> list:
    return [lease for lease in coordinator(s).leases.values() if worker in (lease.receiver, lease.source)]


def assert_all_released(s) -> None:
    transfer = coordinator(s)
    assert transfer.origin_active == 0, transfer.origin_active
    assert not transfer.leases, transfer.leases
    assert not any(transfer.uploads.values()), dict(transfer.uploads)


async def kill(c, address: str) -> None:
    pid = (await c.run(os.getpid, workers=[address]))[address]
    os.kill(pid, signal.SIGKILL)


def untrusted(dest: str) -> bool:
    """The killed worker's copy (if its directory still exists) is not a complete copy."""
    return (
        not os.path.exists(os.path.join(dest, MANIFEST))
        and cached_copy(None, dest, TransferSettings(chunk_size=2**20)) is None
    )


# -- receivers killed ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(120)
@gen_cluster(client=True, Worker=Nanny, nthreads=[("", 1)] * 2, config=CONFIG, timeout=100)
async def test_worker_killed_while_reading_the_origin(c, s, a, b, http_origin):
    files = make_model(http_origin)
    http_origin.bandwidth = 500e3  # ~3 s for the context
    await dp.install(c, [context(http_origin)])
    victim = a.worker_address
    dest = (await c.run(files_dir, workers=[victim]))[victim]
    fut = c.submit(dp.get_context, "m", workers=[victim], allow_other_workers=True, pure=False)
    await until(lambda: http_origin.bytes_served > 300_000, what="the origin read to be under way")
    assert [lease.source for lease in leases_of(s, victim)] == [ORIGIN]
    await kill(c, victim)
    await until(lambda: victim not in s.workers, what="the scheduler to notice")
    assert not leases_of(s, victim) and coordinator(s).origin_active <= 1  # its slot is free
    assert untrusted(dest)
    http_origin.bandwidth = None
    assert await fut == digests(files)  # rescheduled, loaded elsewhere
    assert_all_released(s)
    loaded = {r["worker"] for r in await dp.stats(c) if r["context"] == "m" and r["loads"]}
    assert victim not in loaded and len(loaded) == 1


@pytest.mark.slow
@pytest.mark.timeout(120)
@gen_cluster(client=True, Worker=Nanny, nthreads=[("", 1)] * 2, config=CONFIG, timeout=100)
async def test_worker_killed_while_copying_from_a_peer(c, s, a, b, http_origin):
    files = make_model(http_origin)
    await dp.install(c, [context(http_origin)])
    holder, victim = a.worker_address, b.worker_address
    await dp.prewarm(c, "m", workers=[holder], progress=False)
    await c.run(slow_uploads, workers=[holder])  # ~46 chunks x 50 ms
    dest = (await c.run(files_dir, workers=[victim]))[victim]
    served = http_origin.bytes_served
    fut = c.submit(dp.get_context, "m", workers=[victim], allow_other_workers=True, pure=False)
    await until(lambda: coordinator(s).uploads.get(holder, 0) == 1, what="the peer copy to start")
    await asyncio.sleep(0.5)  # some chunks in
    await kill(c, victim)
    await until(lambda: victim not in s.workers, what="the scheduler to notice")
    assert coordinator(s).uploads.get(holder, 0) == 0 and not leases_of(s, victim)  # upload slot released
    assert untrusted(dest)
    assert await fut == digests(files)  # rescheduled: the holder is warm
    assert http_origin.bytes_served == served  # and nobody went back to the origin
    assert_all_released(s)


@pytest.mark.slow
@pytest.mark.timeout(120)
@gen_cluster(client=True, Worker=Nanny, nthreads=[("", 1)] * 2, config=CONFIG, timeout=100)
async def test_holder_killed_mid_upload(c, s, a, b, http_origin):
    files = make_model(http_origin)
    await dp.install(c, [context(http_origin)])
    holder, receiver = a.worker_address, b.worker_address
    await dp.prewarm(c, "m", workers=[holder], progress=False)
    await c.run(slow_uploads, workers=[holder])
    served = http_origin.bytes_served
    fut = c.submit(dp.get_context, "m", workers=[receiver], pure=False)
    await until(lambda: coordinator(s).uploads.get(holder, 0) == 1, what="the peer copy to start")
    await asyncio.sleep(0.5)
    await kill(c, holder)
    assert await fut == digests(files)  # resumed from the origin, the only source left
    row = next(r for r in await dp.stats(c) if r["worker"] == receiver and r["context"] == "m")
    assert 0 < row["bytes_from_peers"] < SIZE
    assert row["bytes_from_peers"] + row["bytes_from_origin"] == sum(map(len, files.values()))  # resumed
    assert http_origin.bytes_served - served == row["bytes_from_origin"]
    await until(lambda: holder not in s.workers, what="the scheduler to notice")
    assert_all_released(s)
    assert holder not in coordinator(s).uploads


# -- the next fetch cleans up ---------------------------------------------------------------------------
_COPIER = textwrap.dedent(
    """
    import sys
    from dask_pervasive._settings import TransferSettings
    from dask_pervasive.transfer import fetch_source
    fetch_source(sys.argv[1], {}, sys.argv[2], TransferSettings(chunk_size=32 * 2**10, retries=0, stall_timeout=60))
    """
)


def kill_mid_copy(url: str, dest: Path) -> int:
    """Start a process copying ``url`` into ``dest``; SIGKILL it once a temporary file has data."""
    proc = subprocess.Popen([sys.executable, "-c", _COPIER, url, str(dest)])
    try:
        deadline = time.monotonic() + 60
        while not [p for p in dest.rglob(f"*{PART}*") if p.stat().st_size > 64 * 2**10]:
            assert proc.poll() is None, "the copy ended before it could be killed"
            assert time.monotonic() < deadline, "the copy did not start"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return proc.pid


def test_killed_copy_is_never_trusted_and_cleaned_by_the_next_fetch(http_origin, tmp_path):
    files = make_model(http_origin)
    http_origin.bandwidth = 1e6
    dest = tmp_path / "cache" / "m"
    pid = kill_mid_copy(http_origin.url("model/"), dest)
    parts = list(dest.rglob(f"*{PART}*"))
    assert parts and all(f".{pid}." in p.name for p in parts)  # named after the dead writer
    assert untrusted(str(dest))
    http_origin.bandwidth = None
    result = fetch_source(http_origin.url("model/"), {}, str(dest), TransferSettings(chunk_size=32 * 2**10))
    assert load_digests(result.path, "cpu") == digests(files)
    assert not list(dest.rglob(f"*{PART}*"))  # the dead writer's files are gone at once, not in an hour


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=CONFIG)
async def test_peer_copy_cleans_up_after_a_killed_copy(c, s, a, b, http_origin, tmp_path):
    """The coordinated copy (peers on) into a directory a killed worker left parts in."""
    files = make_model(http_origin)
    ctx = context(http_origin)
    cache_dir = tmp_path / "shared-cache"  # as with pervasive.worker.cache-dir on a node's local disk
    dest = cache_dir / "m" / ctx.token
    http_origin.bandwidth = 1e6
    await asyncio.to_thread(kill_mid_copy, http_origin.url("model/"), dest)
    assert list(dest.rglob(f"*{PART}*")) and untrusted(str(dest))
    http_origin.bandwidth = None
    await c.register_plugin(dp.ContextWorkerPlugin([ctx], cache_dir=str(cache_dir)))
    await c.register_plugin(dp.ContextSchedulerPlugin())
    await dp.prewarm(c, "m", workers=[a.address], progress=False)
    assert not list(dest.rglob(f"*{PART}*"))
    assert await c.submit(dp.get_context, "m", workers=[a.address]) == digests(files)
