"""Copy a context's source into a worker's cache directory, safely.

Every file is streamed to a temporary name and renamed into place once
complete, and a manifest (relative path → size, sha256) is written last, also
atomically. A directory without a manifest is never trusted: a worker killed
mid-copy leaves at most temporary files and an incomplete tree that the next
fetch overwrites.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field

import fsspec
from fsspec.core import url_to_fs

logger = logging.getLogger(__name__)

MANIFEST = ".pervasive-manifest.json"
PART = ".part-"


@dataclass
class FetchResult:
    """Where the files of a context landed and what it cost."""

    path: str  #: what ``load`` receives: the local file or directory
    manifest: dict  #: ``{"files": {relpath: {"size", "sha256"}}, "is_file": bool}``
    bytes_fetched: int = 0  #: bytes copied from the source (0 when files were cached)
    seconds: float = 0.0
    cached: bool = False
    #: bytes copied per kind of source: ``{"origin": n, "peers": m}``
    sources: dict = field(default_factory=dict)


def safe_relpath(rel: str) -> str:
    rel = posixpath.normpath(rel.replace("\\", "/")).lstrip("/")
    if rel in ("", ".") or rel.startswith("../") or rel == ".." or "/../" in rel:
        raise ValueError(f"refusing unsafe relative path {rel!r}")
    return rel


def sha256_file(path: str, chunk_size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    tmp = f"{path}{PART}{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_stream(src, dest: str, chunk_size: int) -> tuple[int, str]:
    """Stream a readable file object into ``dest`` atomically.

    Returns the number of bytes written and their sha256.
    """
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    tmp = f"{dest}{PART}{uuid.uuid4().hex}"
    h = hashlib.sha256()
    n = 0
    try:
        with open(tmp, "wb") as out:
            while chunk := src.read(chunk_size):
                out.write(chunk)
                h.update(chunk)
                n += len(chunk)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return n, h.hexdigest()


def open_for_copy(fs: fsspec.AbstractFileSystem, path: str, chunk_size: int):
    """Open ``path`` to be read once, front to back, in ``chunk_size`` pieces.

    Without read-ahead caching: fsspec's default (``readahead``, 5 MiB blocks)
    re-requests overlapping ranges when reads are not block-aligned, which
    reads about one block per file twice from remote stores.
    """
    try:
        return fs.open(path, "rb", block_size=chunk_size, cache_type="none")
    except TypeError:  # a filesystem whose open() takes no caching options
        return fs.open(path, "rb")


def read_manifest(dest: str) -> dict | None:
    """The manifest of a complete copy in ``dest``, or ``None``."""
    try:
        with open(os.path.join(dest, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def verify_files(dest: str, manifest: dict, check_hash: bool, chunk_size: int) -> bool:
    """Whether every manifest entry exists in ``dest`` with the right size (and hash)."""
    for rel, meta in manifest["files"].items():
        p = os.path.join(dest, *rel.split("/"))
        try:
            if os.path.getsize(p) != meta["size"]:
                return False
        except OSError:
            return False
        if check_hash and sha256_file(p, chunk_size) != meta["sha256"]:
            return False
    return True


def local_path(dest: str, manifest: dict) -> str:
    """The path handed to ``load``: the directory, or the single file in it."""
    if manifest.get("is_file"):
        (rel,) = manifest["files"]
        return os.path.join(dest, *rel.split("/"))
    return dest


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def list_source(source: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str, dict[str, str], bool]:
    """Resolve ``source`` to ``(fs, root, {relpath: remote path}, is_file)``."""
    fs, root = url_to_fs(source, **storage_options)
    # fs.info, not fs.isdir: for http, isdir GETs the whole body. http's info
    # says "file" for everything (a directory is an HTML index page): there a
    # trailing slash marks a directory, listed from the links of its index.
    info = fs.info(root)
    web = any(p in ("http", "https") for p in _protocols(fs))
    if info["type"] == "directory" or source.endswith("/"):
        found = fs.find(root, detail=False)
        base = root.rstrip("/")
        files = {}
        for p in sorted(found):
            rel = p[len(base) :].lstrip("/") if p.startswith(base) else posixpath.basename(p)
            if web:
                rel = urllib.parse.unquote(rel.split("?")[0])
            files[safe_relpath(rel)] = p
        if not files:
            raise FileNotFoundError(f"source {source!r} is an empty directory")
        return fs, root, files, False
    name = posixpath.basename(root.rstrip("/")) or "data"
    return fs, root, {safe_relpath(name.split("?")[0] or "data"): root}, True


def cached_copy(source: str | None, dest: str, chunk_size: int, verify: bool = True) -> FetchResult | None:
    """A complete earlier copy in ``dest``, or ``None``.

    Complete means: manifest present and every listed file there with the
    right size (and with ``verify``, the right sha256). A copy that fails
    the check loses its manifest, so it is neither loaded nor served to
    peers until it has been fetched again.
    """
    start = time.perf_counter()
    manifest = read_manifest(dest)
    if manifest is None:
        return None
    if verify_files(dest, manifest, verify, chunk_size):
        return FetchResult(local_path(dest, manifest), manifest, 0, time.perf_counter() - start, cached=True)
    logger.warning("Cached copy of %s in %s failed verification; fetching again", source, dest)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(dest, MANIFEST))
    return None


def write_manifest(dest: str, manifest: dict) -> None:
    """Mark the copy in ``dest`` complete (written last, atomically)."""
    atomic_write_bytes(os.path.join(dest, MANIFEST), json.dumps(manifest, indent=1).encode())


def manifest_digest(manifest: dict) -> str:
    """sha256 of what a manifest promises (files, sizes, hashes, file-or-directory)."""
    body = {"is_file": bool(manifest.get("is_file")), "files": manifest["files"]}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fetch_source(
    source: str,
    storage_options: dict,
    dest: str,
    chunk_size: int,
    verify: bool = True,
) -> FetchResult:
    """Make ``dest`` a complete, verified local copy of ``source``.

    A complete earlier copy (manifest present, sizes — and with ``verify``
    hashes — matching) is reused without reading the source.
    """
    start = time.perf_counter()
    cached = cached_copy(source, dest, chunk_size, verify)
    if cached is not None:
        return cached

    fs, _, files, is_file = list_source(source, storage_options)
    os.makedirs(dest, exist_ok=True)
    entries = {}
    total = 0
    for rel, remote in files.items():
        with open_for_copy(fs, remote, chunk_size) as src:
            n, digest = copy_stream(src, os.path.join(dest, *rel.split("/")), chunk_size)
        entries[rel] = {"size": n, "sha256": digest}
        total += n
    manifest = {"source": source, "is_file": is_file, "files": entries}
    write_manifest(dest, manifest)
    return FetchResult(
        local_path(dest, manifest), manifest, total, time.perf_counter() - start, sources={"origin": total}
    )


def remove_stale_parts(root: str, older_than: float = 3600.0) -> int:
    """Delete temporary files left by killed copies; returns how many."""
    removed = 0
    cutoff = time.time() - older_than
    for dirpath, _, names in os.walk(root):
        for n in names:
            if PART in n:
                p = os.path.join(dirpath, n)
                try:
                    if os.path.getmtime(p) < cutoff:
                        os.unlink(p)
                        removed += 1
                except OSError:
                    pass
    return removed
