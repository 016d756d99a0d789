"""Data integrity: what real storage, real installs and concurrent users do to context copies.

Origins that ignore ``Range``, a disk that fills up mid-copy, two clients
registering one name at once, an origin updated in place under a persistent
cache, files named like temporary files, a damaged copy with peers off, and
``dask-peer://`` reads: every byte a loader or a caller gets is the bytes
that were verified, and a changed origin is an error, never two versions.
"""

from __future__ import annotations

import os

import fsspec
import pytest

import dask_pervasive as dp
from dask_pervasive._settings import TransferSettings
from dask_pervasive.transfer import cached_copy, fetch_source, remove_stale_parts


def settings(chunk_size: int, **kwargs) -> TransferSettings:
    return TransferSettings(chunk_size=chunk_size, **kwargs)


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
