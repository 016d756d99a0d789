"""Copy a context's source into a worker's cache directory, safely.

Every file is streamed to a temporary name and renamed into place once
complete, and a manifest (relative path → size, sha256) is written last, also
atomically. A directory without a manifest is never trusted: a worker killed
mid-copy leaves at most temporary files (removed by the next fetch into the
same directory) and an incomplete tree that the next fetch overwrites.

Reads from the origin are bounded: every blocking call (listing, open, each
chunk) must answer within ``pervasive.transfer.stall-timeout``; a failed,
stalled, truncated or corrupt read is retried ``pervasive.transfer.retries``
times with exponential backoff (``retry-backoff``, doubling up to
``retry-backoff-max``), resuming at the byte offset reached when the bytes so
far can be trusted; then the copy fails with a
:class:`~dask_pervasive.TransferError`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import posixpath
import queue
import random
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import dask.config
import fsspec
from dask.utils import parse_timedelta
from fsspec.core import url_to_fs

from .errors import TransferError

logger = logging.getLogger(__name__)

MANIFEST = ".pervasive-manifest.json"
PART = ".part-"
_HOST = socket.gethostname().replace("/", "_").replace(os.sep, "_")

T = TypeVar("T")


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
    """``rel`` normalized to a relative POSIX path that stays inside its root.

    ``\\`` counts as a separator, leading ``/`` are dropped; ``..`` that
    would climb out of the root, NUL bytes and empty paths raise ``ValueError``.
    """
    if not isinstance(rel, str) or "\x00" in rel:
        raise ValueError(f"refusing unsafe relative path {rel!r}")
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


# -- temporary files ----------------------------------------------------------------------
def part_name(final: str) -> str:
    """A temporary name next to ``final`` that says which process writes it.

    ``<final>.part-<host>.<pid>.<random>``: :func:`remove_stale_parts` removes
    the ones whose process is gone, without waiting for them to age.
    """
    return f"{final}{PART}{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}"


def _writer_gone(name: str) -> bool:
    """Whether the temporary file ``name`` was written by a process of this host that is dead."""
    tail = name.rpartition(PART)[2]
    try:
        host, pid, _ = tail.rsplit(".", 2)
        pid = int(pid)
    except ValueError:
        return False  # another naming scheme: only its age tells
    if host != _HOST or pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    tmp = part_name(path)
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
    tmp = part_name(dest)
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


class PartialFile:
    """A file being received: temporary name, bytes so far, running sha256.

    ``sources`` names where its bytes came from (``"origin"``, peer
    addresses), so a mismatch can be blamed.
    """

    def __init__(self, final: str) -> None:
        self.final = final
        self.tmp = part_name(final)
        os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit/discard
        self.hasher = hashlib.sha256()
        self.offset = 0
        self.sources: set[str] = set()

    def absorb(self, data: bytes) -> None:
        self.fh.write(data)
        self.hasher.update(data)
        self.offset += len(data)

    def reset(self) -> None:
        """Forget every byte received (start the file over)."""
        self.fh.seek(0)
        self.fh.truncate()
        self.hasher = hashlib.sha256()
        self.offset = 0
        self.sources.clear()

    def digest(self) -> dict:
        return {"size": self.offset, "sha256": self.hasher.hexdigest()}

    def commit(self, sha256: str | None) -> bool:
        """Rename into place if the content hashes to ``sha256`` (any, if ``None``)."""
        self.fh.close()
        if sha256 is not None and self.hasher.hexdigest() != sha256:
            self.discard()
            return False
        os.replace(self.tmp, self.final)
        return True

    def discard(self) -> None:
        self.fh.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def matches(path: str, meta: Mapping, chunk_size: int) -> bool:
    """Whether ``path`` already holds exactly the bytes ``meta`` (size, sha256) describes."""
    try:
        if os.path.getsize(path) != meta["size"]:
            return False
    except OSError:
        return False
    return sha256_file(path, chunk_size) == meta["sha256"]


# -- bounded origin reads -------------------------------------------------------------------
class OriginStalled(TransferError, TimeoutError):
    """An origin call (listing, open, read) did not answer within the stall timeout."""


class OriginMismatch(TransferError):
    """Bytes read from the origin do not match its listing or the reference manifest."""


@dataclass(frozen=True)
class RetryPolicy:
    """How origin reads are bounded and retried (``pervasive.transfer.*``).

    Attempt ``k`` (k ≥ 1) of a failed call waits ``min(backoff_max,
    backoff * 2**(k-1))`` seconds, times a random factor in [0.5, 1] so a
    cohort does not retry in lock step; at most ``retries`` retries.
    """

    retries: int = 3
    backoff: float = 1.0
    backoff_max: float = 30.0
    stall_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ValueError(f"pervasive.transfer.retries must be an int >= 0, got {self.retries!r}")
        for name in ("backoff", "backoff_max", "stall_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name.replace('_', '-')} must be a duration >= 0, got {value!r}")
        if self.stall_timeout <= 0:
            raise ValueError(f"stall-timeout must be > 0, got {self.stall_timeout!r}")

    @classmethod
    def from_config(cls, **overrides: Any) -> RetryPolicy:
        """The policy ``pervasive.transfer.*`` sets here; keyword arguments win."""
        cfg = dask.config.get("pervasive.transfer")
        values = {
            "retries": int(cfg.get("retries", 3)),
            "backoff": parse_timedelta(cfg.get("retry-backoff", "1s")),
            "backoff_max": parse_timedelta(cfg.get("retry-backoff-max", "30s")),
            "stall_timeout": parse_timedelta(cfg.get("stall-timeout", "30s")),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...)."""
        return min(self.backoff_max, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


#: Errors that say the request itself is wrong: retrying cannot help.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, TypeError, ValueError)


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` from an origin read may go away when the read is tried again."""
    if isinstance(exc, (OriginStalled, OriginMismatch)):
        return True
    if not isinstance(exc, Exception):
        return False
    if isinstance(exc, _PERMANENT):
        # fsspec's http says FileNotFoundError for any failed info(), a refused connection included
        cause = exc.__cause__
        return cause is not None and cause is not exc and transient(cause)
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError and friends
    # 4xx but timeouts and rate limits: the request is wrong, asking again will not help
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 425, 429))


def describe(exc: BaseException) -> str:
    """``Type: message``, with the direct cause when there is one (fsspec often wraps the real error)."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and cause is not exc:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text


def retrying(call: Callable[[int], T], policy: RetryPolicy, what: str) -> T:
    """``call(attempt)`` until it succeeds, at most ``policy.retries`` times again after a transient error.

    The last error is raised as a :class:`~dask_pervasive.TransferError`
    (chained); errors that retrying cannot fix (missing file, permission,
    bad request) are raised at once, unchanged.
    """
    attempt = 0
    while True:
        try:
            return call(attempt)
        except Exception as exc:
            if not transient(exc):
                raise
            if attempt >= policy.retries:
                raise TransferError(
                    f"{what} failed {attempt + 1} time(s) (pervasive.transfer.retries={policy.retries}); "
                    f"last error: {describe(exc)}"
                ) from exc
            attempt += 1
            wait = policy.delay(attempt)
            logger.warning(
                "pervasive: %s failed (%s); retry %d/%d in %.1fs",
                what,
                describe(exc),
                attempt,
                policy.retries,
                wait,
            )
            time.sleep(wait)


class StallGuard:
    """Run blocking calls on a helper thread; give up on one that takes longer than ``timeout``.

    A call that stalls raises :class:`OriginStalled` in the caller; the
    helper thread (a daemon) is abandoned and ends when the call finally
    returns. Calls submitted with :meth:`later` (a ``close``) run after it.
    Works for any fsspec file system, whatever its own timeouts.
    """

    def __init__(self, timeout: float, what: str) -> None:
        self.timeout = timeout
        self.what = what
        self.stalled = False
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="pervasive-origin-read", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)

    def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        if self.stalled:
            raise OriginStalled(f"{self.what}: an earlier call is still stalled")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            if future.done():
                raise  # the call itself timed out
            self.stalled = True
            raise OriginStalled(f"{self.what}: no answer for {self.timeout:g}s (pervasive.transfer.stall-timeout)")

    def later(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` when the helper is free, without waiting (errors ignored)."""
        self._jobs.put((concurrent.futures.Future(), fn, args))

    def close(self) -> None:
        self._jobs.put(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def origin_filesystem(
    source: str, storage_options: Mapping | None, stall_timeout: float | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``url_to_fs(source)``; for ``http(s)``, with connect and read timeouts of ``stall_timeout``.

    The :class:`StallGuard` bounds every call anyway; aiohttp's own timeouts
    also end the stalled request (and its thread) instead of leaving it
    blocked. Timeouts given in ``storage_options["client_kwargs"]`` win.
    """
    options = dict(storage_options or {})
    protocol = source.split("://", 1)[0].split("::")[-1].lower() if "://" in source else "file"
    if stall_timeout and protocol in ("http", "https"):
        client_kwargs = dict(options.get("client_kwargs") or {})
        if "timeout" not in client_kwargs:
            try:
                import aiohttp
            except ImportError:  # pragma: no cover - fsspec's http needs it anyway
                pass
            else:
                client_kwargs["timeout"] = aiohttp.ClientTimeout(
                    total=None, sock_connect=stall_timeout, sock_read=stall_timeout
                )
                options["client_kwargs"] = client_kwargs
    return url_to_fs(source, **options)


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


def read_origin_file(
    fs: fsspec.AbstractFileSystem,
    remote: str,
    partial: PartialFile,
    chunk_size: int,
    policy: RetryPolicy,
    *,
    size: int | None = None,
    expected: Mapping | None = None,
    on_bytes: Callable[[int], None] | None = None,
    what: str | None = None,
) -> dict:
    """Append ``remote`` (from ``partial.offset`` on) to ``partial``, bounded and retried.

    Every call on the origin answers within ``policy.stall_timeout`` or
    counts as a failure. After a failed read the copy resumes at the offset
    reached; a result whose size differs from ``size`` (the listing's, else
    what the open file reports) or whose size and sha256 differ from
    ``expected`` (a reference manifest) is read again from the start. Bytes
    that came from elsewhere (a peer) and do not match are dropped without
    counting as an attempt. Returns ``{"size", "sha256"}`` of what is in
    ``partial``. ``on_bytes(n)`` is called for every chunk read.
    """
    what = what or f"reading {remote} from the origin"

    def attempt(_: int) -> dict:
        with StallGuard(policy.stall_timeout, what) as guard:
            src = guard(open_for_copy, fs, remote, chunk_size)
            try:
                listed = size if size is not None else getattr(src, "size", None)
                listed = listed if isinstance(listed, int) and listed >= 0 else None
                if partial.offset:
                    try:
                        guard(src.seek, partial.offset)
                    except (ValueError, OSError, NotImplementedError):  # cannot seek (streaming): start over
                        partial.reset()
                partial.sources.add("origin")
                while chunk := guard(src.read, chunk_size):
                    partial.absorb(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                    if listed is not None and partial.offset > listed:
                        break
            finally:
                guard.later(src.close)
        got = partial.digest()
        problem = None
        if listed is not None and got["size"] != listed:
            problem = f"got {got['size']} bytes of {remote}, the origin lists {listed} (truncated?)"
        elif expected is not None and (got["size"], got["sha256"]) != (expected["size"], expected["sha256"]):
            problem = (
                f"{remote} ({got['size']} bytes, sha256 {got['sha256'][:12]}…) does not match the manifest "
                f"({expected['size']} bytes, sha256 {expected['sha256'][:12]}…): corrupt read, or the origin changed"
            )
        if problem is None:
            return got
        foreign = partial.sources - {"origin"}
        partial.reset()
        if foreign:  # bytes from another source were the bad ones: not the origin's fault
            logger.warning("pervasive: %s; dropping bytes received from %s", problem, sorted(foreign))
            return attempt(0)
        raise OriginMismatch(problem)

    return retrying(attempt, policy, what)


# -- listing, verifying, fetching ----------------------------------------------------------
def read_manifest(dest: str) -> dict | None:
    """The manifest of a complete copy in ``dest``, or ``None``."""
    try:
        with open(os.path.join(dest, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def verify_files(dest: str, manifest: dict, check_hash: bool, chunk_size: int) -> bool:
    """Whether every manifest entry exists in ``dest`` with the right size (and hash)."""
    try:
        for rel, meta in manifest["files"].items():
            p = os.path.join(dest, *safe_relpath(rel).split("/"))
            try:
                if os.path.getsize(p) != meta["size"]:
                    return False
            except OSError:
                return False
            if check_hash and sha256_file(p, chunk_size) != meta["sha256"]:
                return False
    except (KeyError, TypeError, ValueError, AttributeError):  # a damaged manifest
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


@dataclass
class SourceListing:
    """What an origin holds: ``files`` maps relative path → remote path."""

    fs: fsspec.AbstractFileSystem
    root: str
    files: dict[str, str]
    is_file: bool
    #: relative path → size the origin lists (``None`` where it does not say, e.g. http listings)
    sizes: dict[str, int | None] = field(default_factory=dict)


def _size(info: Any) -> int | None:
    size = info.get("size") if isinstance(info, Mapping) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


def list_source(
    source: str,
    storage_options: Mapping | None,
    policy: RetryPolicy | None = None,
) -> SourceListing:
    """Resolve ``source`` to its files; with ``policy``, every call bounded and retried."""

    def attempt(_: int) -> SourceListing:
        stall = policy.stall_timeout if policy is not None else None
        fs, root = origin_filesystem(source, storage_options, stall)
        if policy is None:
            return _list(fs, root, source, lambda fn, *args: fn(*args))
        with StallGuard(policy.stall_timeout, f"listing {source}") as guard:
            return _list(fs, root, source, guard)

    if policy is None:
        return attempt(0)
    return retrying(attempt, policy, f"listing the origin {source}")


def _list(fs: fsspec.AbstractFileSystem, root: str, source: str, call: Callable) -> SourceListing:
    # fs.info, not fs.isdir: for http, isdir GETs the whole body. http's info
    # says "file" for everything (a directory is an HTML index page): there a
    # trailing slash marks a directory, listed from the links of its index.
    info = call(fs.info, root)
    web = any(p in ("http", "https") for p in _protocols(fs))
    if info["type"] == "directory" or source.endswith("/"):
        found = call(lambda: fs.find(root, detail=True))
        base = root.rstrip("/")
        files: dict[str, str] = {}
        sizes: dict[str, int | None] = {}
        for p in sorted(found):
            rel = p[len(base) :].lstrip("/") if p.startswith(base) else posixpath.basename(p)
            if web:
                rel = urllib.parse.unquote(rel.split("?")[0])
            rel = safe_relpath(rel)
            files[rel] = p
            sizes[rel] = _size(found[p])
        if not files:
            raise FileNotFoundError(f"source {source!r} is an empty directory")
        return SourceListing(fs, root, files, False, sizes)
    name = safe_relpath(posixpath.basename(root.rstrip("/")).split("?")[0] or "data")
    return SourceListing(fs, root, {name: root}, True, {name: _size(info)})


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


def _reference_entries(manifest: dict | None) -> dict[str, dict] | None:
    """``{relpath: {"size", "sha256"}}`` of a manifest found on disk, if well-formed."""
    if manifest is None:
        return None
    out = {}
    try:
        for rel, meta in manifest["files"].items():
            size, sha = meta["size"], meta["sha256"]
            if not isinstance(size, int) or not isinstance(sha, str):
                return None
            out[safe_relpath(rel)] = {"size": size, "sha256": sha}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return out


def fetch_source(
    source: str,
    storage_options: dict,
    dest: str,
    chunk_size: int,
    verify: bool = True,
    policy: RetryPolicy | None = None,
) -> FetchResult:
    """Make ``dest`` a complete, verified local copy of ``source``.

    A complete earlier copy (manifest present, sizes — and with ``verify``
    hashes — matching) is reused without reading the source. When an earlier
    copy was damaged, its manifest is the reference: files still matching
    it are kept, the others are read again and must match it (an origin
    that changed since is an error, not a silent update of one worker).
    Temporary files of dead processes in ``dest`` are removed first.
    Origin reads follow ``policy`` (default: ``pervasive.transfer.*``).
    """
    start = time.perf_counter()
    policy = policy if policy is not None else RetryPolicy.from_config()
    reference = _reference_entries(read_manifest(dest))
    cached = cached_copy(source, dest, chunk_size, verify)
    if cached is not None:
        return cached
    os.makedirs(dest, exist_ok=True)
    remove_stale_parts(dest)

    listing = list_source(source, storage_options, policy)
    if reference is not None and set(reference) != set(listing.files):
        raise TransferError(
            f"the origin {source} now lists other files than the copy made earlier in {dest}; if it was "
            "updated on purpose, give the context a new name (or clear the cache directory)"
        )
    entries = {}
    total = 0

    def count(n: int) -> None:
        nonlocal total
        total += n

    for rel, remote in listing.files.items():
        final = os.path.join(dest, *rel.split("/"))
        expected = reference.get(rel) if reference is not None else None
        if expected is not None and matches(final, expected, chunk_size):
            entries[rel] = expected  # intact part of a damaged copy
            continue
        partial = PartialFile(final)
        try:
            entries[rel] = read_origin_file(
                listing.fs,
                remote,
                partial,
                chunk_size,
                policy,
                size=listing.sizes.get(rel),
                expected=expected,
                on_bytes=count,
                what=f"reading {rel!r} of {source} from the origin",
            )
            partial.commit(None)
        finally:
            partial.discard()  # no-op after a commit
    manifest = {"source": source, "is_file": listing.is_file, "files": entries}
    write_manifest(dest, manifest)
    return FetchResult(
        local_path(dest, manifest), manifest, total, time.perf_counter() - start, sources={"origin": total}
    )


def remove_stale_parts(root: str, older_than: float = 3600.0) -> int:
    """Delete temporary files left by killed copies; returns how many.

    Removed: those of processes of this host that are gone (whatever their
    age) and any older than ``older_than`` seconds.
    """
    removed = 0
    cutoff = time.time() - older_than
    for dirpath, _, names in os.walk(root):
        for n in names:
            if PART in n:
                p = os.path.join(dirpath, n)
                try:
                    if _writer_gone(n) or os.path.getmtime(p) < cutoff:
                        os.unlink(p)
                        removed += 1
                except OSError:
                    pass
    return removed
