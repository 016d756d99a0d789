"""Data integrity: what real storage, real installs and concurrent users do to context copies.

Origins that ignore ``Range``, a disk that fills up mid-copy, two clients
registering one name at once, an origin updated in place under a persistent
cache, files named like temporary files, a damaged copy with peers off, and
``dask-peer://`` reads: every byte a loader or a caller gets is the bytes
that were verified, and a changed origin is an error, never two versions.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import functools
import importlib
import logging
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dask
import fsspec
import pytest
from distributed import Client, Scheduler, Worker
from distributed.utils_test import gen_cluster, gen_test
from transfer_helpers import CHUNK, coordinator, copy_dir, digests, fast_transfer, load_digests, write_model

import dask_pervasive as dp
from dask_pervasive._protocol import SchedulerHandler
from dask_pervasive._settings import TransferSettings
from dask_pervasive.transfer import MANIFEST, PART, cached_copy, fetch_source, remove_stale_parts

_parts = importlib.import_module("dask_pervasive.transfer._parts")

SIZES = (200_000, 70_000)
#: Fast retries: 3 attempts, 50-100 ms apart.
FAST, _TRANSFER_CONFIG = fast_transfer(stall_timeout=5.0)
FAST_CONFIG = {**_TRANSFER_CONFIG, "pervasive.worker.retry-failed-after": "0s"}  # a failed load may be retried at once


def settings(chunk_size: int, **kwargs) -> TransferSettings:
    return TransferSettings(chunk_size=chunk_size, **kwargs)


def read_tree(path) -> dict[str, str]:
    """sha256 of every file a loader would see under ``path``."""
    return load_digests(path, "cpu")


def no_leftovers(dest: Path) -> bool:
    return not dest.exists() or not list(dest.rglob(f"*{PART}*"))


def model_context(url: str, name: str = "m") -> dp.Context:
    return dp.Context(name, load=load_digests, source=url, device="cpu")


class FullDisk:
    """The cache disk fills up: once ``after`` bytes of temporary files are written, the next write puts
    half of its chunk on disk, then raises ``OSError(ENOSPC)`` (as a real full disk does); later writes
    succeed (space was freed). Installed as ``open`` of :mod:`dask_pervasive.transfer._parts`."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.written = 0
        self.hits = 0
        self.armed = False

    def arm(self) -> None:
        """Fill up after ``after`` more bytes."""
        self.written = 0
        self.armed = True

    def open(self, path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 - the caller closes it
        if "w" in mode and os.path.basename(path).startswith(PART) and not path.endswith(MANIFEST):
            return _FillingFile(f, self)
        return f


class _FillingFile:
    def __init__(self, f, disk: FullDisk) -> None:
        self.f, self.disk = f, disk

    def write(self, data) -> int:
        disk = self.disk
        if disk.armed and disk.written + len(data) > disk.after:
            disk.armed = False
            disk.hits += 1
            self.f.write(bytes(data[: len(data) // 2]))  # part of the chunk reached the file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self.f.write(data)
        disk.written += len(data) if n is None else n
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch) -> FullDisk:
    disk = FullDisk(after=100_000)  # inside w0.bin, mid-chunk
    monkeypatch.setattr(_parts, "open", disk.open, raising=False)
    return disk


# -- origins without byte ranges ----------------------------------------------------------------------
class PlainHTTPOrigin:
    """``python -m http.server`` in a thread: the stdlib server, which ignores ``Range``.

    ``cut`` maps a served path (``"model/w0.bin"``) to how many more GETs of it send half the
    body, then stall (until :attr:`release` is set) and drop the connection; ``gets`` records
    ``(path, Range header)`` of every GET.
    """

    def __init__(self, directory: Path) -> None:
        origin = self
        self.cut: dict[str, int] = {}
        self.release = threading.Event()
        self.gets: list[tuple[str, str | None]] = []

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                origin.gets.append((self.path.lstrip("/"), self.headers.get("Range")))
                super().do_GET()

            def copyfile(self, source, outputfile):
                rel = self.path.lstrip("/")
                if origin.cut.get(rel, 0) > 0:
                    origin.cut[rel] -= 1
                    data = source.read()
                    outputfile.write(data[: len(data) // 2])
                    outputfile.flush()
                    origin.release.wait(10)  # the reader has the half and gives up on the rest
                    self.close_connection = True  # less than Content-Length promised
                    return
                super().copyfile(source, outputfile)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def plain_http(tmp_path):
    import fsspec.asyn

    fsspec.asyn.get_loop()  # fsspec's IO thread lives for the process
    files = write_model(tmp_path / "www", "model", SIZES)
    with PlainHTTPOrigin(tmp_path / "www") as origin:
        yield origin, files


@pytest.mark.parametrize("source", ["directory", "file"])
def test_origin_without_range_support_is_streamed_from_the_start(plain_http, tmp_path, source):
    """A plain ``http.server`` origin (no ``Range``): each file is one streaming GET from the start."""
    origin, files = plain_http
    url = origin.url("model/") if source == "directory" else origin.url("model/w0.bin")
    result = fetch_source(url, {}, str(tmp_path / "c"), FAST)
    if source == "directory":  # listed from the HTML index pages, sub/ included
        assert read_tree(result.path) == digests(files)
    else:
        assert result.manifest["is_file"] and Path(result.path).read_bytes() == files["w0.bin"]
    bodies = [(p, r) for p, r in origin.gets if p.removeprefix("model/") in files]
    assert all(r is None for _, r in bodies)  # never asked for a range
    assert sorted(p for p, _ in bodies) == sorted(f"model/{rel}" for rel in result.manifest["files"])  # one GET each


def test_resume_at_an_offset_only_where_the_origin_serves_ranges(plain_http, http_origin, tmp_path, caplog):
    """A read stalled mid-file: an origin that ignores ``Range`` is detected and read again from the start
    (once per origin: later files are not tried at an offset); one that serves ranges resumes at the offset."""
    origin, files = plain_http
    origin.cut = {"model/w0.bin": 1, "model/w1.bin": 1}
    quick = TransferSettings(chunk_size=CHUNK, retries=2, retry_backoff=0.05, stall_timeout=1.0)
    with caplog.at_level(logging.INFO, logger="dask_pervasive"):
        result = fetch_source(origin.url("model/"), {}, str(tmp_path / "plain"), quick)
    assert read_tree(result.path) == digests(files)
    assert not any(origin.cut.values())
    resumes = [p for p, r in origin.gets if r is not None]
    assert resumes == ["model/w0.bin"]  # tried once, refused (whole file sent): w1.bin not tried
    assert "cannot resume" in caplog.text
    # an origin that serves ranges, stalling after half of w0.bin (the half is received): resumed at the
    # offset reached, so w0.bin is served less than one and a half times (from the start: exactly 1.5x)
    http_origin.bandwidth = None
    ranged = write_model(Path(http_origin.directory), "model", SIZES)
    http_origin.inject("stall-body", path="model/w0.bin", seconds=10)
    result = fetch_source(http_origin.url("model/"), {}, str(tmp_path / "ranged"), quick)
    assert read_tree(result.path) == digests(ranged)
    assert http_origin.bytes_per_path()["model/w0.bin"] <= SIZES[0] * 3 // 2 - CHUNK


# -- temporary names never collide with real ones -----------------------------------------------


def test_files_named_like_temporary_files_are_never_cleaned_up(tmp_path):
    """Real files named ``*.part-*`` (sharded checkpoints) survive the stale-part clean-up, however old."""
    fs = fsspec.filesystem("memory")
    names = ["shard.part-00001.bin", "sub/model.part-host.1.abc", "x.bin.part-0"]
    for i, name in enumerate(names):
        fs.pipe(f"/models/sharded/{name}", bytes([i]) * 40)
    dest = tmp_path / "c"
    fetch_source("memory://models/sharded", {}, str(dest), settings(16))
    for p in dest.rglob("*"):
        os.utime(p, (0, 0))  # older than the clean-up's one hour
    assert remove_stale_parts(str(dest)) == 0
    cached = cached_copy("memory://models/sharded", str(dest), settings(16, verify=True))
    assert cached is not None and cached.cached
    assert sorted(cached.manifest["files"]) == sorted(names)


def test_origin_names_with_the_reserved_prefix_are_refused(tmp_path):
    """The prefix of temporary files and the manifest is reserved: an origin listing one is refused clearly."""
    fs = fsspec.filesystem("memory")
    fs.pipe("/models/reserved/weights.bin", b"w" * 10)
    fs.pipe("/models/reserved/sub/.pervasive-part-x", b"p")
    with pytest.raises(ValueError, match="reserved"):
        fetch_source("memory://models/reserved", {}, str(tmp_path / "c"), settings(16))


# -- a full disk mid-copy ---------------------------------------------------------------------------
def test_disk_full_mid_copy_from_the_origin_never_commits_a_torn_file(tmp_path, full_disk):
    """ENOSPC after part of a chunk: the copy fails as the receiver's disk (not retried against the origin),
    nothing is committed; once there is room, the next fetch gives exactly the origin's bytes."""
    files = write_model(tmp_path / "store", "model", SIZES)
    url = f"file://{tmp_path}/store/model/"
    dest = tmp_path / "c"
    full_disk.arm()
    with pytest.raises(dp.TransferError, match="No space left on device.*receiver's disk") as err:
        fetch_source(url, {}, str(dest), FAST)
    assert "failed 3 time" not in str(err.value)  # not retried against the origin
    assert full_disk.hits == 1
    assert not (dest / MANIFEST).exists() and not (dest / "w0.bin").exists() and no_leftovers(dest)
    result = fetch_source(url, {}, str(dest), FAST)
    assert read_tree(result.path) == digests(files)
    assert result.manifest["files"]["w0.bin"]["size"] == SIZES[0]


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=FAST_CONFIG)
async def test_disk_full_mid_copy_from_a_peer_blames_the_receiver(c, s, a, b, tmp_path, full_disk):
    """ENOSPC on the receiver while it copies from a peer: the load fails on the receiver, the healthy peer
    is neither cooled down nor suspect, no torn file is committed or served; with room again, right bytes."""
    files = write_model(tmp_path / "store", "model", SIZES)
    await dp.install(c, [model_context(f"file://{tmp_path}/store/model/")])
    await dp.prewarm(c, "m", workers=[a.address], progress=False)
    full_disk.arm()
    with pytest.raises(dp.ContextLoadError, match="No space left on device"):
        await dp.prewarm(c, "m", workers=[b.address], progress=False)
    assert full_disk.hits == 1
    transfer = coordinator(s)
    assert not transfer.cooling and not any(transfer.suspect.values())
    assert transfer.holders("m") == [a.address] and not transfer.leases and transfer.origin_active == 0
    dest = copy_dir(b)
    assert not (dest / MANIFEST).exists() and not (dest / "w0.bin").exists() and no_leftovers(dest)
    await dp.prewarm(c, "m", workers=[b.address], progress=False)
    assert await c.submit(dp.get_context, "m", workers=[b.address]) == digests(files)


# -- a damaged copy keeps its manifest as the reference (peers off, no scheduler plugin) ---------------
@pytest.mark.parametrize("how", ["peers-off", "no-scheduler-plugin"])
@gen_cluster(client=True, nthreads=[("", 1)], config=FAST_CONFIG)
async def test_damaged_copy_keeps_its_manifest_as_the_reference_without_peers(c, s, a, http_origin, how):
    """Through the worker (fetch_context → cached_copy → fetch_source): intact files are kept, a damaged
    one is read again and must match the first manifest, so an origin changed since is an error."""
    http_origin.bandwidth = None
    files = write_model(Path(http_origin.directory), "model", SIZES)
    with dask.config.set({"pervasive.transfer.peers": how != "peers-off"}):
        await dp.install(c, [model_context(http_origin.url("model/"))], scheduler=how != "no-scheduler-plugin")
        assert await c.submit(dp.get_context, "m") == digests(files)
        dest = copy_dir(a)
        # damaged: w1.bin cut short in the cache; intact files are kept on the re-fetch
        (dest / "w1.bin").write_bytes(files["w1.bin"][:1000])
        await dp.evict(c, "m")
        http_origin.reset_counters()
        assert await c.submit(dp.get_context, "m") == digests(files)
        assert http_origin.bytes_per_path() == {"model/w1.bin": SIZES[1]}
        # damaged again, and the origin changed in place since the first copy: an error, not a new version
        (dest / "w1.bin").write_bytes(files["w1.bin"][:1000])
        Path(http_origin.directory, "model", "w1.bin").write_bytes(os.urandom(SIZES[1]))
        await dp.evict(c, "m")
        with pytest.raises(dp.ContextLoadError, match="does not match the manifest"):
            await c.submit(dp.get_context, "m")
        assert not (dest / MANIFEST).exists() and no_leftovers(dest)


# -- a persistent cache and an origin updated in place ----------------------------------------------
async def _load_on(c, worker, name: str = "m"):
    return await c.submit(dp.get_context, name, workers=[worker.address], pure=False)


@pytest.mark.parametrize("mode", ["peers-off", "no-reference", "reference"])
@gen_test(timeout=120)
async def test_cached_copy_of_an_origin_updated_in_place_is_never_used_silently(http_origin, tmp_path, mode):
    """A restarted cluster, a worker with a persistent cache of version 1, the origin now at version 2
    (one file rewritten in place, same size): the cached copy is checked against the cluster's reference
    (the coordinator's manifest, else the origin's listing) and refused with the documented error, while
    a fresh worker reads version 2: never two versions silently."""
    http_origin.bandwidth = None
    v1 = write_model(Path(http_origin.directory), "model", SIZES)
    ctx = model_context(http_origin.url("model/"))
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    config = {**FAST_CONFIG, "pervasive.transfer.peers": mode != "peers-off"}
    with dask.config.set(config):
        async with (
            Scheduler(dashboard_address=":0") as s,
            Client(s.address, asynchronous=True) as c,
            Worker(s.address, nthreads=1, plugins=[dp.ContextWorkerPlugin([ctx], cache_dir=str(stale))]) as w,
        ):
            assert await _load_on(c, w) == digests(v1)
        # updated in place at the origin: same names and sizes, other bytes, a later modification time
        v2 = dict(v1, **{"w1.bin": os.urandom(SIZES[1])})
        target = Path(http_origin.directory, "model", "w1.bin")
        target.write_bytes(v2["w1.bin"])
        later = target.stat().st_mtime + 10
        os.utime(target, (later, later))
        async with Scheduler(dashboard_address=":0") as s, Client(s.address, asynchronous=True) as c:
            if mode != "peers-off":
                await c.register_plugin(dp.ContextSchedulerPlugin())
            async with Worker(
                s.address, nthreads=1, plugins=[dp.ContextWorkerPlugin([ctx], cache_dir=str(fresh))]
            ) as y:
                if mode == "reference":  # a fresh worker first: its copy of v2 is the cluster's reference
                    assert await _load_on(c, y) == digests(v2)
                    match = "differs from the copies other workers hold"
                else:
                    match = "changed since the cached copy"
                async with Worker(
                    s.address, nthreads=1, plugins=[dp.ContextWorkerPlugin([ctx], cache_dir=str(stale))]
                ) as x:
                    with pytest.raises(dp.ContextLoadError, match=match):
                        await _load_on(c, x)
                if mode != "reference":
                    assert await _load_on(c, y) == digests(v2)


# -- two clients registering one name at once ---------------------------------------------------------
def version(tag: str, path, device) -> str:
    return tag


@pytest.mark.parametrize("scheduler_plugin", [True, False])
@gen_cluster(client=True, nthreads=[("", 1)])
async def test_concurrent_registrations_of_one_name_have_exactly_one_winner(c, s, a, scheduler_plugin):
    """Two clients register context "m" at once with different definitions: exactly one wins cluster-wide;
    the loser gets ContextDefinitionError and leaves no trace (scheduler metadata and the declaration
    plugin are the winner's), so a worker joining later loads the winner."""
    await dp.install(c, scheduler=scheduler_plugin)
    async with Client(s.address, asynchronous=True) as c2:
        first = dp.Context("m", load=functools.partial(version, "first"))
        second = dp.Context("m", load=functools.partial(version, "second"))
        outcomes = await asyncio.gather(dp.register(c, first), dp.register(c2, second), return_exceptions=True)
        won = [ctx for ctx, out in zip((first, second), outcomes) if out is True]
        lost = [out for out in outcomes if isinstance(out, dp.ContextDefinitionError)]
        assert len(won) == 1 and len(lost) == 1, outcomes
        (winner,) = won
        assert s.get_metadata(keys=["pervasive", "contexts", "m"]) == winner.token
        assert winner.describe() in s.get_metadata(keys=["pervasive", "definitions", "m"])
        declarations = [p for name, p in s.worker_plugins.items() if name.endswith("-m")]
        assert len(declarations) == 1
        tag = winner.load.args[0]
        assert await c.submit(dp.get_context, "m", workers=[a.address]) == tag
        async with Worker(s.address, nthreads=1) as late:
            assert await c2.submit(dp.get_context, "m", workers=[late.address]) == tag
        # and the loser cannot slip in later either
        loser = second if winner is first else first
        with pytest.raises(dp.ContextDefinitionError):
            await dp.register(c2, loser)


# -- dask-peer:// reads: upload slots, every byte verified -------------------------------------------
BLOCK = _parts.BLOCK_SIZE


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config={**FAST_CONFIG, "pervasive.transfer.peer-max-uploads": 1})
async def test_peer_filesystem_reads_take_upload_slots_and_verify_ranges(c, s, a, b, tmp_path):
    """A dask-peer:// read waits for a free upload slot of the holder (as a peer copy does); a ranged read
    is checked against the block digests of the coordinator's reference: a range in an intact block is
    served, one touching a damaged block raises."""
    data = os.urandom(2 * BLOCK + BLOCK // 2)
    (tmp_path / "store" / "model").mkdir(parents=True)
    (tmp_path / "store" / "model" / "big.bin").write_bytes(data)
    await dp.install(c, [model_context(f"file://{tmp_path}/store/model/")])
    await dp.prewarm(c, "m", workers=[a.address], progress=False)
    transfer = coordinator(s)
    assert len(transfer.manifests["m"][2]["blocks"]["big.bin"]) == 3

    def read(path, **kw):
        try:
            return fsspec.filesystem("dask-peer").cat_file(path, **kw)
        except dp.TransferError as exc:
            return f"TransferError: {exc}"

    # the holder's only upload slot is taken (a copy in progress): the read waits for it
    busy = transfer._lease("m", b.address, a.address)
    asks = []
    acquire = s.handlers[SchedulerHandler.ACQUIRE_SOURCE.value]

    async def counting(*args, **kwargs):
        if kwargs.get("read"):
            asks.append(kwargs)
        return await acquire(*args, **kwargs)

    s.handlers[SchedulerHandler.ACQUIRE_SOURCE.value] = counting
    fut = c.submit(read, "dask-peer://m/big.bin", start=BLOCK + 5, end=BLOCK + 100, workers=[b.address])
    while len(asks) < 2:  # asked, told to wait, asked again
        await asyncio.sleep(0.05)
    assert not fut.done() and not [lease for lease in transfer.leases.values() if lease.read]
    transfer.release(busy.id)
    assert await fut == data[BLOCK + 5 : BLOCK + 100]
    assert transfer.uploads.get(a.address, 0) == 0 and not transfer.leases
    # a damaged block on the holder: ranges inside other blocks are served, ranges touching it refused
    target = copy_dir(a) / "big.bin"
    damaged = bytearray(data)
    damaged[2 * BLOCK + 7] ^= 0xFF
    target.write_bytes(bytes(damaged))
    assert (
        await c.submit(read, "dask-peer://m/big.bin", start=10, end=BLOCK + 10, workers=[b.address])
        == (data[10 : BLOCK + 10])
    )
    bad = await c.submit(read, "dask-peer://m/big.bin", start=2 * BLOCK, end=2 * BLOCK + 10, workers=[b.address])
    assert isinstance(bad, str) and "does not match" in bad
    assert a.address in transfer.suspect["m"]
