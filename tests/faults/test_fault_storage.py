"""Storage faults: an origin that refuses, stalls, truncates or corrupts.

Every fault ends in either the right bytes (transient faults, after bounded
retries with backoff) or a clear ``TransferError`` / ``ContextLoadError``
within a bounded time (permanent faults) — never a hang and never a trusted
wrong copy. Both copy paths are covered: the plain origin copy of
:func:`dask_pervasive.transfer.fetch_source` (``pervasive.transfer.peers: false``,
or no scheduler plugin) and the coordinated one of :mod:`dask_pervasive.transfer`.

Two fault-injecting origins: :class:`~dask_pervasive.testing.HTTPOrigin`
(``origin.inject(...)``: real sockets, for refused / stalled / cut / reset
connections) and ``faulty://``, a local file system whose ``info`` / ``open``
/ ``read`` misbehave per a script (for faults the HTTP layer cannot see:
a file shorter than listed, flipped bytes, a store with no timeouts at all).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import fsspec
import pytest
from distributed.utils_test import gen_cluster
from fsspec.implementations.local import LocalFileSystem
from transfer_helpers import CHUNK, coordinator, digests, fast_transfer, write_model

import dask_pervasive as dp
from dask_pervasive._settings import TransferSettings
from dask_pervasive.transfer import MANIFEST, PART, RetryPolicy, fetch_source

SIZES = (200_000, 70_000)
#: Fast retries for tests: 3 attempts, 50 ms then 100 ms apart (with jitter: 25-100 ms).
FAST, FAST_CONFIG = fast_transfer(stall_timeout=1.0)
#: Upper bound for any failing fetch here: 3 attempts x (1 s stall + backoff), with room for a slow machine.
BOUND = 20.0


# -- helpers ------------------------------------------------------------------------------
def make_model(root: Path, sizes=SIZES, seed: int = 0) -> dict[str, bytes]:
    return write_model(root, "model", sizes, seed)


def read_tree(path) -> dict[str, str]:
    """sha256 of every regular file under ``path`` but the manifest (what a loader would see)."""
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            if n == MANIFEST:
                continue
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path).replace(os.sep, "/")] = hashlib.sha256(f.read()).hexdigest()
    return out


def load_digests(path, device):
    return read_tree(path)


def no_leftovers(dest: Path) -> bool:
    return not dest.exists() or not list(dest.rglob(f"*{PART}*"))


def retry_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "retry" in r.getMessage() and r.levelno == logging.WARNING]


def wait_for_threads(before: set, timeout: float = 5.0) -> set:
    """Threads started since ``before`` that are still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {t.name for t in left}


def assert_attempts(fault, attempts: int) -> None:
    """The fault hit once per attempt; faults on every request (listing included) may hit a few
    times per attempt: fsspec's http ``info`` tries HEAD then GET, aiohttp resends an idempotent
    request once when the server drops the connection."""
    if fault.on == "get":
        assert fault.hits == attempts
    else:
        assert attempts <= fault.hits <= 4 * attempts


@pytest.fixture
def origin(http_origin):
    """The conftest HTTP origin, unthrottled, with a model in ``model/``."""
    http_origin.bandwidth = None
    files = make_model(Path(http_origin.directory))
    yield http_origin, files
    http_origin.clear_faults()


# -- a scripted, misbehaving file system -----------------------------------------------------
@dataclass
class Misbehave:
    """One scripted fault of ``faulty://``: ``op`` on a path ending with ``path``."""

    kind: str  # "refuse" (info/open), "reset", "stall", "short", "flip" (reads)
    path: str = ""
    times: int | None = 1
    hits: int = 0


class FaultyFileSystem(LocalFileSystem):
    """Local files behind a flaky store (``faulty:///abs/path``); faults per :attr:`script`.

    ``refuse`` fails ``info``/``open`` with ``ConnectionRefusedError``;
    ``reset`` fails the second read of a file; ``stall`` blocks a read until
    :attr:`release` is set (this store has no timeout of its own); ``short``
    ends the file early at half its size (no error: only the listed size
    tells); ``flip`` flips a byte of the first read.
    """

    protocol = ("faulty",)
    cachable = False
    script: ClassVar[list[Misbehave]] = []
    calls: ClassVar[Counter] = Counter()
    release: ClassVar[threading.Event] = threading.Event()

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("faulty://"):
            path = path[len("faulty://") :]
        return super()._strip_protocol(path)

    @classmethod
    def fault(cls, op: str, path: str) -> Misbehave | None:
        cls.calls[op] += 1
        for m in cls.script:
            kinds = ("refuse",) if op in ("info", "open") else ("reset", "stall", "short", "flip")
            if m.kind in kinds and str(path).endswith(m.path) and (m.times is None or m.times > 0):
                if m.times is not None:
                    m.times -= 1
                m.hits += 1
                return m
        return None

    def info(self, path, **kwargs):
        if self.fault("info", path) is not None:
            raise ConnectionRefusedError(111, "injected: connection refused")
        return super().info(path, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if self.fault("open", path) is not None:
            raise ConnectionRefusedError(111, "injected: connection refused")
        f = super()._open(path, mode, **kwargs)
        return _FaultyReader(f, self.fault("read", path), type(self).release)


class _FaultyReader:
    def __init__(self, f, fault: Misbehave | None, release: threading.Event) -> None:
        self.f, self.fault, self.release = f, fault, release
        self.size = os.fstat(f.fileno()).st_size
        self.reads = 0

    def read(self, n=-1):
        self.reads += 1
        kind = self.fault.kind if self.fault is not None else None
        if kind == "reset" and self.reads == 2:
            raise ConnectionResetError(104, "injected: connection reset by peer")
        if kind == "stall" and self.reads == 2:
            self.release.wait(20)
            raise ConnectionResetError(104, "injected: stalled read ended")
        if kind == "short":
            n = max(0, min(n if n > 0 else self.size, self.size // 2 - self.f.tell()))
        data = self.f.read(n)
        if kind == "flip" and self.reads == 1 and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    def seek(self, *args):
        return self.f.seek(*args)

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


@pytest.fixture
def faulty(tmp_path):
    """``(url of a model on faulty://, its files)``; the script is cleared and stalls released after."""
    FaultyFileSystem.script = []
    FaultyFileSystem.calls = Counter()
    FaultyFileSystem.release = threading.Event()
    files = make_model(tmp_path / "store")
    yield f"faulty://{tmp_path}/store/model/", files
    FaultyFileSystem.release.set()
    FaultyFileSystem.script = []


# -- plain origin copy (files.py) ----------------------------------------------------------------
def test_origin_refusing_connections_fails_clearly_after_bounded_retries(origin, tmp_path, caplog):
    http, _ = origin
    url = http.url("model/")
    http.stop()  # nothing listens on the port: connection refused
    start = time.monotonic()
    with pytest.raises(dp.TransferError, match=r"failed 3 time\(s\).*retries=2") as err:
        fetch_source(url, {}, str(tmp_path / "c"), FAST)
    assert time.monotonic() - start < BOUND
    assert "Cannot connect" in str(err.value) or "refused" in str(err.value).lower()
    assert len(retry_warnings(caplog)) == 2  # bounded: two retries, each logged
    assert not (tmp_path / "c" / MANIFEST).exists()


def test_origin_down_then_back_recovers(origin, tmp_path):
    http, files = origin
    url = http.url("model/")
    http.stop()
    threading.Timer(0.5, http.start).start()  # back on the same port half a second later
    patient = TransferSettings(chunk_size=CHUNK, retries=6, retry_backoff=0.2, retry_backoff_max=1.0, stall_timeout=2.0)
    result = fetch_source(url, {}, str(tmp_path / "c"), patient)
    assert read_tree(result.path) == digests(files)


@pytest.mark.parametrize("kind", ["stall", "stall-body", "truncate", "reset", "error"])
@pytest.mark.parametrize("times", [1, 2])
def test_transient_http_fault_recovers_transparently(origin, tmp_path, kind, times):
    http, files = origin
    fault = http.inject(kind, path="model/w0.bin", times=times)
    result = fetch_source(http.url("model/"), {}, str(tmp_path / "c"), FAST)
    assert fault.hits == times
    assert read_tree(result.path) == digests(files)
    assert json.loads((tmp_path / "c" / MANIFEST).read_text())["files"]["w0.bin"]["size"] == SIZES[0]
    assert no_leftovers(tmp_path / "c")


@pytest.mark.parametrize("kind", ["stall", "stall-body", "truncate", "reset", "error"])
def test_permanent_http_fault_fails_clearly_never_hangs(origin, tmp_path, kind, caplog):
    http, _ = origin
    fault = http.inject(kind, times=None)  # every request (of any file, or any request at all)
    before = set(threading.enumerate())
    start = time.monotonic()
    with pytest.raises(dp.TransferError, match=r"failed 3 time\(s\)"):
        fetch_source(http.url("model/"), {}, str(tmp_path / "c"), FAST)
    assert time.monotonic() - start < BOUND
    assert len(retry_warnings(caplog)) == FAST.retries  # exactly the attempts allowed
    assert_attempts(fault, FAST.retries + 1)
    assert not (tmp_path / "c" / MANIFEST).exists() and no_leftovers(tmp_path / "c")
    # A stalled request ends too (aiohttp's own read timeout): no thread is left blocked on it.
    assert not wait_for_threads(before)


def test_corrupt_refetch_is_checked_against_the_first_manifest(origin, tmp_path):
    """Without a reference the first fetch defines the manifest; a refetch must match it."""
    http, files = origin
    dest = tmp_path / "c"
    fetch_source(http.url("model/"), {}, str(dest), FAST)
    (dest / "w0.bin").write_bytes(b"damaged on disk")  # the cached copy fails verification
    fault = http.inject("corrupt", path="model/w0.bin")  # and the origin flips a byte on the next read
    result = fetch_source(http.url("model/"), {}, str(dest), FAST)
    assert fault.hits == 1 and not result.cached
    assert read_tree(result.path) == digests(files)
    assert http.bytes_per_path()["model/w1.bin"] == SIZES[1]  # intact files were not read again


def test_origin_that_changed_since_the_first_copy_is_an_error(origin, tmp_path):
    http, _ = origin
    dest = tmp_path / "c"
    fetch_source(http.url("model/"), {}, str(dest), FAST)
    (dest / "w0.bin").unlink()
    Path(http.directory, "model", "w0.bin").write_bytes(os.urandom(SIZES[0]))  # changed in place
    http.reset_counters()
    with pytest.raises(dp.TransferError, match="does not match the manifest"):
        fetch_source(http.url("model/"), {}, str(dest), FAST)
    assert http.bytes_per_path()["model/w0.bin"] == 3 * SIZES[0]  # read 1 + 2 retries, then gave up
    assert not (dest / MANIFEST).exists() and not (dest / "w0.bin").exists()


@pytest.mark.parametrize("kind", ["refuse", "reset", "short", "flip"])
def test_transient_store_fault_recovers(faulty, tmp_path, kind):
    url, files = faulty
    dest = tmp_path / "c"
    if kind == "flip":  # needs a reference: a first good copy, then a refetch of a damaged file
        fetch_source(url, {}, str(dest), FAST)
        (dest / "w0.bin").unlink()
    script = FaultyFileSystem.script = [Misbehave(kind, path="w0.bin")]
    result = fetch_source(url, {}, str(dest), FAST)
    assert script[0].hits == 1
    assert read_tree(result.path) == digests(files)


def test_file_shorter_than_listed_is_never_trusted(faulty, tmp_path):
    """A read that ends early without an error (a cut stream, a file truncated at the origin)."""
    url, _ = faulty
    FaultyFileSystem.script = [Misbehave("short", path="w0.bin", times=None)]
    with pytest.raises(dp.TransferError, match=r"got 100000 bytes .* lists 200000 \(truncated\?\)"):
        fetch_source(url, {}, str(tmp_path / "c"), FAST)
    assert not (tmp_path / "c" / MANIFEST).exists() and not (tmp_path / "c" / "w0.bin").exists()


def test_store_without_timeouts_is_bounded_by_the_stall_watchdog(faulty, tmp_path):
    """``faulty://`` blocks a read for a minute and has no timeout of its own."""
    url, files = faulty
    FaultyFileSystem.script = [Misbehave("stall", path="w0.bin", times=None)]
    start = time.monotonic()
    with pytest.raises(dp.TransferError, match="no answer for 1s"):
        fetch_source(url, {}, str(tmp_path / "c"), FAST)
    assert time.monotonic() - start < BOUND
    FaultyFileSystem.release.set()
    # and a stall that happens once costs one stall-timeout, then the copy goes on
    FaultyFileSystem.release = threading.Event()
    FaultyFileSystem.script = [Misbehave("stall", path="w0.bin")]
    result = fetch_source(url, {}, str(tmp_path / "c"), FAST)
    assert read_tree(result.path) == digests(files)


def test_missing_source_is_not_retried(tmp_path, caplog):
    with pytest.raises(FileNotFoundError):
        fetch_source(f"file://{tmp_path}/nope/", {}, str(tmp_path / "c"), FAST)
    assert not retry_warnings(caplog)


def test_retry_policy_from_config_and_backoff_is_capped():
    import dask.config

    with dask.config.set(
        {
            "pervasive.transfer.retries": 5,
            "pervasive.transfer.retry-backoff": "200ms",
            "pervasive.transfer.retry-backoff-max": "1s",
        }
    ):
        policy = RetryPolicy.from_settings(TransferSettings.from_config())
    assert (policy.retries, policy.backoff, policy.backoff_max) == (5, 0.2, 1.0)
    delays = [policy.delay(k) for k in range(1, 7)]
    assert 0.1 <= delays[0] <= 0.2 and 0.2 <= delays[1] <= 0.4 and 0.4 <= delays[2] <= 0.8
    assert all(0.5 <= d <= 1.0 for d in delays[3:])  # capped (with jitter)
    with pytest.raises(dp.ConfigurationError):
        RetryPolicy(retries=-1)


def test_http_origin_is_quiet_about_readers_that_go_away(origin, capfd):
    """A reader killed mid-body (reset or closed connection) is no error of the origin's."""
    import socket
    import struct

    http, _ = origin
    http.bandwidth = 1e6
    before = set(threading.enumerate())
    for how in ("reset", "close"):
        sock = socket.create_connection(("127.0.0.1", http.port))
        sock.sendall(b"GET /model/w0.bin HTTP/1.0\r\nHost: x\r\n\r\n")
        assert sock.recv(1024)
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert not wait_for_threads(before, 10)  # the server noticed on its next writes
    assert "Traceback" not in capfd.readouterr().err


# -- through the workers ------------------------------------------------------------------------------
def model_context(url: str, name: str = "m") -> dp.Context:
    return dp.Context(name, load=load_digests, source=url, device="cpu")


@pytest.mark.parametrize("peers", [True, False])
@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=FAST_CONFIG)
async def test_workers_recover_from_transient_origin_faults(c, s, a, b, origin, peers):
    http, files = origin
    for kind in ("truncate", "stall-body", "reset"):
        http.inject(kind, path="model/w0.bin")
    await dp.install(c, [model_context(http.url("model/"))], scheduler=peers)
    assert len(await dp.prewarm(c, "m", progress=False)) == 2
    for w in (a, b):
        assert await c.submit(dp.get_context, "m", workers=[w.address]) == digests(files)
    assert sum(r["failures"] for r in await dp.stats(c)) == 0
    if peers:
        transfer = coordinator(s)
        assert transfer.origin_active == 0 and not transfer.leases


@pytest.mark.parametrize("peers", [True, False])
@pytest.mark.parametrize("kind", ["stall", "truncate"])
@gen_cluster(client=True, nthreads=[("", 1)], config=FAST_CONFIG)
async def test_workers_fail_clearly_when_the_origin_stays_broken(c, s, a, origin, peers, kind, caplog):
    http, _ = origin
    url = http.url("model/")
    fault = http.inject(kind, times=None)
    await dp.install(c, [model_context(url)], scheduler=peers)
    start = time.monotonic()
    with pytest.raises(dp.ContextLoadError) as err:
        await c.submit(dp.get_context, "m")
    assert time.monotonic() - start < BOUND
    assert len(retry_warnings(caplog)) == 2
    assert_attempts(fault, 3)
    e = err.value
    assert (e.context, e.worker, e.source) == ("m", a.address, url)
    assert isinstance(e.cause, dp.TransferError) and "failed 3 time(s)" in str(e)
    if peers:  # the origin slot is free again
        transfer = coordinator(s)
        assert transfer.origin_active == 0 and not transfer.leases
    http.clear_faults()


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=FAST_CONFIG)
async def test_coordinated_origin_reads_are_checked_against_the_reference_manifest(c, s, a, b, origin):
    """The first complete copy defines the manifest; a later origin read must match it."""
    http, files = origin
    await dp.install(c, [model_context(http.url("model/"))])
    await dp.prewarm(c, "m", workers=[a.address], progress=False)
    assert "m" in coordinator(s).manifests
    await a.close()  # nobody to copy from: b reads the origin, with the scheduler's manifest in hand
    fault = http.inject("corrupt", path="model/w0.bin")
    await dp.prewarm(c, "m", workers=[b.address], progress=False)
    assert fault.hits == 1
    assert await c.submit(dp.get_context, "m", workers=[b.address]) == digests(files)


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=FAST_CONFIG)
async def test_coordinated_origin_that_changed_is_an_error(c, s, a, b, origin):
    http, _ = origin
    await dp.install(c, [model_context(http.url("model/"))])
    await dp.prewarm(c, "m", workers=[a.address], progress=False)
    await a.close()
    Path(http.directory, "model", "w0.bin").write_bytes(os.urandom(SIZES[0]))
    with pytest.raises(dp.ContextLoadError, match="does not match the manifest"):
        await c.submit(dp.get_context, "m", workers=[b.address])
    transfer = coordinator(s)
    assert transfer.origin_active == 0 and not transfer.leases
    cache = b.plugins["pervasive"].cache
    dest = Path(cache.files_dir(cache.entries["m"].context))
    assert not (dest / MANIFEST).exists() and no_leftovers(dest)
