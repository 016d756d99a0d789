"""Security of peer transfer: bad input from peers and callers, refused and logged.

A worker serves only manifest-listed files of registered contexts, resolved
strictly inside the copy's directory, in capped chunks; a receiver trusts
nothing a peer says that does not check out (paths, sizes, hashes, the
scheduler's reference manifest). Property tests feed the validators
arbitrary text and JSON. The model is documented in ``docs/security.md``.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

import fsspec
import pytest
from distributed.security import Security
from distributed.utils_test import captured_logger, gen_cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transfer_helpers import (
    caps,
    coordinator,
    copy_dir,
    digests,
    fake_scheduler,
    load_digests,
    make_model,
    model_context,
)

import dask_pervasive as dp
from dask_pervasive.transfer import MANIFEST, SourceCoordinator
from dask_pervasive.transfer._manifest import check_manifest, resolve_file, safe_name, safe_relpath

SMALL_CHUNKS = {"pervasive.transfer.chunk-size": "32KiB"}
CHUNK = 32 * 2**10


# -- the serving side ------------------------------------------------------------------------------
@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=SMALL_CHUNKS)
async def test_server_refuses_anything_but_listed_files_and_logs_it(c, s, a, b, http_origin, tmp_path):
    make_model(http_origin)
    await dp.install(
        c, [model_context(http_origin), dp.Context("cold", load=load_digests, source=http_origin.url("model/"))]
    )
    await dp.prewarm(c, "m", workers=[a.address], progress=False)
    rpc = b.rpc(a.address)
    assert len(await rpc.pervasive_read(context="m", path="w0.bin", offset=0, length=10)) == 10
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("do not serve either")
    # a file of the copy replaced by a symlink out of it, and the directory holding another one
    link = copy_dir(a) / "w1.bin"
    link.unlink()
    link.symlink_to(secret)
    sub = copy_dir(a) / "sub"
    for p in sub.iterdir():
        p.unlink()
    sub.rmdir()
    sub.symlink_to(outside, target_is_directory=True)
    bad = [
        ({"path": "../../../../etc/passwd"}, "traversal"),
        ({"path": "sub/../w0.bin"}, "traversal"),
        ({"path": "./w0.bin"}, "traversal"),
        ({"path": "w0.bin/"}, "traversal"),
        ({"path": "/etc/passwd"}, "absolute"),
        ({"path": str(secret)}, "absolute"),
        ({"path": "..\\..\\etc\\passwd"}, "malformed"),
        ({"path": "\\etc\\passwd"}, "malformed"),
        ({"path": "C:\\Windows\\win.ini"}, "malformed"),
        ({"path": "w0.bin\x00.txt"}, "malformed"),
        ({"path": None}, "malformed"),
        ({"path": ["w0.bin"]}, "malformed"),
        ({"path": "nope.bin"}, "not a file of this context"),
        ({"path": MANIFEST}, "not a file of this context"),
        ({"path": "w1.bin"}, "outside"),  # symlinked file
        ({"path": "sub/config.json"}, "outside"),  # symlinked directory
        ({"context": "nope"}, "unknown context"),  # never registered
        ({"context": ["m"]}, "unknown context"),
        ({"context": "cold"}, "no complete copy"),  # registered, not here
        ({"token": "other"}, "different definition"),
        ({"offset": -1}, "bad range"),
        ({"offset": "0"}, "bad range"),
        ({"offset": True}, "bad range"),
        ({"length": -5}, "bad range"),
        ({"length": 0}, "bad range"),
        ({"length": 2.5}, "bad range"),
    ]
    for kwargs, why in bad:
        with captured_logger("dask_pervasive.transfer") as log, pytest.raises(dp.TransferError, match=why):
            await rpc.pervasive_read(**{"context": "m", "path": "w0.bin", "offset": 0, "length": 10, **kwargs})
        logged = log.getvalue()
        assert "refused" in logged and a.address in logged and why in logged, (kwargs, logged)
    for context in ("nope", "cold"):
        with captured_logger("dask_pervasive.transfer") as log, pytest.raises(dp.TransferError):
            await rpc.pervasive_manifest(context=context)
        assert "refused" in log.getvalue()
    assert "do not serve" not in secret.read_text().replace("do not serve", "")  # (untouched)


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=SMALL_CHUNKS)
async def test_oversized_chunk_requests_are_capped_and_logged_once(c, s, a, b, http_origin):
    files = make_model(http_origin)
    await dp.install(c, [model_context(http_origin)])
    await dp.prewarm(c, "m", workers=[a.address], progress=False)
    rpc = b.rpc(a.address)
    with captured_logger("dask_pervasive.transfer") as log:
        for _ in range(3):
            data = await rpc.pervasive_read(context="m", path="w0.bin", offset=0, length=10**12)
            assert data == files["w0.bin"][:CHUNK]  # never more than chunk-size in memory
        assert len(await rpc.pervasive_read(context="m", path="w0.bin", offset=0)) == CHUNK
    assert log.getvalue().count("capped") == 1


@gen_cluster(client=True, nthreads=[("", 1)] * 3, security=Security.temporary(), config=SMALL_CHUNKS)
async def test_transfer_over_tls(c, s, a, b, w3, http_origin):
    files = make_model(http_origin)
    size = sum(map(len, files.values()))
    assert a.address.startswith("tls://")
    await dp.install(c, [model_context(http_origin)])
    await dp.prewarm(c, "m", progress=False)
    rows = [r for r in await dp.stats(c) if r["context"] == "m"]
    assert sum(r["bytes_from_peers"] for r in rows) == 2 * size
    assert http_origin.bytes_served == size
    assert await c.submit(dp.get_context, "m", workers=[b.address]) == digests(files)


# -- the receiving side ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "evil",
    [
        {"../../evil.bin": {"size": 4, "sha256": "0" * 64}},
        {"/tmp/evil.bin": {"size": 4, "sha256": "0" * 64}},
        {"..\\evil.bin": {"size": 4, "sha256": "0" * 64}},
        {MANIFEST: {"size": 4, "sha256": "0" * 64}},
        {"w0.bin": {"size": -1, "sha256": "0" * 64}},
        {"w0.bin": {"size": 4, "sha256": "not a hash"}},
    ],
)
@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=SMALL_CHUNKS)
async def test_receiver_rejects_a_malicious_peer_manifest(c, s, a, b, http_origin, tmp_path, evil):
    files = make_model(http_origin)
    await dp.install(c, [model_context(http_origin)])
    await dp.prewarm(c, "m", workers=[a.address], progress=False)

    async def lying_manifest(comm=None, context=None, token=None):
        return {"is_file": False, "files": evil}

    a.handlers["pervasive_manifest"] = lying_manifest
    coordinator(s).manifests.clear()  # no reference to compare with: the manifest's own checks must catch it
    with captured_logger("dask_pervasive.transfer") as log:
        await dp.prewarm(c, "m", workers=[b.address], progress=False)
    assert "rejected" in log.getvalue()
    assert a.address in coordinator(s).suspect["m"]  # not offered again
    assert await c.submit(dp.get_context, "m", workers=[b.address]) == digests(files)  # from the origin
    assert not list(Path(tempfile.gettempdir()).glob("evil.bin")) and not list(tmp_path.rglob("evil.bin"))
    assert sorted(load_digests(str(copy_dir(b)), "cpu")) == sorted(files)


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=SMALL_CHUNKS)
async def test_a_plausible_lie_does_not_poison_the_copy(c, s, a, b, http_origin):
    """A well-formed manifest listing a file that does not exist, before any reference is known:
    once the origin disagrees, what unchecked peers said is forgotten and the copy completes."""
    files = make_model(http_origin)
    await dp.install(c, [model_context(http_origin)])
    await dp.prewarm(c, "m", workers=[a.address], progress=False)
    serve = a.handlers["pervasive_manifest"]

    async def lying_manifest(comm=None, context=None, token=None):
        real = await serve(comm, context=context, token=token)
        return {**real, "files": {**real["files"], "extra.bin": {"size": 4, "sha256": "ab" * 32}}}

    a.handlers["pervasive_manifest"] = lying_manifest
    coordinator(s).manifests.clear()
    with captured_logger("dask_pervasive.transfer") as log:
        await dp.prewarm(c, "m", workers=[b.address], progress=False)
    assert "starting over from the origin" in log.getvalue()
    assert await c.submit(dp.get_context, "m", workers=[b.address]) == digests(files)
    assert not (copy_dir(b) / "extra.bin").exists()


@gen_cluster(client=True, nthreads=[("", 1)] * 2, config=SMALL_CHUNKS)
async def test_peer_filesystem_verifies_every_byte_served(c, s, a, b, http_origin):
    """Whole-file and ranged reads through dask-peer:// are checked (sha256, block digests); the holder
    that alone served bad bytes is reported and not offered again."""
    files = make_model(http_origin)
    await dp.install(c, [model_context(http_origin)])
    await dp.prewarm(c, "m", workers=[a.address], progress=False)

    def read(path, **kw):
        try:
            return fsspec.filesystem("dask-peer").cat_file(path, **kw)
        except (dp.TransferError, FileNotFoundError) as exc:
            return f"{type(exc).__name__}: {exc}"

    assert await c.submit(read, "dask-peer://m/w1.bin", workers=[b.address]) == files["w1.bin"]
    target = copy_dir(a) / "w0.bin"
    data = bytearray(target.read_bytes())
    data[5] ^= 0xFF
    target.write_bytes(bytes(data))
    part = await c.submit(read, "dask-peer://m/w0.bin", start=0, end=10, workers=[b.address])
    assert isinstance(part, str) and "does not match" in part  # ranged reads are verified too
    assert a.address in coordinator(s).suspect["m"]
    whole = await c.submit(read, "dask-peer://m/w0.bin", workers=[b.address])
    assert isinstance(whole, str) and files["w0.bin"][:10] not in whole.encode(errors="ignore")


@pytest.mark.parametrize(
    "manifest",
    [
        {"is_file": False, "files": {"../x": {"size": 1, "sha256": "0" * 64}}},
        {"is_file": False, "files": {}},
        {"is_file": False, "files": {"a": {"size": "1", "sha256": "0" * 64}}},
        {"is_file": "yes", "files": {"a": {"size": 1, "sha256": "0" * 64}}},
        {"partial": True, "is_file": False, "files": {"a": {"size": 1, "sha256": "0" * 64}}},
        ["not", "a", "mapping"],
    ],
)
def test_coordinator_never_trusts_a_malformed_first_manifest(manifest):
    """Trust on first use, but only of a well-formed, complete manifest."""

    async def run():
        sched = fake_scheduler("w1", "w2", "w3")
        co = SourceCoordinator(sched, {}, caps(1, 1))
        lease = await co.acquire("m", "w1")
        with captured_logger("dask_pervasive.transfer") as log:
            co.release(lease["lease"], ok=True, manifest=manifest)
        assert "m" not in co.manifests and "malformed manifest" in log.getvalue()
        good = {"is_file": False, "files": {"a": {"size": 1, "sha256": "ab" * 32}}}
        lease = await co.acquire("m", "w2")
        co.release(lease["lease"], ok=True, manifest=good)
        assert co.manifests["m"][2] == good
        # the reference goes to the next origin reader, so each file it reads is checked
        for w in ("w1", "w2"):  # the holders are gone
            del sched.workers[w]
            co.remove_worker(w)
        reply = await co.acquire("m", "w3")
        assert reply["source"] == "origin" and reply["manifest"] == good

    asyncio.run(run())


# -- properties --------------------------------------------------------------------------------------
SEGMENTS = st.sampled_from(["a", "b", "c", "..", ".", "", "link", "dirlink", "x y", "é", "\\", "~", "C:", "\x00"])
PATHS = st.one_of(st.text(max_size=40), st.lists(SEGMENTS, max_size=6).map("/".join))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "size": st.one_of(st.integers(-5, 2**40), st.booleans(), st.text(max_size=3), st.none()),
        "sha256": st.one_of(st.text(alphabet="0123456789abcdefABCDEF", min_size=63, max_size=65), st.text(max_size=5)),
    },
)
MANIFESTS = st.fixed_dictionaries(
    {"files": st.dictionaries(PATHS, st.one_of(ENTRY, JSON), max_size=5)},
    optional={
        "is_file": st.one_of(st.booleans(), st.none(), JSON),
        "partial": st.one_of(st.booleans(), JSON),
        "expected": st.one_of(st.lists(PATHS, max_size=4), JSON),
        "received": JSON,
    },
)


def inside(root: str, rel: str) -> bool:
    full = os.path.normpath(os.path.join(root, *rel.split("/")))
    return full.startswith(root + os.sep)


@settings(max_examples=400, deadline=None)
@given(PATHS)
def test_safe_relpath_never_leaves_the_root(text):
    root = "/srv/cache/m"
    try:
        rel = safe_relpath(text)
    except ValueError:
        return
    assert inside(root, rel) and not rel.startswith("/") and "\x00" not in rel
    assert ".." not in rel.split("/") and safe_relpath(rel) == rel  # normalized: a fixed point


@settings(max_examples=400, deadline=None)
@given(st.one_of(PATHS, JSON))
def test_safe_name_accepts_only_plain_relative_paths(value):
    if safe_name(value):
        assert isinstance(value, str) and inside("/srv/cache/m", value)
        parts = value.split("/")
        assert all(p not in ("", ".", "..") for p in parts) and not value.startswith(MANIFEST)


@settings(max_examples=500, deadline=None)
@given(st.one_of(JSON, MANIFESTS))
def test_check_manifest_rejects_bad_input_with_transfer_error_only(manifest):
    try:
        checked = check_manifest(manifest)
    except (dp.TransferError, ValueError):
        return
    for rel, meta in checked["files"].items():
        assert safe_name(rel) and inside("/srv/cache/m", rel)
        assert set(meta) == {"size", "sha256"} and type(meta["size"]) is int and meta["size"] >= 0
        assert len(meta["sha256"]) == 64
    assert all(safe_name(r) for r in checked["expected"] or ())
    assert checked["is_file"] in (True, False, None)
    json.dumps(checked)  # plain data


@pytest.fixture(scope="module")
def served_tree(tmp_path_factory):
    """A copy directory with files, a symlink to a file outside it and one to a directory outside."""
    base = tmp_path_factory.mktemp("served")
    root = base / "copy"
    (root / "b").mkdir(parents=True)
    (root / "a").write_text("a")
    (root / "b" / "c").write_text("c")
    (base / "secret").write_text("secret")
    (base / "outside").mkdir()
    (base / "outside" / "c").write_text("secret too")
    (root / "link").symlink_to(base / "secret")
    (root / "dirlink").symlink_to(base / "outside", target_is_directory=True)
    return str(root)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.one_of(PATHS, JSON))
def test_server_resolves_only_inside_the_copy(served_tree, path):
    """Whatever path a caller sends, even one the manifest lists, nothing outside the copy is served."""
    key = path if isinstance(path, str) else "a"
    manifest = {"files": {key: {"size": 1, "sha256": "0" * 64}, "a": {"size": 1, "sha256": "0" * 64}}}
    try:
        full, _ = resolve_file(served_tree, manifest, path)
    except LookupError:
        return
    root = os.path.realpath(served_tree)
    assert full.startswith(root + os.sep) and os.path.isfile(full)
    assert os.path.realpath(full) == full
