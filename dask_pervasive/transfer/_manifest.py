"""The manifest: which files a context copy holds, and the one validator of its paths.

A copy in a cache directory is complete when its manifest, written last and
atomically, is there and its files match it. The format, on disk and on the
wire (``pervasive_manifest``)::

    {"source": "<origin url>",              # on disk only
     "is_file": false,                      # a single-file context: load() gets the file
     "files": {"<relpath>": {"size": <bytes>, "sha256": "<64 hex digits>"}},
     "origin": {"<relpath>": {"size": ..., "mtime" | "ETag" | ...: ...}}}  # what the origin said
                                            # identifies each version (optional; to tell it changed)
     "blocks": {"<relpath>": ["<sha256 of each BLOCK_SIZE block>", ...]}}  # optional; ranged reads

A worker still copying serves a *partial* manifest: ``"partial": true``,
``"files"`` its verified files so far, ``"expected"`` every file name once
known (else ``None``), ``"is_file"`` maybe ``None``, ``"received"`` the bytes
received so far. Every manifest read from disk or from a peer goes through
:func:`check_manifest`, and every path a caller asks for through
:func:`path_problem`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import TransferError
from ._parts import BLOCK_SIZE, RESERVED, atomic_write_bytes

if TYPE_CHECKING:
    from .._settings import TransferSettings

logger = logging.getLogger(__name__)

#: File name of the manifest in a copy's directory.
MANIFEST = ".pervasive-manifest.json"
#: Where the manifest of a copy that failed verification is kept: no longer a complete copy (not
#: loaded, not served), still the reference its re-fetch from the origin must match.
REFERENCE = ".pervasive-reference.json"
_HEX = frozenset("0123456789abcdef")


class Corrupt(TransferError):
    """A source sent a manifest or bytes that do not check out."""


def is_count(value: Any) -> bool:
    """Whether ``value`` is an int ≥ 0 (not a bool): a size, an offset."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# -- paths ------------------------------------------------------------------------------------
def path_problem(rel: Any) -> str | None:
    """Why ``rel`` is not a plain relative POSIX path inside its root, or ``None`` if it is.

    Plain: a non-empty ``str`` without NUL or ``\\``, not absolute, without
    empty, ``.`` or ``..`` segments (so it is its own normal form).
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        return "malformed path"
    if rel.startswith("/") or os.path.isabs(rel):
        return "absolute path"
    if any(p in ("", ".", "..") for p in rel.split("/")):
        return "path traversal"
    return None


def reserved(rel: str) -> bool:
    """Whether a segment of ``rel`` uses the prefix reserved for the manifest and temporary files."""
    return any(p.startswith(RESERVED) for p in rel.split("/"))


def safe_name(rel: Any) -> bool:
    """Whether a manifest may list ``rel``: a plain relative path, no segment with the reserved prefix
    (the manifest's own name, temporary files)."""
    return path_problem(rel) is None and not reserved(rel)


def safe_relpath(rel: str) -> str:
    """``rel`` (a name an origin lists) normalized to a plain relative path that stays inside its root.

    ``\\`` counts as a separator, leading ``/`` are dropped; ``..`` that
    would climb out of the root, NUL bytes and empty paths raise ``ValueError``,
    and so do names with the prefix reserved for dask_pervasive's own files
    (``.pervasive-``: the manifest, temporary files), which would collide with them.
    """
    if isinstance(rel, str) and "\x00" not in rel:
        normal = posixpath.normpath(rel.replace("\\", "/")).lstrip("/")
        if path_problem(normal) is None:
            if reserved(normal):
                raise ValueError(
                    f"refusing {rel!r}: names starting with {RESERVED!r} are reserved for dask_pervasive's "
                    "manifest and temporary files"
                )
            return normal
    raise ValueError(f"refusing unsafe relative path {rel!r}")


def resolve_file(dest: str, manifest: Mapping, path: Any) -> tuple[str, dict]:
    """Absolute path and entry of the file ``path`` of ``manifest`` in the copy ``dest``.

    Raises ``LookupError(why)`` for a path that is not plain, not listed,
    missing, or that resolves (through symlinks) outside ``dest``.
    """
    why = path_problem(path)
    if why is not None:
        raise LookupError(why)
    meta = manifest["files"].get(path)
    if meta is None:
        raise LookupError("not a file of this context")
    root = os.path.realpath(dest)
    full = os.path.realpath(os.path.join(root, *path.split("/")))
    if not full.startswith(root + os.sep):
        raise LookupError("resolves outside the context's cache directory")
    if not os.path.isfile(full):
        raise LookupError("missing from the copy")
    return full, meta


# -- manifests --------------------------------------------------------------------------------
def check_manifest(manifest: Any) -> dict:
    """A manifest (from disk or a peer), validated: paths safe, sizes and hashes well-formed.

    Returns ``{"is_file", "files", "partial", "expected", "received", "blocks"}``
    with ``files`` reduced to ``{relpath: {"size", "sha256"}}`` and ``blocks``
    to the well-formed block lists of listed files (``{relpath: [sha256, ...]}``,
    one per :data:`~._parts.BLOCK_SIZE` block).

    Raises
    ------
    Corrupt
        Anything malformed: the source is not to be trusted.
    """
    if not isinstance(manifest, Mapping) or not isinstance(manifest.get("files"), Mapping):
        raise Corrupt("malformed manifest")
    partial = bool(manifest.get("partial"))
    if not partial and not manifest["files"]:
        raise Corrupt("empty manifest")
    files = {}
    for rel, meta in manifest["files"].items():
        if not safe_name(rel) or not isinstance(meta, Mapping):
            raise Corrupt(f"unsafe or malformed manifest entry {rel!r}")
        size, sha = meta.get("size"), meta.get("sha256")
        if not is_count(size) or not isinstance(sha, str) or len(sha) != 64 or not _HEX.issuperset(sha):
            raise Corrupt(f"malformed manifest entry {rel!r}")
        files[rel] = {"size": size, "sha256": sha}
    expected = manifest.get("expected") if partial else None
    if expected is not None and (not isinstance(expected, (list, tuple)) or not all(map(safe_name, expected))):
        raise Corrupt("malformed list of files")
    is_file = manifest.get("is_file")
    received = manifest.get("received")
    if is_file is not None and not isinstance(is_file, bool):
        raise Corrupt("malformed manifest: is_file is not a bool")
    if not partial and is_file and len(files) != 1:
        raise Corrupt("malformed manifest: a single-file context with several files")
    blocks = {}
    raw_blocks = manifest.get("blocks")
    if raw_blocks is not None and not isinstance(raw_blocks, Mapping):
        raise Corrupt("malformed manifest: blocks is not a mapping")
    for rel, digests in (raw_blocks or {}).items():
        if rel not in files:
            raise Corrupt(f"block digests of {rel!r}, which the manifest does not list")
        n = -(-files[rel]["size"] // BLOCK_SIZE)
        if not isinstance(digests, (list, tuple)) or len(digests) != n or not all(map(_is_sha256, digests)):
            raise Corrupt(f"malformed block digests of {rel!r}")
        blocks[rel] = list(digests)
    return {
        "is_file": None if partial and is_file is None else bool(is_file),
        "files": files,
        "partial": partial,
        "expected": list(expected) if expected is not None else None,
        "received": received if is_count(received) else 0,
        "blocks": blocks,
    }


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and _HEX.issuperset(value)


def all_blocks(dest: str, files: Mapping, known: Mapping[str, list]) -> dict[str, list]:
    """Block digests of every file of ``files`` in the copy ``dest``: ``known`` (computed while the
    bytes were received and verified), the others hashed from disk (files kept from an earlier copy)."""
    return {
        rel: list(known[rel]) if rel in known else file_blocks(os.path.join(dest, *rel.split("/"))) for rel in files
    }


def file_blocks(path: str) -> list[str]:
    """sha256 of each :data:`~._parts.BLOCK_SIZE` block of the file ``path``."""
    out = []
    with open(path, "rb") as f:
        while block := f.read(BLOCK_SIZE):
            out.append(hashlib.sha256(block).hexdigest())
    return out


def manifest_digest(manifest: Mapping) -> str:
    """sha256 of what a manifest promises (files, sizes, hashes, file-or-directory)."""
    body = {"is_file": bool(manifest.get("is_file")), "files": manifest["files"]}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(dest: str, name: str = MANIFEST) -> dict | None:
    """The manifest of a complete copy in ``dest`` (validated, ``files`` normalized), or ``None``."""
    try:
        with open(os.path.join(dest, name)) as f:
            manifest = json.load(f)
        checked = check_manifest(manifest)
    except (OSError, ValueError, TransferError):
        return None
    if checked["partial"]:
        return None
    return {**manifest, "is_file": checked["is_file"], "files": checked["files"], "blocks": checked["blocks"]}


def read_reference(dest: str) -> dict | None:
    """What an earlier copy in ``dest`` held: its manifest, else that of a copy that failed
    verification (:func:`cached_copy` keeps it), else ``None``."""
    return read_manifest(dest) or read_manifest(dest, REFERENCE)


def write_manifest(dest: str, manifest: dict) -> None:
    """Mark the copy in ``dest`` complete (written last, atomically); a kept reference is gone."""
    atomic_write_bytes(os.path.join(dest, MANIFEST), json.dumps(manifest, indent=1).encode())
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(dest, REFERENCE))


def local_path(dest: str, manifest: Mapping) -> str:
    """The path handed to ``load``: the directory, or the single file in it."""
    if manifest.get("is_file"):
        (rel,) = manifest["files"]
        return os.path.join(dest, *rel.split("/"))
    return dest


# -- files against their entries --------------------------------------------------------------
def sha256_file(path: str, chunk_size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def matches(path: str, meta: Mapping, chunk_size: int, check_hash: bool = True) -> bool:
    """Whether ``path`` holds exactly the bytes ``meta`` (size, and with ``check_hash`` sha256) describes."""
    try:
        if os.path.getsize(path) != meta["size"]:
            return False
    except OSError:
        return False
    return not check_hash or sha256_file(path, chunk_size) == meta["sha256"]


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


def cached_copy(source: str | None, dest: str, settings: TransferSettings) -> FetchResult | None:
    """A complete earlier copy in ``dest``, or ``None``.

    Complete means: manifest present and every listed file there with the
    right size (and with ``settings.verify``, the right sha256). A copy that
    fails the check loses its manifest, so it is neither loaded nor served
    to peers until it has been fetched again; the manifest is kept as
    :data:`REFERENCE` (:func:`read_reference`), which the re-fetch must match.
    """
    start = time.perf_counter()
    manifest = read_manifest(dest)
    if manifest is None:
        return None
    if all(
        matches(os.path.join(dest, *rel.split("/")), meta, settings.chunk_size, settings.verify)
        for rel, meta in manifest["files"].items()
    ):
        return FetchResult(local_path(dest, manifest), manifest, 0, time.perf_counter() - start, cached=True)
    logger.warning("Cached copy of %s in %s failed verification; fetching again", source, dest)
    with contextlib.suppress(FileNotFoundError):
        os.replace(os.path.join(dest, MANIFEST), os.path.join(dest, REFERENCE))
    return None
