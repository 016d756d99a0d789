"""Peer-to-peer context transfer: cohorts, corruption, failures, fsspec (refusals, TLS: tests/faults)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import types

import fsspec
import pytest
from distributed.utils_test import async_poll_for, captured_logger, gen_cluster
from transfer_helpers import caps, coordinator, copy_dir, digests, fake_scheduler, make_model, model_context

import dask_pervasive as dp
from dask_pervasive.transfer import MANIFEST, ORIGIN, PART, WAIT, PeerFileSystem, SourceCoordinator

SMALL_CHUNKS = {"pervasive.transfer.chunk-size": "32KiB"}


def load_file_digest(path, device):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


async def rows_by_worker(c, name: str = "m") -> dict[str, dict]:
    return {r["worker"]: r for r in await dp.stats(c) if r["context"] == name}


# -- cluster-wide behaviour ---------------------------------------------------------------
@gen_cluster(client=True, nthreads=[("", 1)] * 4, config={**SMALL_CHUNKS, "pervasive.transfer.peer-max-uploads": 1})
async def test_cohort_reads_origin_about_once(c, s, a, b, w3, w4, http_origin):
    files = make_model(http_origin)
    size = sum(map(len, files.values()))
    await dp.install(c, [model_context(http_origin)])
    warm = await dp.prewarm(c, "m", progress=False)
    assert len(warm) == 4
    assert http_origin.bytes_served <= 1.5 * size  # not once per worker
    rows = await rows_by_worker(c)
    assert sum(r["bytes_from_origin"] for r in rows.values()) == size
    assert sum(r["bytes_from_peers"] for r in rows.values()) == 3 * size
    for w in (a, b, w3, w4):
        assert await c.submit(dp.get_context, "m", workers=[w.address]) == digests(files)
    # a tree, not a star: with one upload slot per holder, a worker that copied from a peer served too
    events = [m for _, m in s.get_events("pervasive")]
    assert all(len(m["sources"]) == 1 for m in events if m.get("action") == "transfer")  # no failed attempt
    sources = [m["source"] for m in events if m.get("action") == "transfer-source"]
    assert sources.count(ORIGIN) == 1
    assert len({src for src in sources if src != ORIGIN}) >= 2
    transfer = coordinator(s)
    assert transfer.origin_active == 0 and not transfer.leases and not any(transfer.uploads.values())
    assert "m" in transfer.manifests


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=SMALL_CHUNKS)
async def test_without_scheduler_plugin_every_worker_reads_origin(c, s, a, b, http_origin):
    files = make_model(http_origin)
    size = sum(map(len, files.values()))
    await dp.install(c, [model_context(http_origin)], scheduler=False)
    await dp.prewarm(c, "m", progress=False)
    rows = await rows_by_worker(c)
    assert [r["bytes_from_origin"] for r in rows.values()] == [size, size]
    assert sum(r["bytes_from_peers"] for r in rows.values()) == 0
    assert http_origin.bytes_served == 2 * size


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=SMALL_CHUNKS)
async def test_scheduler_times_origin_reads_and_peer_copies_apart(c, s, a, b, w3, http_origin):
    # What prices a cold worker in placement: an origin read and a copy from a complete peer
    # are different costs, reported per load by the workers.
    files = make_model(http_origin)
    size = sum(map(len, files.values()))
    await dp.install(c, [model_context(http_origin)])
    plugin = s.plugins["pervasive"]
    plan = plugin.plans.get("m")
    assert plan is None or plan.origin_fetch_seconds is None
    assert not plugin._copy_source_alive("m")
    await dp.prewarm(c, "m", workers=[a.address], progress=False)
    # the worker's state event reaches the scheduler in a batch, after prewarm returns
    await async_poll_for(lambda: "m" in plugin.plans and plugin.plans["m"].origin_fetch_seconds is not None, 10)
    plan = plugin.plans["m"]
    assert plan.peer_fetch_seconds is None
    assert plugin.warm["m"][a.address].holder_at_start is False
    # a is a complete holder now: a cold worker would copy from it, priced (until a copy is
    # timed) at the files' size over Dask's bandwidth estimate
    assert plugin._copy_source_alive("m") and not plugin._copy_source_alive("m", exclude=a.address)
    prior = plugin._peer_fetch_prior("m")
    assert prior == pytest.approx(size / s.bandwidth)
    assert plan.peer_load_seconds(prior) == pytest.approx(plan.setup_seconds + prior)
    origin_fetch = plan.origin_fetch_seconds
    await dp.prewarm(c, "m", workers=[b.address], progress=False)
    row = (await rows_by_worker(c))[b.address]
    assert row["bytes_from_peers"] == size and row["bytes_from_origin"] == 0
    await async_poll_for(lambda: plan.peer_fetch_seconds is not None, 10)
    assert plugin.warm["m"][b.address].holder_at_start is True
    assert plan.origin_fetch_seconds == origin_fetch  # the copy does not count as an origin read
    assert plan.peer_load_seconds(None) == pytest.approx(plan.setup_seconds + plan.peer_fetch_seconds)


@pytest.mark.parametrize("damage", ["file", "manifest"])
@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=SMALL_CHUNKS)
async def test_corrupt_peer_copy_is_detected_and_not_loaded(c, s, a, b, http_origin, damage):
    files = make_model(http_origin)
    size = sum(map(len, files.values()))
    await dp.install(c, [model_context(http_origin)])
    await dp.prewarm(c, "m", workers=[a.address], progress=False)
    target = copy_dir(a) / "w0.bin"
    data = bytearray(target.read_bytes())
    data[1000] ^= 0xFF
    target.write_bytes(bytes(data))
    if damage == "manifest":  # a consistent forgery: only the scheduler's copy of the manifest catches it
        manifest = json.loads((copy_dir(a) / MANIFEST).read_text())
        manifest["files"]["w0.bin"]["sha256"] = hashlib.sha256(data).hexdigest()
        (copy_dir(a) / MANIFEST).write_text(json.dumps(manifest))
    served = http_origin.bytes_served
    with captured_logger("dask_pervasive.transfer") as log:
        await dp.prewarm(c, "m", workers=[b.address], progress=False)
    assert "rejected" in log.getvalue()
    # b loaded the true files, what a sent wrong came from the origin; a is no longer offered as a source
    assert await c.submit(dp.get_context, "m", workers=[b.address]) == digests(files)
    row = (await rows_by_worker(c))[b.address]
    assert row["loads"] == 1 and row["failures"] == 0
    assert row["bytes_from_origin"] == http_origin.bytes_served - served
    if damage == "file":  # the corrupt file is read again, files that matched are kept
        assert len(files["w0.bin"]) <= row["bytes_from_origin"] < size
    else:  # nothing from a forged manifest is used
        assert row["bytes_from_origin"] == size and row["bytes_from_peers"] == 0
    assert a.address in coordinator(s).suspect["m"]
    assert not list(copy_dir(b).rglob(f"*{PART}*"))


@pytest.mark.parametrize("failure", ["killed", "stalled", "only-holder-killed"])
@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 3,
    config={**SMALL_CHUNKS, "pervasive.transfer.stall-timeout": "500ms"},
)
async def test_holder_failing_mid_transfer_resumes_elsewhere(c, s, a, b, w3, http_origin, failure):
    files = make_model(http_origin, sizes=(400_000,))
    size = sum(map(len, files.values()))
    await dp.install(c, [model_context(http_origin)])
    holders = [a] if failure == "only-holder-killed" else [a, w3]
    for h in holders:
        await dp.prewarm(c, "m", workers=[h.address], progress=False)
    reads: list[tuple[str, int]] = []
    failed: list[str] = []

    def sabotage(worker):
        serve = worker.handlers["pervasive_read"]

        async def read(comm=None, **kw):
            if kw["path"] == "w0.bin":
                reads.append((worker.address, kw["offset"]))
            if not failed and sum(1 for w, _ in reads if w == worker.address) == 4:
                failed.append(worker.address)
                if failure != "stalled":
                    asyncio.ensure_future(worker.close())
                await asyncio.sleep(30)
            return await serve(comm, **kw)

        worker.handlers["pervasive_read"] = read

    for h in holders:
        sabotage(h)
    served = http_origin.bytes_served
    await dp.prewarm(c, "m", workers=[b.address], progress=False)
    assert await c.submit(dp.get_context, "m", workers=[b.address]) == digests(files)
    assert failed
    row = (await rows_by_worker(c))[b.address]
    assert row["bytes_from_peers"] + row["bytes_from_origin"] == size  # resumed, not restarted
    if failure == "only-holder-killed":
        assert row["bytes_from_origin"] == http_origin.bytes_served - served
        resumed_at = len(files["w0.bin"]) - row["bytes_from_origin"]
    else:
        assert row["bytes_from_origin"] == 0
        resumed_at = min(offset for w, offset in reads if w != failed[0])
    # The failing holder delivered two or three chunks (two requests are in flight): the
    # copy went on from there.
    assert resumed_at in (2 * 32 * 2**10, 3 * 32 * 2**10)
    assert not list(copy_dir(b).rglob(f"*{PART}*"))


@gen_cluster(
    client=True,
    nthreads=[("", 1)] * 2,
    config={**SMALL_CHUNKS, "pervasive.transfer.retries": 1, "pervasive.transfer.retry-backoff": "50ms"},
)
async def test_failed_copy_leaves_nothing_trusted(c, s, a, b, http_origin):
    make_model(http_origin, sizes=(300_000,))
    await dp.install(c, [model_context(http_origin)])
    await dp.prewarm(c, "m", workers=[a.address], progress=False)
    serve = a.handlers["pervasive_read"]

    async def read(comm=None, **kw):
        if kw["offset"] >= 64 * 2**10:
            raise OSError("disk on fire")
        return await serve(comm, **kw)

    a.handlers["pervasive_read"] = read
    http_origin.stop()  # and the origin is gone too
    with pytest.raises(dp.ContextLoadError):
        await dp.prewarm(c, "m", workers=[b.address], progress=False)
    dest = copy_dir(b)
    assert not (dest / MANIFEST).exists()
    assert not list(dest.rglob(f"*{PART}*"))
    transfer = coordinator(s)
    assert transfer.origin_active == 0 and not transfer.leases


# Refusals (traversal, symlinks, unlisted files, ranges) and TLS: tests/faults/test_fault_security.py


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=SMALL_CHUNKS)
async def test_cohort_copies_files_while_the_first_worker_still_reads_the_origin(c, s, a, b, w3, http_origin):
    files = make_model(http_origin, sizes=(100_000,) * 4)
    size = sum(map(len, files.values()))
    http_origin.bandwidth = 1e6  # the origin read takes ~0.4 s
    await dp.install(c, [model_context(http_origin)])
    assert len(await dp.prewarm(c, "m", progress=False)) == 3
    assert http_origin.bytes_served == size
    events = [m for _, m in s.get_events("pervasive")]
    sources = [m for m in events if m.get("action") == "transfer-source"]
    reader = next(m["receiver"] for m in sources if m["source"] == ORIGIN)
    followers = [m for m in sources if m["source"] != ORIGIN]
    # both others were sent to a worker that was still copying, and got everything from it
    assert len(followers) == 2 and not any(m["complete"] for m in followers)
    transfers = {m["worker"]: m for m in events if m.get("action") == "transfer"}
    assert transfers[reader]["bytes_from_origin"] == size
    for m in followers:
        assert transfers[m["receiver"]]["sources"] == (m["source"],)
        assert transfers[m["receiver"]]["bytes_from_peers"] == size
    for w in (a, b, w3):
        assert await c.submit(dp.get_context, "m", workers=[w.address]) == digests(files)


@gen_cluster(client=True, nthreads=[("", 1)] * 3, config=SMALL_CHUNKS)
async def test_single_file_context(c, s, a, b, w3, http_origin):
    files = make_model(http_origin, sizes=(150_000,))
    ctx = dp.Context("f", load=load_file_digest, source=http_origin.url("model/w0.bin"), device="cpu")
    await dp.install(c, [ctx])
    await dp.prewarm(c, "f", progress=False)
    assert http_origin.bytes_served == 150_000
    rows = await rows_by_worker(c, "f")
    assert sum(r["bytes_from_peers"] for r in rows.values()) == 2 * 150_000
    for w in (a, b, w3):
        assert await c.submit(dp.get_context, "f", workers=[w.address]) == digests(files)["w0.bin"]


# -- fsspec --------------------------------------------------------------------------------
def read_through_dask_peer(tmpdir: str) -> dict:
    fs = fsspec.filesystem("dask-peer")
    out = {
        "contexts": fs.ls("", detail=False),
        "root": fs.ls("dask-peer://m/", detail=False),
        "sub": fs.ls("dask-peer://m/sub", detail=True),
        "info": fs.info("dask-peer://m/w0.bin"),
        "isdir": fs.isdir("dask-peer://m/sub"),
        "range": fs.cat_file("dask-peer://m/w0.bin", start=100, end=70_000),
        "tail": fs.cat_file("dask-peer://m/w0.bin", start=-10),
        "whole": fs.cat_file("dask-peer://m/sub/config.json"),
        "find": fs.find("dask-peer://m"),
    }
    fs.get_file("dask-peer://m/w1.bin", os.path.join(tmpdir, "w1.bin"))
    with open(os.path.join(tmpdir, "w1.bin"), "rb") as f:
        out["got"] = f.read()
    with fsspec.open("dask-peer://m/w0.bin", "rb") as f:
        f.seek(150_000)
        out["seek"] = f.read(100)
    try:
        fs.cat_file("dask-peer://m/missing.bin")
    except FileNotFoundError:
        out["missing"] = "FileNotFoundError"
    return out


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=SMALL_CHUNKS)
async def test_peer_filesystem_inside_a_task(c, s, a, b, http_origin, tmp_path):
    files = make_model(http_origin)
    await dp.install(c, [model_context(http_origin)])
    await dp.prewarm(c, "m", workers=[a.address], progress=False)
    out = await c.submit(read_through_dask_peer, str(tmp_path), workers=[b.address])
    assert out["contexts"] == ["m"]
    assert out["root"] == ["m/sub", "m/w0.bin", "m/w1.bin"]
    assert out["sub"] == [
        {"name": "m/sub/config.json", "size": 13, "type": "file", "sha256": digests(files)["sub/config.json"]}
    ]
    assert out["info"]["size"] == 200_000 and out["info"]["type"] == "file" and out["isdir"]
    assert out["range"] == files["w0.bin"][100:70_000]
    assert out["tail"] == files["w0.bin"][-10:]
    assert out["whole"] == files["sub/config.json"]
    assert sorted(out["find"]) == ["m/sub/config.json", "m/w0.bin", "m/w1.bin"]
    assert out["got"] == files["w1.bin"]
    assert out["seek"] == files["w0.bin"][150_000:150_100]
    assert out["missing"] == "FileNotFoundError"
    assert not (await rows_by_worker(c))[b.address]["files"]  # reading is not loading


def test_peer_filesystem_outside_a_worker():
    assert fsspec.get_filesystem_class("dask-peer") is PeerFileSystem
    with pytest.raises(dp.TransferError, match="only works inside a task"):
        fsspec.filesystem("dask-peer")
    with pytest.raises(dp.TransferError, match="only works inside a task"), fsspec.open("dask-peer://m/w0.bin") as f:
        f.read()


def test_entry_point_declared():
    from importlib.metadata import entry_points

    specs = {ep.name: ep.value for ep in entry_points(group="fsspec.specs")}
    if not specs:
        pytest.skip("dask_pervasive installed without entry points (reinstall with pip install -e .)")
    assert specs["dask-peer"] == "dask_pervasive.transfer:PeerFileSystem"


# -- the coordinator alone -------------------------------------------------------------------
def test_coordinator_caps_origin_and_uploads_and_fans_out():
    async def run():
        s = fake_scheduler("w1", "w2", "w3", "w4", "w5")
        co = SourceCoordinator(s, {}, caps(1, 1))
        first = await co.acquire("m", "w1")
        assert first["source"] == ORIGIN and first["digest"] is None
        # the others follow workers still copying (one upload slot each) instead of re-reading the origin
        second = await co.acquire("m", "w2")
        third = await co.acquire("m", "w3")
        assert (second["source"], third["source"]) == ("w1", "w2")
        # one origin reader cluster-wide
        assert (await co.acquire("other", "w4"))["source"] == WAIT
        # never in a cycle: w2 lost its source; w3 copies from w2, so w2 may not copy from w3
        co.release(second["lease"])
        assert (await co.acquire("m", "w2", exclude=["w1"]))["source"] == WAIT
        manifest = {"is_file": False, "files": {"a": {"size": 1, "sha256": "0" * 64}}}
        co.release(first["lease"], ok=True, manifest=manifest)
        assert co.origin_active == 0 and co.holders("m") == ["w1"]
        assert (await co.acquire("other", "w4"))["source"] == ORIGIN
        second = await co.acquire("m", "w2")
        assert second["source"] == "w1" and second["digest"] is not None
        # a long poll returns as soon as a slot frees up
        waiter = asyncio.ensure_future(co.acquire("m", "w5", exclude=["w3"], wait=5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        co.release(second["lease"], ok=True)
        assert (await asyncio.wait_for(waiter, 1))["source"] in ("w1", "w2")
        assert set(co.holders("m")) == {"w1", "w2"}

    asyncio.run(run())


def test_coordinator_releases_slots_of_dead_workers_and_skips_suspects():
    async def run():
        warm = {"m": {"w1": types.SimpleNamespace(files=True), "w2": types.SimpleNamespace(files=False)}}
        s = fake_scheduler("w1", "w2", "w3", "w4")
        co = SourceCoordinator(s, warm, caps(1, 1))
        lease = await co.acquire("m", "w2")
        assert lease["source"] == "w1" and co.uploads["w1"] == 1
        origin = await co.acquire("n", "w3")
        assert origin["source"] == ORIGIN
        # the receiver of the origin copy dies: its origin slot is free again
        del s.workers["w3"]
        co.remove_worker("w3")
        assert co.origin_active == 0 and (await co.acquire("n", "w4"))["source"] == ORIGIN
        # corrupt data from w1: never offered again; with no other holder, w2 goes to the origin
        co.release(lease["lease"], bad=True)
        assert co.holders("m") == [] and "w1" in co.suspect["m"]
        assert (await co.acquire("m", "w2", exclude=["w1"]))["source"] == WAIT  # origin cap is taken by "n"
        # a holder that dies mid-upload frees its slot; the receiver's later release is harmless
        co.release("unknown-lease")
        assert co.uploads.get("w1", 0) == 0
        # a holder that failed or stalled is not offered for a while
        warm["m"]["w2"].files = True
        lease = await co.acquire("m", "w4")
        assert lease["source"] == "w2"
        co.release(lease["lease"], failed=True)
        assert co.holders("m") == [] and (await co.acquire("m", "w4"))["source"] == WAIT

    asyncio.run(run())


def test_coordinator_grows_a_shallow_tree():
    async def run():
        s = fake_scheduler(*(f"w{i}" for i in range(1, 8)))
        co = SourceCoordinator(s, {}, caps(1, 2))
        got = {w: (await co.acquire("m", w))["source"] for w in s.workers}
        assert got["w1"] == ORIGIN
        assert got["w2"] == got["w3"] == "w1"
        # then the children of w1, two each, before anyone copies from a grandchild
        assert sorted(got[w] for w in ("w4", "w5", "w6", "w7")) == ["w2", "w2", "w3", "w3"]

    asyncio.run(run())
