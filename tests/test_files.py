"""Fault injection on the file copy: nothing partial is ever trusted."""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import ClassVar

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import dask_pervasive as dp
from dask_pervasive._settings import TransferSettings
from dask_pervasive.transfer import MANIFEST, PART, fetch_source, remove_stale_parts


def settings(chunk_size: int, **kwargs) -> TransferSettings:
    return TransferSettings(chunk_size=chunk_size, **kwargs)


class Exploding(io.BytesIO):
    """A source stream that dies after ``limit`` bytes (a killed origin)."""

    def __init__(self, data, limit):
        super().__init__(data)
        self.limit = limit

    def read(self, n=-1):
        if self.tell() >= self.limit:
            raise ConnectionResetError("origin went away")
        return super().read(min(n, self.limit - self.tell()) if n > 0 else self.limit - self.tell())


class ExplodingFileSystem(MemoryFileSystem):
    """``exploding://``: in-memory files whose reads die after :attr:`limit` bytes."""

    protocol = ("exploding",)
    store: ClassVar[dict] = {}
    pseudo_dirs: ClassVar[list] = [""]
    limit: ClassVar[int | None] = None

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol("memory://" + path.removeprefix("exploding://"))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        return f if self.limit is None else Exploding(f.getvalue(), self.limit)


fsspec.register_implementation("exploding", ExplodingFileSystem, clobber=True)


@pytest.fixture
def exploding():
    ExplodingFileSystem.store.clear()
    yield ExplodingFileSystem()
    ExplodingFileSystem.store.clear()
    ExplodingFileSystem.limit = None


def test_interrupted_copy_leaves_nothing(tmp_path, exploding):
    exploding.pipe("/m/out.bin", b"x" * 1000)
    ExplodingFileSystem.limit = 300
    dest = tmp_path / "c"
    with pytest.raises(dp.TransferError, match="origin went away"):
        fetch_source("exploding://m", {}, str(dest), settings(100, retries=0))
    assert [p for p in dest.rglob("*") if not p.is_dir()] == []


def test_copy_reports_size_and_hash(tmp_path, exploding):
    data = os.urandom(5000)
    exploding.pipe("/m/a/b.bin", data)
    result = fetch_source("exploding://m", {}, str(tmp_path / "c"), settings(1024))
    assert result.manifest["files"]["a/b.bin"] == {"size": 5000, "sha256": hashlib.sha256(data).hexdigest()}
    assert result.bytes_fetched == 5000
    assert (tmp_path / "c" / "a" / "b.bin").read_bytes() == data


def _origin(tmp_path):
    src = tmp_path / "origin"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(3000))
    (src / "b.txt").write_text("config")
    return src


def test_copy_without_manifest_is_refetched(tmp_path):
    """A worker killed mid-fetch leaves files but no manifest: they are not trusted."""
    src = _origin(tmp_path)
    dest = tmp_path / "cache"
    dest.mkdir()
    (dest / "a.bin").write_bytes(b"half")  # what a killed copy could leave
    result = fetch_source(f"file://{src}", {}, str(dest), settings(1024))
    assert not result.cached and result.bytes_fetched == 3006
    assert (dest / "a.bin").read_bytes() == (src / "a.bin").read_bytes()


def test_complete_copy_reused(tmp_path):
    src = _origin(tmp_path)
    dest = str(tmp_path / "cache")
    fetch_source(f"file://{src}", {}, dest, settings(1024))
    again = fetch_source(f"file://{src}", {}, dest, settings(1024))
    assert again.cached and again.bytes_fetched == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_cached_copy_is_refetched(tmp_path, damage):
    src = _origin(tmp_path)
    dest = tmp_path / "cache"
    fetch_source(f"file://{src}", {}, str(dest), settings(1024))
    target = dest / "a.bin"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[0] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    again = fetch_source(f"file://{src}", {}, str(dest), settings(1024, verify=True))
    assert not again.cached
    assert target.read_bytes() == (src / "a.bin").read_bytes()
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["files"]["a.bin"]["size"] == 3000


def test_empty_directory_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        fetch_source(f"file://{tmp_path}/empty", {}, str(tmp_path / "cache"), settings(1024))


def test_memory_filesystem_source(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/models/m/weights.bin", b"w" * 100)
    fs.pipe("/models/m/cfg/config.json", b"{}")
    result = fetch_source("memory://models/m", {}, str(tmp_path / "c"), settings(16))
    assert result.bytes_fetched == 102
    assert (tmp_path / "c" / "cfg" / "config.json").read_bytes() == b"{}"


@pytest.mark.parametrize("inner", ["", "model"])
def test_zip_archive_source(tmp_path, inner):
    """A chained ``zip://<inner>::file://<archive>`` URL: the archive itself is the origin."""
    import zipfile

    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model/weights.bin", b"w" * 5000)
        zf.writestr("model/cfg/config.json", b"{}")
    result = fetch_source(f"zip://{inner}::file://{archive}", {}, str(tmp_path / "c"), settings(1024))
    prefix = "" if inner else "model/"
    assert sorted(result.manifest["files"]) == [f"{prefix}cfg/config.json", f"{prefix}weights.bin"]
    assert result.bytes_fetched == 5002
    assert (tmp_path / "c" / f"{prefix}weights.bin").read_bytes() == b"w" * 5000


def test_stale_parts_removed(tmp_path):
    old = tmp_path / f"{PART}abc.w.bin"
    old.write_bytes(b"x")
    os.utime(old, (0, 0))
    fresh = tmp_path / f"{PART}def.v.bin"
    fresh.write_bytes(b"x")
    assert remove_stale_parts(str(tmp_path)) == 1
    assert not old.exists() and fresh.exists()
