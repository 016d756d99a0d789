"""Reading a context's files from its origin (any fsspec URL): the one origin-copy driver.

:class:`OriginCopy` lists the origin and puts its files in place one by one,
each streamed into a temporary file, every call on the origin bounded and
retried (:mod:`._retry`), resumed at the byte offset reached after a failed
read, size-checked against the listing and, when a reference manifest is
known, checked against it. :func:`fetch_source` is the copy without peers
(``pervasive.transfer.peers: false``, no scheduler plugin, or a cache of its
own); the receiver (:mod:`._receiver`) uses the same driver when its source is
the origin.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.core import url_to_fs

from ..errors import TransferError
from ._manifest import (
    FetchResult,
    all_blocks,
    cached_copy,
    is_count,
    local_path,
    matches,
    read_reference,
    safe_relpath,
    write_manifest,
)
from ._parts import PartialFile, remove_stale_parts
from ._retry import OriginMismatch, RetryPolicy, StallGuard, retrying

if TYPE_CHECKING:
    from .._settings import TransferSettings

logger = logging.getLogger(__name__)


def origin_filesystem(
    source: str, storage_options: Mapping | None, stall_timeout: float | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``url_to_fs(source)``; for ``http(s)``, with connect and read timeouts of ``stall_timeout``.

    The :class:`~._retry.StallGuard` bounds every call anyway; aiohttp's own
    timeouts also end the stalled request (and its thread) instead of leaving
    it blocked. Timeouts given in ``storage_options["client_kwargs"]`` win.
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


def is_web(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is fsspec's ``http(s)`` file system."""
    return any(p in ("http", "https") for p in _protocols(fs))


def open_for_copy(fs: fsspec.AbstractFileSystem, path: str, chunk_size: int, offset: int = 0, size: int | None = None):
    """Open ``path`` to be read once, front to back, in ``chunk_size`` pieces, from ``offset`` on.

    Over ``http(s)``, a read from the start is one streaming ``GET``
    without ``Range`` (any server serves it, and in one request); a read
    from ``offset`` > 0 asks byte ranges, which the caller seeks to and
    must be ready to see refused (``ValueError``). Elsewhere without
    read-ahead caching: fsspec's default (``readahead``, 5 MiB blocks)
    re-requests overlapping ranges when reads are not block-aligned, which
    reads about one block per file twice from remote stores.
    """
    if is_web(fs):
        sized = {"size": size} if size is not None else {}
        if offset == 0:
            return fs.open(path, "rb", block_size=0, **sized)
        return fs.open(path, "rb", block_size=chunk_size, cache_type="none", **sized)
    try:
        return fs.open(path, "rb", block_size=chunk_size, cache_type="none")
    except TypeError:  # a filesystem whose open() takes no caching options
        return fs.open(path, "rb")


# -- listing ------------------------------------------------------------------------------------
@dataclass
class SourceListing:
    """What an origin holds: ``files`` maps relative path → remote path."""

    fs: fsspec.AbstractFileSystem
    root: str
    files: dict[str, str]
    is_file: bool
    #: relative path → size the origin lists (``None`` where it does not say, e.g. http listings)
    sizes: dict[str, int | None] = field(default_factory=dict)
    #: relative path → what the origin says identifies the file's version (size, mtime, ETag, ...)
    stamps: dict[str, dict] = field(default_factory=dict)
    #: whether the origin serves byte ranges (resumes at an offset): ``None`` until a resume tells
    #: (or an http ``Accept-Ranges: none`` says no)
    ranges: bool | None = None


def _size(info: Any) -> int | None:
    size = info.get("size") if isinstance(info, Mapping) else None
    return size if is_count(size) else None


#: Fields of fsspec ``info()`` that change when a file is replaced (local, http, s3, gcs, azure, ...).
_VERSION_FIELDS = (
    "mtime",
    "ETag",
    "etag",
    "LastModified",
    "Last-Modified",
    "last_modified",
    "updated",
    "md5Hash",
    "generation",
    "VersionId",
    "version_id",
)


def _stamp(info: Any) -> dict:
    """What ``info`` says about the version of a file: its size and change markers (JSON-safe)."""
    if not isinstance(info, Mapping):
        return {}
    out: dict[str, Any] = {}
    if (size := _size(info)) is not None:
        out["size"] = size
    for key in _VERSION_FIELDS:
        value = info.get(key)
        if value is not None:
            out[key] = value if isinstance(value, (str, int, float)) and not isinstance(value, bool) else str(value)
    return out


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def list_source(source: str, storage_options: Mapping | None, policy: RetryPolicy) -> SourceListing:
    """Resolve ``source`` to its files, every call bounded and retried by ``policy``."""

    def attempt(_: int) -> SourceListing:
        fs, root = origin_filesystem(source, storage_options, policy.stall_timeout)
        with StallGuard(policy.stall_timeout, f"listing {source}") as guard:
            return _list(fs, root, source, guard)

    return retrying(attempt, policy, f"listing the origin {source}")


def _list(fs: fsspec.AbstractFileSystem, root: str, source: str, call: Callable) -> SourceListing:
    # fs.info, not fs.isdir: for http, isdir GETs the whole body. http's info
    # says "file" for everything (a directory is an HTML index page): there a
    # trailing slash marks a directory, listed from the links of its index.
    info = call(fs.info, root)
    web = is_web(fs)
    if info["type"] == "directory" or source.endswith("/"):
        found = call(lambda: fs.find(root, detail=True))
        base = root.rstrip("/")
        files: dict[str, str] = {}
        sizes: dict[str, int | None] = {}
        stamps: dict[str, dict] = {}
        for p in sorted(found):
            rel = p[len(base) :].lstrip("/") if p.startswith(base) else posixpath.basename(p)
            if web:
                rel = urllib.parse.unquote(rel.split("?")[0])
            rel = safe_relpath(rel)
            files[rel] = p
            sizes[rel] = _size(found[p])
            stamps[rel] = _stamp(found[p])
        if not files:
            raise FileNotFoundError(f"source {source!r} is an empty directory")
        return SourceListing(fs, root, files, False, sizes, stamps)
    name = safe_relpath(posixpath.basename(root.rstrip("/")).split("?")[0] or "data")
    return SourceListing(fs, root, {name: root}, True, {name: _size(info)}, {name: _stamp(info)})


# -- copying --------------------------------------------------------------------------------------
class OriginCopy:
    """Files of the origin ``source`` put in place in ``dest``: listed, then one by one.

    Parameters
    ----------
    source, storage_options
        The origin (an fsspec URL and its options).
    dest
        The copy's directory.
    settings
        Chunk size, retries, backoff and stall timeout.
    what
        What is copied, for messages (``"context 'llm'"``).
    on_bytes
        Called with the size of every chunk read (from a thread).
    """

    def __init__(
        self,
        source: str,
        storage_options: Mapping | None,
        dest: str,
        settings: TransferSettings,
        *,
        what: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.source = source
        self.storage_options = dict(storage_options or {})
        self.dest = dest
        self.chunk_size = settings.chunk_size
        self.policy = RetryPolicy.from_settings(settings)
        self.what = what
        self.on_bytes = on_bytes
        self.bytes = 0  #: bytes read from the origin so far
        self.listing: SourceListing | None = None
        #: relative path → block digests of the files this copy wrote (computed as they arrived)
        self.blocks: dict[str, list[str]] = {}

    def list(self) -> SourceListing:
        """List the origin (bounded, retried)."""
        self.listing = list_source(self.source, self.storage_options, self.policy)
        return self.listing

    def fetch(self, rel: str, expected: Mapping | None = None, partial: PartialFile | None = None) -> dict:
        """Put file ``rel`` of the listing in place; returns its ``{"size", "sha256"}``.

        A file already matching ``expected`` (a reference manifest's entry)
        is kept. Otherwise it is read into ``partial`` (resuming at its
        offset: bytes received from a peer) or a new temporary file,
        checked against the listed size and ``expected``, and renamed into
        place; the temporary file is gone either way.
        """
        assert self.listing is not None, "list() first"
        if partial is None:
            final = os.path.join(self.dest, *rel.split("/"))
            if expected is not None and matches(final, expected, self.chunk_size):
                return dict(expected)  # intact part of a damaged or interrupted copy
            partial = PartialFile(final)
        of = f" of {self.what}" if self.what else ""
        try:
            got = self._read(rel, partial, expected, f"reading {rel!r}{of} from the origin {self.source}")
            partial.commit(None)
            self.blocks[rel] = partial.block_digests()
        finally:
            partial.discard()  # no-op after a commit
        return got

    def _size(self, guard: Callable, rel: str) -> int | None:
        """The size of ``rel`` the origin states; over http, asked once (``HEAD``) where the listing
        does not say, which also tells the file's version (``ETag``, ``Last-Modified``) and whether
        the server refuses ranges (``Accept-Ranges: none``)."""
        listing = self.listing
        size = listing.sizes.get(rel)
        if size is None and is_web(listing.fs):
            info = guard(listing.fs.info, listing.files[rel])
            size = listing.sizes[rel] = _size(info)
            listing.stamps[rel] = _stamp(info)
            if info.get("partial") is False:
                listing.ranges = False
        return size

    def stamp(self, rel: str) -> dict:
        """What the origin says identifies the version of ``rel`` (bounded, retried)."""
        assert self.listing is not None, "list() first"

        def attempt(_: int) -> dict:
            with StallGuard(self.policy.stall_timeout, f"asking the origin {self.source} about {rel!r}") as guard:
                self._size(guard, rel)
            return dict(self.listing.stamps.get(rel, {}))

        return retrying(attempt, self.policy, f"asking the origin {self.source} about {rel!r}")

    def stamps(self) -> dict[str, dict]:
        """:meth:`stamp` of every file listed."""
        return {rel: self.stamp(rel) for rel in self.listing.files}

    def _open_at(self, guard: StallGuard, remote: str, partial: PartialFile, size: int | None) -> tuple[Any, Any]:
        """``remote`` opened at ``partial.offset``, and the first chunk when one was read to find out.

        Resumed at the offset only where the origin serves ranges: detected
        by trying (a server that ignores ``Range`` answers with the whole
        file, which fsspec refuses with ``ValueError``), remembered for the
        other files; otherwise ``partial`` starts over and the file is read
        from the start.
        """
        listing = self.listing
        if partial.offset and listing.ranges is not False:
            src = guard(open_for_copy, listing.fs, remote, self.chunk_size, partial.offset, size)
            try:
                guard(src.seek, partial.offset)
                first = guard(src.read, self.chunk_size)
            except (ValueError, NotImplementedError) as exc:  # no ranges (or a stream that cannot seek)
                guard.later(src.close)
                listing.ranges = False
                logger.info(
                    "pervasive: the origin %s cannot resume %s at byte %d (%s); reading it from the start",
                    self.source,
                    remote,
                    partial.offset,
                    exc,
                )
            except BaseException:
                guard.later(src.close)
                raise
            else:
                listing.ranges = True
                return src, first
        if partial.offset:
            partial.reset()
        return guard(open_for_copy, listing.fs, remote, self.chunk_size, 0, size), None

    def _count(self, n: int) -> None:
        self.bytes += n
        if self.on_bytes is not None:
            self.on_bytes(n)

    def _read(self, rel: str, partial: PartialFile, expected: Mapping | None, what: str) -> dict:
        """Append ``rel`` (from ``partial.offset`` on) to ``partial``, bounded and retried.

        After a failed read the copy resumes at the offset reached; a result
        whose size differs from the listed one (else what the open file
        reports) or whose size and sha256 differ from ``expected`` is read
        again from the start. Bytes that came from elsewhere (a peer) and do
        not match are dropped without counting as an attempt.
        """
        listing = self.listing
        remote = listing.files[rel]

        def attempt(_: int) -> dict:
            with StallGuard(self.policy.stall_timeout, what) as guard:
                size = self._size(guard, rel)
                src, first = self._open_at(guard, remote, partial, size)
                try:
                    listed = size if size is not None else getattr(src, "size", None)
                    listed = listed if is_count(listed) else None
                    partial.sources.add("origin")
                    while chunk := (first if first is not None else guard(src.read, self.chunk_size)):
                        first = None
                        partial.absorb(chunk)
                        self._count(len(chunk))
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
                    f"({expected['size']} bytes, sha256 {expected['sha256'][:12]}…): corrupt read, or the origin "
                    "changed"
                )
            if problem is None:
                return got
            foreign = partial.sources - {"origin"}
            partial.reset()
            if foreign:  # bytes from another source were the bad ones: not the origin's fault
                logger.warning("pervasive: %s; dropping bytes received from %s", problem, sorted(foreign))
                return attempt(0)
            raise OriginMismatch(problem)

        return retrying(attempt, self.policy, what)


def fetch_source(source: str, storage_options: Mapping | None, dest: str, settings: TransferSettings) -> FetchResult:
    """Make ``dest`` a complete, verified local copy of ``source``, read from the origin only.

    A complete earlier copy (manifest present, sizes — and with
    ``settings.verify`` hashes — matching) is reused without reading the
    source. When an earlier copy was damaged, its manifest is the reference:
    files still matching it are kept, the others are read again and must
    match it (an origin that changed since is an error, not a silent update
    of one worker). Temporary files of dead processes in ``dest`` are
    removed first.
    """
    start = time.perf_counter()
    cached = cached_copy(source, dest, settings)
    if cached is not None:
        return cached
    earlier = read_reference(dest)  # kept by cached_copy (here, or the caller's) when the copy failed it
    os.makedirs(dest, exist_ok=True)
    remove_stale_parts(dest)

    copy = OriginCopy(source, storage_options, dest, settings)
    listing = copy.list()
    reference = earlier["files"] if earlier is not None else {}
    if earlier is not None and set(reference) != set(listing.files):
        raise TransferError(
            f"the origin {source} now lists other files than the copy made earlier in {dest}; if it was "
            "updated on purpose, give the context a new name (or clear the cache directory)"
        )
    entries = {rel: copy.fetch(rel, reference.get(rel)) for rel in listing.files}
    manifest = {
        "source": source,
        "is_file": listing.is_file,
        "files": entries,
        "origin": copy.stamps(),
        "blocks": all_blocks(dest, entries, copy.blocks),
    }
    write_manifest(dest, manifest)
    seconds = time.perf_counter() - start
    return FetchResult(local_path(dest, manifest), manifest, copy.bytes, seconds, sources={"origin": copy.bytes})


def origin_changed(
    manifest: Mapping, source: str, storage_options: Mapping | None, settings: TransferSettings
) -> str | None:
    """How the origin differs from what it was when the copy ``manifest`` describes was made, or ``None``.

    Compared: the files listed, their sizes, and the version markers the
    origin gives (mtime, ETag, Last-Modified, generation, ...) recorded in
    the manifest's ``"origin"`` (copies made before it was recorded: sizes
    only). Reads no file content.
    """
    copy = OriginCopy(source, storage_options, "", settings)
    listing = copy.list()
    files = manifest["files"]
    if set(listing.files) != set(files):
        gone, new = sorted(set(files) - set(listing.files)), sorted(set(listing.files) - set(files))
        return f"it now lists other files (gone: {gone[:5]}, new: {new[:5]})"
    recorded = manifest.get("origin") if isinstance(manifest.get("origin"), Mapping) else {}
    for rel in sorted(files):
        now = copy.stamp(rel)
        if "size" in now and now["size"] != files[rel]["size"]:
            return f"{rel!r} is {now['size']} bytes there, {files[rel]['size']} in the copy"
        then = recorded.get(rel)
        if isinstance(then, Mapping):
            for key, value in now.items():
                if key != "size" and key in then and then[key] != value:
                    return f"the {key} of {rel!r} was {then[key]!r} when the copy was made, now {value!r}"
    return None
