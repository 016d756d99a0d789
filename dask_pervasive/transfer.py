"""Peer-to-peer transfer of context files over Dask's own comms.

When many cold workers need the same context, reading it from the origin
once per worker makes the origin the bottleneck. Workers that hold the files
serve them to the others instead, over the connections Dask already has (so
``distributed.security`` TLS applies and no port is opened).

Four roles, each a small part of this module:

* :class:`ContextServer` (worker handlers ``pervasive_manifest`` and
  ``pervasive_read``) serves, in chunks, the files listed in the manifest of
  a worker's complete copy (or, while the worker still copies, the files it
  has already verified), and nothing else.
* :class:`SourceCoordinator` (scheduler handlers
  ``pervasive_acquire_source``, ``pervasive_release_source``,
  ``pervasive_holders``; created by :class:`~dask_pervasive.ContextSchedulerPlugin`)
  tells a cold worker where to copy from: a holder with a free upload slot
  (``pervasive.transfer.peer-max-uploads``), else a worker still copying
  (followed file by file), else the origin while fewer than
  ``pervasive.transfer.origin-max-concurrent`` workers read it, else to wait.
  Every worker becomes a source, so a cohort fans out as a tree that streams
  while the first worker still reads the origin, and the origin is read
  about once.
* :func:`fetch_context` (called by the worker's context cache) copies a
  context: peers first, origin as fallback, each file into a temporary name,
  verified against the sha256 manifest, then renamed; a failing or stalled
  peer is left and the copy resumes at the same byte offset from another
  source. Origin reads are bounded by ``pervasive.transfer.stall-timeout``
  and retried with backoff (:func:`~dask_pervasive.files.read_origin_file`).
  Without the scheduler plugin, workers read the origin directly.
* :class:`PeerFileSystem`, fsspec protocol ``dask-peer``
  (``dask-peer://<context>/<relpath>``), reads the same files from inside any
  task.

The manifest (relative path → size, sha256) is computed once, by the first
worker that copies from the origin (:mod:`dask_pervasive.files` writes it
last, so only complete copies have one). That worker hands it to the
scheduler's coordinator (trust on first use), and every later copy is
checked against it: file by file against its source's manifest (or, read
from the origin, against the coordinator's), and as a whole against the
coordinator's. What is and is not protected: ``docs/security.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask.config
import fsspec
from dask.utils import parse_bytes, parse_timedelta
from distributed.protocol import to_serialize
from fsspec.asyn import AsyncFileSystem
from fsspec.callbacks import DEFAULT_CALLBACK
from fsspec.spec import AbstractBufferedFile

from .errors import TransferError
from .files import (
    MANIFEST,
    FetchResult,
    PartialFile,
    RetryPolicy,
    cached_copy,
    fetch_source,
    list_source,
    local_path,
    manifest_digest,
    matches,
    read_manifest,
    read_origin_file,
    remove_stale_parts,
    safe_relpath,
    write_manifest,
)

if TYPE_CHECKING:
    from distributed import Scheduler, Worker

    from .cache import ContextCache
    from .context import Context

logger = logging.getLogger(__name__)

#: The origin as a source, in coordinator replies.
ORIGIN = "origin"
#: Coordinator reply: no source is free now, ask again.
WAIT = "wait"
#: Scheduler metadata set while a coordinator runs; workers check it before
#: asking (a missing scheduler handler would only log an error there).
METADATA_KEY = ("pervasive", "transfer")
_EVENT_TOPIC = "pervasive"  # = worker.EVENT_TOPIC (not imported: worker imports this module)
_LONG_POLL = 1.0  # seconds the coordinator holds an acquire while nothing is free
_MAX_FAILED_SOURCES = 8
_FAILED_HOLDER_COOLDOWN = 30.0  # seconds a holder whose upload failed is not offered again
_PARTIAL_POLL = 0.1  # seconds between looks at a peer that is still copying


def _config_bytes(key: str) -> int:
    return parse_bytes(dask.config.get(f"pervasive.transfer.{key}"))


def _config_seconds(key: str) -> float:
    return parse_timedelta(dask.config.get(f"pervasive.transfer.{key}"))


class _Corrupt(TransferError):
    """A source sent bytes that do not match the manifest."""


# -- serving (worker side) ------------------------------------------------------
class ContextServer:
    """Serve files of this worker's context copies to peers.

    Only files listed in the manifest of a complete copy of a declared
    context (or, while this worker copies it, files already verified) are
    served, resolved strictly inside that copy's directory:
    ``..``, absolute paths, ``\\``, symlinks leading out of the directory,
    unlisted files, unknown contexts and malformed ranges are refused with a
    logged warning and a :class:`~dask_pervasive.TransferError` to the
    caller. Reads are capped at ``chunk_size`` bytes.
    """

    def __init__(self, worker: Worker, cache: ContextCache, chunk_size: int) -> None:
        self.worker = worker
        self.cache = cache
        self.chunk_size = chunk_size
        #: copies in progress on this worker, by context: their verified files are served too
        self.in_progress: dict[str, _Receiver] = {}
        self._capped: set[tuple[Any, Any]] = set()  #: (caller, context) told about the chunk cap

    def install(self) -> None:
        self.worker.handlers["pervasive_manifest"] = self.manifest
        self.worker.handlers["pervasive_read"] = self.read

    def _refuse(self, caller: str | None, context: Any, path: Any, why: str) -> TransferError:
        caller = caller or "?"
        logger.warning(
            "pervasive: worker %s refused to serve %r / %r to %s: %s", self.worker.address, context, path, caller, why
        )
        return TransferError(f"worker {self.worker.address} refuses to serve {context!r} / {path!r}: {why}")

    def _copy(self, context: Any, token: str | None) -> tuple[str, dict]:
        """Directory and manifest of the complete copy of ``context`` (raises ``LookupError(why)``)."""
        entry = self.cache.entries.get(context) if isinstance(context, str) else None
        if entry is None or entry.context.source is None:
            raise LookupError("unknown context (or one without files) on this worker")
        if token is not None and token != entry.context.token:
            raise LookupError("the context has a different definition on this worker")
        dest = self.cache.files_dir(entry.context)
        manifest = read_manifest(dest)
        if manifest is None:
            receiver = self.in_progress.get(context)
            manifest = receiver.progress() if receiver is not None and receiver.dest == dest else None
        if manifest is None:
            raise LookupError("no complete copy of the context on this worker")
        return dest, manifest

    @staticmethod
    def _resolve(dest: str, manifest: dict, path: Any) -> tuple[str, dict]:
        """Absolute path of manifest entry ``path`` inside ``dest`` (raises ``LookupError(why)``)."""
        if not isinstance(path, str) or not path or "\x00" in path or "\\" in path:
            raise LookupError("malformed path")
        if path.startswith("/") or os.path.isabs(path):
            raise LookupError("absolute path")
        parts = path.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise LookupError("path traversal")
        meta = manifest["files"].get(path)
        if meta is None:
            raise LookupError("not a file of this context")
        root = os.path.realpath(dest)
        full = os.path.realpath(os.path.join(root, *parts))
        if not full.startswith(root + os.sep):
            raise LookupError("resolves outside the context's cache directory")
        if not os.path.isfile(full):
            raise LookupError("missing from the copy")
        return full, meta

    async def manifest(self, comm: Any = None, context: Any = None, token: str | None = None) -> dict:
        """Handler ``pervasive_manifest``: the manifest of the complete copy of ``context``."""
        try:
            _, manifest = self._copy(context, token)
        except LookupError as exc:
            raise self._refuse(getattr(comm, "peer_address", None), context, MANIFEST, str(exc)) from None
        return manifest

    async def read(
        self,
        comm: Any = None,
        context: Any = None,
        path: Any = None,
        offset: int = 0,
        length: int | None = None,
        token: str | None = None,
    ) -> Any:
        """Handler ``pervasive_read``: up to ``chunk-size`` bytes of ``path`` from ``offset``."""
        caller = getattr(comm, "peer_address", None)
        data = await asyncio.to_thread(self._read, caller, context, path, offset, length, token)
        # A frame of its own rather than a msgpack field: one copy less on each side.
        return to_serialize(data)

    def _read(self, caller: Any, context: Any, path: Any, offset: Any, length: Any, token: str | None) -> bytes:
        try:
            dest, manifest = self._copy(context, token)
            full, _ = self._resolve(dest, manifest, path)
            if not _is_count(offset) or not (length is None or (_is_count(length) and length > 0)):
                raise LookupError(f"bad range offset={offset!r} length={length!r}")
        except LookupError as exc:
            raise self._refuse(caller, context, path, str(exc)) from None
        if length is not None and length > self.chunk_size and (caller, context) not in self._capped:
            # Served, capped: a peer configured with a larger chunk-size re-plans from the short
            # reply; logged once per caller and context.
            self._capped.add((caller, context))
            logger.warning(
                "pervasive: worker %s capped a read of %r / %r by %s at chunk-size %d bytes (asked %d)",
                self.worker.address,
                context,
                path,
                caller or "?",
                self.chunk_size,
                length,
            )
        n = self.chunk_size if length is None else min(length, self.chunk_size)
        with open(full, "rb") as f:
            f.seek(offset)
            return f.read(n)


# -- coordination (scheduler side) -------------------------------------------------
@dataclass
class Lease:
    """One copy in progress: ``receiver`` reads ``context`` from ``source``."""

    id: str
    context: str
    receiver: str
    source: str  #: a worker address or :data:`ORIGIN`
    started: float = field(default_factory=time.monotonic)


class SourceCoordinator:
    """Decide, cluster-wide, where cold workers copy context files from.

    Holders of a context are the workers whose warm-map entry says its files
    are complete (``warm[context][worker].files``, fed by worker events) and
    those that just reported a finished copy. A cold worker gets the holder
    with the fewest uploads below ``peer_max_uploads``; failing that, a worker
    still copying the context (it serves the files it has verified and the
    receiver follows it, so a cohort streams down a tree while the first
    worker still reads the origin; never in a cycle). It gets the origin only
    while fewer than ``origin_max_concurrent`` workers read it *and* nobody
    holds or is copying the context (for this worker's purposes): otherwise
    waiting for a peer is cheaper than reading the origin again. Slots of a
    worker that dies (as receiver or holder) are released.

    Parameters
    ----------
    scheduler
        The scheduler; handlers are added to it by :meth:`start`.
    warm
        ``{context: {worker: record with a .files flag}}``, the scheduler
        plugin's warm map (read only).
    origin_max_concurrent, peer_max_uploads
        Default to ``pervasive.transfer.*`` as set on the scheduler.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        warm: Mapping[str, Mapping[str, Any]] | None = None,
        origin_max_concurrent: int | None = None,
        peer_max_uploads: int | None = None,
    ) -> None:
        cfg = dask.config.get("pervasive.transfer")
        self.scheduler = scheduler
        self.warm = warm if warm is not None else {}
        self.origin_max = int(cfg["origin-max-concurrent"] if origin_max_concurrent is None else origin_max_concurrent)
        self.peer_max = int(cfg["peer-max-uploads"] if peer_max_uploads is None else peer_max_uploads)
        if self.origin_max < 1 or self.peer_max < 1:
            raise ValueError("pervasive.transfer.origin-max-concurrent and peer-max-uploads must be >= 1")
        self.leases: dict[str, Lease] = {}
        self.uploads: dict[str, int] = defaultdict(int)
        self.origin_active = 0
        self.complete: dict[str, set[str]] = defaultdict(set)  #: finished copies reported to us
        self.suspect: dict[str, set[str]] = defaultdict(set)  #: holders that served corrupt data
        self.cooling: dict[str, float] = {}  #: holder -> when it may serve again after a failed upload
        self.manifests: dict[str, tuple[str | None, str, dict]] = {}  #: context -> (token, digest, manifest)
        self._changed = asyncio.Event()

    def start(self) -> None:
        self.scheduler.handlers["pervasive_acquire_source"] = self.acquire
        self.scheduler.handlers["pervasive_release_source"] = self.release
        self.scheduler.handlers["pervasive_holders"] = self.holders_handler
        self.scheduler.set_metadata(list(METADATA_KEY), {"peer_max_uploads": self.peer_max})

    def close(self) -> None:
        for name in ("pervasive_acquire_source", "pervasive_release_source", "pervasive_holders"):
            self.scheduler.handlers.pop(name, None)
        with contextlib.suppress(KeyError, TypeError, AttributeError):
            del self.scheduler.task_metadata[METADATA_KEY[0]][METADATA_KEY[1]]
        self._notify()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # -- state -------------------------------------------------------------------------
    def holders(self, context: str) -> list[str]:
        """Workers with a complete, trusted copy of ``context``, fewest uploads first."""
        alive = self.scheduler.workers
        found = {w for w, rec in self.warm.get(context, {}).items() if getattr(rec, "files", False)}
        found |= self.complete.get(context, set())
        found -= self.suspect.get(context, set())
        now = time.monotonic()
        found = {w for w in found if w in alive and self.cooling.get(w, 0.0) <= now}
        return sorted(found, key=lambda w: (self.uploads.get(w, 0), w))

    @staticmethod
    def _upstream(worker: str, source_of: Mapping[str, str]) -> set[str]:
        """The workers ``worker`` copies from, directly or through others (``source_of``: receiver -> source)."""
        chain: set[str] = set()
        while (worker := source_of.get(worker, ORIGIN)) != ORIGIN and worker not in chain:
            chain.add(worker)
        return chain

    def _copying(self, context: str, worker: str, exclude: set[str]) -> dict[str, int]:
        """Workers still copying ``context`` that ``worker`` may copy from (they serve what they
        have), with their depth in the copy tree."""
        source_of = {lease.receiver: lease.source for lease in self.leases.values() if lease.context == context}
        now = time.monotonic()
        out = {}
        for r in source_of:
            if (
                r != worker
                and r not in exclude
                and r in self.scheduler.workers
                and r not in self.suspect.get(context, ())
                and self.cooling.get(r, 0.0) <= now
            ):
                chain = self._upstream(r, source_of)
                if worker not in chain:  # no cycles
                    out[r] = len(chain)
        return out

    @staticmethod
    def _least_loaded(candidates: list[str], uploads: Mapping[str, int]) -> str:
        least = min(uploads.get(c, 0) for c in candidates)
        return random.choice([c for c in candidates if uploads.get(c, 0) == least])

    def _choose(self, context: str, worker: str, exclude: set[str]) -> str:
        """A complete holder with a free slot, else a worker still copying with a free slot,
        else the origin when nobody has or is getting the context, else wait."""
        usable = [h for h in self.holders(context) if h != worker and h not in exclude]
        free = [h for h in usable if self.uploads.get(h, 0) < self.peer_max]
        if free:
            return self._least_loaded(free, self.uploads)
        depth = self._copying(context, worker, exclude)
        free = [c for c in depth if self.uploads.get(c, 0) < self.peer_max]
        if free:
            # Shallowest first: a breadth-first tree stays log(n) deep, which matters for
            # contexts of one big file (a follower waits for each whole file upstream).
            top = min(depth[c] for c in free)
            return self._least_loaded([c for c in free if depth[c] == top], self.uploads)
        others = any(lease.context == context and lease.receiver != worker for lease in self.leases.values())
        if not usable and not others and self.origin_active < self.origin_max:
            return ORIGIN
        return WAIT

    def _lease(self, context: str, worker: str, source: str) -> Lease:
        lease = Lease(uuid.uuid4().hex, context, worker, source)
        self.leases[lease.id] = lease
        if source == ORIGIN:
            self.origin_active += 1
        else:
            self.uploads[source] += 1
        self.scheduler.log_event(
            _EVENT_TOPIC,
            {
                "action": "transfer-source",
                "context": context,
                "receiver": worker,
                "source": source,
                "complete": source == ORIGIN or source in self.holders(context),
            },
        )
        return lease

    # -- handlers ------------------------------------------------------------------------
    async def acquire(
        self,
        context: str,
        worker: str,
        token: str | None = None,
        exclude: Iterable[str] = (),
        wait: float = 0.0,
    ) -> dict:
        """Handler ``pervasive_acquire_source``.

        Returns ``{"source": <peer address> | "origin" | "wait", "lease":
        id | None, "digest": manifest digest | None}`` (plus ``"manifest"``,
        the reference, when the source is the origin and one is known); with
        ``wait``, holds the request up to that many seconds for a source to
        become free.
        """
        exclude = set(exclude or ())
        deadline = time.monotonic() + float(wait or 0)
        # A worker copies a context from one source at a time: a lease it still
        # holds for it was lost on the way back (failed release), so free it.
        for old in [lease for lease in self.leases.values() if (lease.context, lease.receiver) == (context, worker)]:
            self.release(old.id)
        while True:
            changed = self._changed
            # A receiver that died while it waited (remove_worker already ran) would hold
            # the slot forever: nobody is left to release it.
            if worker not in self.scheduler.workers:
                return {"source": WAIT, "lease": None, "digest": None}
            source = self._choose(context, worker, exclude)
            if source != WAIT:
                lease = self._lease(context, worker, source)
                known = self.manifests.get(context)
                if known is None or (token is not None and known[0] not in (None, token)):
                    return {"source": source, "lease": lease.id, "digest": None}
                reply = {"source": source, "lease": lease.id, "digest": known[1]}
                if source == ORIGIN:  # so each file read from the origin is checked as it arrives
                    reply["manifest"] = known[2]
                return reply
            left = deadline - time.monotonic()
            if left <= 0:
                return {"source": WAIT, "lease": None, "digest": None}
            # Re-check now and then too: holders also appear through worker events.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, 0.25))

    def release(
        self,
        lease: str | None = None,
        ok: bool = False,
        bad: bool = False,
        manifest: dict | None = None,
        token: str | None = None,
        failed: bool = False,
    ) -> None:
        """Handler ``pervasive_release_source``: a copy ended.

        ``ok``: the receiver now holds a complete verified copy (and, if
        none was known, ``manifest`` becomes the context's reference).
        ``bad``: the source sent data not matching the manifest; it is not
        offered again. ``failed``: the source failed or stalled; it is not
        offered for a while (a dead one is removed with its worker anyway).
        """
        entry = self.leases.pop(lease, None) if lease is not None else None
        if entry is None:
            return  # already released (its worker died)
        if entry.source == ORIGIN:
            self.origin_active = max(0, self.origin_active - 1)
        elif self.uploads.get(entry.source, 0) > 0:
            self.uploads[entry.source] -= 1
        if ok:
            self.complete[entry.context].add(entry.receiver)
            if manifest is not None and entry.context not in self.manifests:
                # Trust on first use: the first complete copy defines the context's files.
                try:
                    checked = _check_manifest(manifest)
                    if checked["partial"]:
                        raise TransferError("partial manifest")
                    reference = {"is_file": checked["is_file"], "files": checked["files"]}
                    self.manifests[entry.context] = (token, manifest_digest(reference), reference)
                except (TransferError, KeyError, TypeError, ValueError) as exc:
                    logger.warning(
                        "pervasive: ignoring malformed manifest of %r from %s: %s", entry.context, entry.receiver, exc
                    )
        if failed and entry.source != ORIGIN:
            self.cooling[entry.source] = time.monotonic() + _FAILED_HOLDER_COOLDOWN
        if bad and entry.source != ORIGIN:
            self.suspect[entry.context].add(entry.source)
            logger.warning(
                "pervasive: %s received corrupt data of context %r from %s; not using it as a source again",
                entry.receiver,
                entry.context,
                entry.source,
            )
        self._notify()

    def holders_handler(self, context: str | None = None) -> dict:
        """Handler ``pervasive_holders``: holders and manifest digest of ``context`` (or of all)."""
        if context is None:
            names = set(self.warm) | set(self.complete)
            return {"contexts": {n: self.holders(n) for n in sorted(names) if self.holders(n)}}
        known = self.manifests.get(context)
        return {"holders": self.holders(context), "digest": known[1] if known else None}

    def remove_worker(self, worker: str) -> None:
        """Release every slot the worker held, as receiver or as holder."""
        for lease in [lease for lease in self.leases.values() if worker in (lease.receiver, lease.source)]:
            self.release(lease.id)
        self.uploads.pop(worker, None)
        self.cooling.pop(worker, None)
        for group in (self.complete, self.suspect):
            for members in group.values():
                members.discard(worker)
        self._notify()


# -- copying (worker side) -----------------------------------------------------------
_HEX = frozenset("0123456789abcdef")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safe_name(rel: Any) -> bool:
    try:
        return isinstance(rel, str) and safe_relpath(rel) == rel and not rel.startswith(MANIFEST)
    except ValueError:
        return False


def _check_manifest(manifest: Any) -> dict:
    """A manifest from a peer, validated: paths safe, sizes and hashes well-formed.

    Returns ``{"is_file", "files", "partial", "expected"}``; a peer still
    copying sends a partial manifest (its verified files so far, and all the
    file names when it knows them; ``is_file`` may be ``None``).
    """
    if not isinstance(manifest, Mapping) or not isinstance(manifest.get("files"), Mapping):
        raise _Corrupt("malformed manifest")
    partial = bool(manifest.get("partial"))
    if not partial and not manifest["files"]:
        raise _Corrupt("empty manifest")
    files = {}
    for rel, meta in manifest["files"].items():
        if not _safe_name(rel) or not isinstance(meta, Mapping):
            raise _Corrupt(f"unsafe or malformed manifest entry {rel!r}")
        size, sha = meta.get("size"), meta.get("sha256")
        if not _is_count(size) or not isinstance(sha, str) or len(sha) != 64 or not _HEX.issuperset(sha):
            raise _Corrupt(f"malformed manifest entry {rel!r}")
        files[rel] = {"size": size, "sha256": sha}
    expected = manifest.get("expected") if partial else None
    if expected is not None and (not isinstance(expected, (list, tuple)) or not all(map(_safe_name, expected))):
        raise _Corrupt("malformed list of files")
    is_file = manifest.get("is_file")
    received = manifest.get("received")
    if is_file is not None and not isinstance(is_file, bool):
        raise _Corrupt("malformed manifest: is_file is not a bool")
    if not partial and is_file and len(files) != 1:
        raise _Corrupt("malformed manifest: a single-file context with several files")
    return {
        "is_file": None if partial and is_file is None else bool(is_file),
        "files": files,
        "partial": partial,
        "expected": list(expected) if expected is not None else None,
        "received": received if _is_count(received) else 0,
    }


def _drop(future: asyncio.Future) -> None:
    """Cancel a request no longer needed (or mark its error seen: a dead peer fails them all)."""
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()


async def stream_from_peer(
    worker: Worker,
    peer: str,
    *,
    context: str,
    path: str,
    start: int,
    end: int,
    absorb: Callable[[bytes], Awaitable[None]],
    token: str | None = None,
    chunk_size: int | None = None,
    timeout: float | None = None,
    window: int = 2,
) -> None:
    """Read bytes ``[start, end)`` of a context file from ``peer``, in chunks, in order.

    Up to ``window`` chunk requests are in flight while ``absorb`` handles
    the current chunk (the peer reads its disk while this worker writes).
    A peer silent for ``timeout`` seconds raises ``TimeoutError``; an empty
    or oversized reply raises :class:`TransferError`.
    """
    chunk_size = chunk_size or _config_bytes("chunk-size")
    timeout = timeout or _config_seconds("stall-timeout")
    rpc = worker.rpc(peer)
    pending: list[tuple[int, int, asyncio.Future]] = []  # (offset, length, reply), in offset order
    requested = offset = start

    def fill() -> None:
        nonlocal requested
        while len(pending) < window and requested < end:
            n = min(chunk_size, end - requested)
            call = rpc.pervasive_read(context=context, path=path, offset=requested, length=n, token=token)
            pending.append((requested, n, asyncio.ensure_future(asyncio.wait_for(call, timeout))))
            requested += n

    try:
        fill()
        while pending:
            at, expected, reply = pending.pop(0)
            data = await reply
            if not isinstance(data, (bytes, bytearray, memoryview)) or not 0 < len(data) <= expected:
                got = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else type(data).__name__
                raise _Corrupt(f"{peer} sent {got} bytes of {path!r} at offset {at}, expected {expected}")
            offset = at + len(data)
            if len(data) < expected:  # the peer serves smaller chunks: re-plan from here
                for _, _, later in pending:
                    _drop(later)
                pending.clear()
                requested = offset
                chunk_size = len(data)
            fill()
            await absorb(bytes(data))
    finally:
        for _, _, later in pending:
            _drop(later)


class _Receiver:
    """One copy of one context into ``dest``: peers first, origin fallback.

    While it runs, the files it has verified are served to other workers
    (:meth:`progress`), so a cohort copies files as they arrive instead of
    waiting, level by level, for complete copies.
    """

    def __init__(
        self,
        worker: Worker,
        context: Context,
        dest: str,
        chunk_size: int,
        timeout: float,
        server: ContextServer | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.worker = worker
        self.context = context
        self.dest = dest
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.server = server
        #: how origin reads are bounded and retried
        self.policy = policy if policy is not None else RetryPolicy.from_config(stall_timeout=timeout)
        self.expected: set[str] | None = None  #: every file of the context, once a source said
        #: whether ``expected``/``known`` come from the scheduler's reference manifest (else: from
        #: sources not yet checked against one, forgotten when one of them turns out to be bad)
        self.trusted = False
        self.is_file: bool | None = None
        self.known: dict[str, dict] = {}  #: size and sha256 of files, from a source's manifest or computed
        self.done: set[str] = set()  #: files verified and in place
        self.partials: dict[str, PartialFile] = {}
        self.bytes = {"peers": 0, "origin": 0}
        self.used: list[str] = []
        #: what :meth:`progress` serves; replaced, never mutated (read from server threads)
        self._snapshot: dict = {}
        self._publish()

    # -- what this copy serves while it runs -------------------------------------------
    def progress(self) -> dict:
        """A partial manifest: the files verified so far (maybe none yet), all names when known,
        and the bytes received so far (followers see progress within a big file too)."""
        return {**self._snapshot, "received": self.bytes["peers"] + self.bytes["origin"]}

    def _publish(self) -> None:
        self._snapshot = {
            "is_file": self.is_file,
            "files": {r: self.known[r] for r in sorted(self.done)},
            "partial": True,
            "expected": sorted(self.expected) if self.expected is not None else None,
        }

    def _file_done(self, rel: str) -> None:
        self.done.add(rel)
        self._publish()

    def _complete(self) -> bool:
        return self.expected is not None and self.is_file is not None and self.expected <= self.done

    def _manifest(self) -> dict:
        assert self.expected is not None
        return {"is_file": bool(self.is_file), "files": {r: self.known[r] for r in sorted(self.expected)}}

    def _restart(self) -> None:
        """Forget what sources said (they disagree with the reference, or lied); files on disk
        are re-checked, files in progress dropped."""
        self.expected = self.is_file = None
        self.trusted = False
        self.known.clear()
        self.done.clear()
        for partial in self.partials.values():
            partial.discard()
        self.partials.clear()
        self._publish()

    # -- driver --------------------------------------------------------------------
    async def run(self) -> FetchResult:
        start = time.perf_counter()
        await asyncio.to_thread(os.makedirs, self.dest, exist_ok=True)
        await asyncio.to_thread(remove_stale_parts, self.dest)  # left by a killed worker
        if self.server is not None:
            self.server.in_progress[self.context.name] = self
        try:
            manifest = await self._coordinated()
        finally:
            if self.server is not None and self.server.in_progress.get(self.context.name) is self:
                del self.server.in_progress[self.context.name]
            for partial in self.partials.values():
                await asyncio.to_thread(partial.discard)
            self.partials.clear()
        seconds = time.perf_counter() - start
        self.worker.log_event(
            _EVENT_TOPIC,
            {
                "action": "transfer",
                "context": self.context.name,
                "sources": self.used,
                "bytes_from_peers": self.bytes["peers"],
                "bytes_from_origin": self.bytes["origin"],
                "seconds": seconds,
            },
        )
        total = self.bytes["peers"] + self.bytes["origin"]
        return FetchResult(local_path(self.dest, manifest), manifest, total, seconds, sources=dict(self.bytes))

    async def _coordinated(self) -> dict:
        """Copy from the sources the coordinator hands out until complete; the manifest written."""
        scheduler = self.worker.scheduler
        name, me, token = self.context.name, self.worker.address, self.context.token
        exclude: set[str] = set()
        failures: list[str] = []
        while True:
            reply = await scheduler.pervasive_acquire_source(
                context=name, worker=me, token=token, exclude=sorted(exclude), wait=_LONG_POLL
            )
            if not isinstance(reply, dict):  # the scheduler plugin went away: uncoordinated
                reply = {"source": ORIGIN, "lease": None}
            source = reply["source"]
            if source == WAIT:
                continue
            ok = bad = failed = False
            manifest = None
            try:
                self.used.append(source)
                if source == ORIGIN:
                    await self._from_origin(reply.get("manifest"))
                else:
                    await self._from_peer(source, reply.get("digest"))
                manifest = await self._checked_manifest(reply.get("digest"), source)
                # Complete (and servable) before the coordinator offers this worker as a source.
                await asyncio.to_thread(write_manifest, self.dest, {"source": self.context.source, **manifest})
                ok = True
            except _Corrupt as exc:
                if source == ORIGIN:
                    raise
                if not self.trusted:  # what it told us about the other files is worthless too
                    self._restart()
                bad = True
                exclude.add(source)
                failures.append(f"{source}: {exc}")
                logger.warning("pervasive: copy of %r from %s rejected on %s: %s", name, source, me, exc)
            except Exception as exc:
                if source == ORIGIN:
                    raise
                failed = True
                exclude.add(source)
                failures.append(f"{source}: {type(exc).__name__}: {exc}")
                logger.info(
                    "pervasive: copy of %r from %s failed on %s (%r); resuming elsewhere", name, source, me, exc
                )
            finally:
                with contextlib.suppress(Exception):
                    await scheduler.pervasive_release_source(
                        lease=reply["lease"], ok=ok, bad=bad, failed=failed, manifest=manifest, token=token
                    )
            if ok:
                return {"source": self.context.source, **manifest}
            if len(failures) >= _MAX_FAILED_SOURCES:
                raise TransferError(
                    f"copying context {name!r} to {me} failed from {len(failures)} sources: " + "; ".join(failures)
                )

    async def _checked_manifest(self, digest: str | None, source: str) -> dict:
        """The manifest of the finished copy, checked against the scheduler's reference."""
        manifest = self._manifest()
        if digest is None:  # the reference may have appeared while we copied (from a partial source)
            with contextlib.suppress(Exception):
                digest = (await self.worker.scheduler.pervasive_holders(context=self.context.name))["digest"]
        if digest is not None and manifest_digest(manifest) != digest:
            self._restart()
            if source == ORIGIN:
                raise TransferError(
                    f"the files of context {self.context.name!r} read from its origin {self.context.source} "
                    "differ from the copies other workers hold (the origin changed?)"
                )
            raise _Corrupt(f"the files copied via {source} do not match the scheduler's manifest")
        return manifest

    # -- sources ---------------------------------------------------------------------
    def _adopt(self, reference: dict) -> None:
        """Take a manifest that matches the scheduler's reference as the truth; what
        unchecked sources said is forgotten if it disagrees."""
        files = reference["files"]
        consistent = (
            (self.expected is None or self.expected == set(files))
            and self.is_file in (None, reference["is_file"])
            and all(self.known.get(rel, meta) == meta for rel, meta in files.items())
        )
        if not consistent:
            logger.warning(
                "pervasive: %s: earlier sources of %r disagree with the scheduler's manifest; starting over",
                self.worker.address,
                self.context.name,
            )
            self._restart()
        self.expected, self.is_file = set(files), reference["is_file"]
        self.known.update(files)
        self.trusted = True
        self._publish()

    def _merge(self, manifest: dict, peer: str, digest: str | None) -> None:
        """Learn file metadata from a peer's (partial) manifest; inconsistent metadata is corrupt."""
        if not manifest["partial"]:
            if digest is not None and manifest_digest(manifest) != digest:
                raise _Corrupt(f"the manifest of {peer} differs from the one the scheduler holds")
            expected = set(manifest["files"])
            trusted = digest is not None
        else:
            expected = set(manifest["expected"]) if manifest["expected"] is not None else None
            trusted = False
        if trusted and not self.trusted:
            self._adopt(manifest)
            return
        if expected is not None:
            if self.expected is not None and expected != self.expected:
                raise _Corrupt(f"{peer} lists other files than an earlier source")
            self.expected = expected
        if manifest["is_file"] is not None:
            if self.is_file is not None and manifest["is_file"] != self.is_file:
                raise _Corrupt(f"{peer} disagrees with an earlier source on the context's layout")
            self.is_file = manifest["is_file"]
        for rel, meta in manifest["files"].items():
            if self.expected is not None and rel not in self.expected:
                raise _Corrupt(f"{peer} lists {rel!r}, which is not a file of the context")
            if self.known.setdefault(rel, meta) != meta:
                raise _Corrupt(f"{peer} describes {rel!r} differently than an earlier source")
        self._publish()

    async def _from_peer(self, peer: str, digest: str | None) -> None:
        """Copy what ``peer`` has; from a peer still copying, follow it until every file is here."""
        name, token = self.context.name, self.context.token
        rpc = self.worker.rpc(peer)
        last_progress = time.monotonic()
        received = -1
        while True:
            raw = await asyncio.wait_for(rpc.pervasive_manifest(context=name, token=token), self.timeout)
            manifest = _check_manifest(raw)
            self._merge(manifest, peer, digest)
            copied = False
            for rel in sorted(manifest["files"]):
                if rel not in self.done:
                    await self._copy_from_peer(peer, rel)
                    copied = True
            if self._complete():
                return
            if not manifest["partial"]:
                raise _Corrupt(f"{peer} claims a complete copy but lacks files")
            now = time.monotonic()
            if copied or manifest["received"] > received:
                last_progress, received = now, manifest["received"]
            elif now - last_progress > self.timeout:
                raise TimeoutError(f"{peer} has received nothing of {name!r} for {self.timeout:.0f}s")
            if not copied:
                await asyncio.sleep(_PARTIAL_POLL)

    async def _copy_from_peer(self, peer: str, rel: str) -> None:
        meta = self.known[rel]
        partial = await self._partial(rel, meta)
        if partial is None:
            return
        partial.sources.add(peer)

        async def absorb(data: bytes) -> None:
            await asyncio.to_thread(partial.absorb, data)
            self.bytes["peers"] += len(data)

        await stream_from_peer(
            self.worker,
            peer,
            context=self.context.name,
            path=rel,
            start=partial.offset,
            end=meta["size"],
            absorb=absorb,
            token=self.context.token,
            chunk_size=self.chunk_size,
            timeout=self.timeout,
        )
        del self.partials[rel]
        if not await asyncio.to_thread(partial.commit, meta["sha256"]):
            raise _Corrupt(f"{rel!r} received from {sorted(partial.sources)} does not match its sha256")
        self._file_done(rel)

    async def _partial(self, rel: str, meta: dict | None) -> PartialFile | None:
        """The file in progress for ``rel``; ``None`` when a verified copy is already in place."""
        partial = self.partials.get(rel)
        if partial is not None:
            return partial
        final = os.path.join(self.dest, *rel.split("/"))
        if meta is not None and await asyncio.to_thread(matches, final, meta, self.chunk_size):
            self._file_done(rel)  # left by an earlier, interrupted copy
            return None
        partial = self.partials[rel] = await asyncio.to_thread(PartialFile, final)
        return partial

    async def _from_origin(self, reference: Any = None) -> None:
        """Copy what is missing from the origin: bounded, retried, each file checked against
        the reference manifest when the coordinator has one (else the first read defines it)."""
        ctx = self.context
        if reference is not None:
            try:
                reference = _check_manifest(reference)
            except TransferError:
                reference = None  # the coordinator validated it when it trusted it; be safe anyway
        if reference is not None and not reference["partial"]:
            self._adopt(reference)
        listing = await asyncio.to_thread(list_source, ctx.source, dict(ctx.storage_options or {}), self.policy)
        if (self.expected is not None and set(listing.files) != self.expected) or self.is_file not in (
            None,
            listing.is_file,
        ):
            if self.trusted:
                raise TransferError(
                    f"the origin {ctx.source} of context {ctx.name!r} no longer lists the files other workers "
                    "copied from it; restart the workers holding the old copy or rename the context"
                )
            # Only unchecked peers said otherwise (no reference yet): the origin is the authority.
            logger.warning(
                "pervasive: %s: the origin of %r lists other files than the peers it copied from said; "
                "starting over from the origin",
                self.worker.address,
                ctx.name,
            )
            self._restart()
        self.expected, self.is_file = set(listing.files), bool(listing.is_file)
        self._publish()

        def count(n: int) -> None:
            self.bytes["origin"] += n

        for rel, remote in listing.files.items():
            if rel in self.done:
                continue
            meta = self.known.get(rel)  # from the reference or an earlier source's manifest
            partial = await self._partial(rel, meta)
            if partial is None:
                continue
            got = await asyncio.to_thread(
                read_origin_file,
                listing.fs,
                remote,
                partial,
                self.chunk_size,
                self.policy,
                size=listing.sizes.get(rel),
                expected=meta,
                on_bytes=count,
                what=f"reading {rel!r} of context {ctx.name!r} from its origin {ctx.source}",
            )
            del self.partials[rel]
            await asyncio.to_thread(partial.commit, None)
            self.known[rel] = got
            self._file_done(rel)


async def coordinator_available(worker: Worker) -> bool:
    """Whether the scheduler runs a :class:`SourceCoordinator`."""
    try:
        found = await worker.scheduler.get_metadata(keys=list(METADATA_KEY), default=None)
    except Exception:  # noqa: BLE001 - an old or unreachable scheduler: no coordination
        return False
    return found is not None


async def fetch_context(
    worker: Worker,
    context: Context,
    dest: str,
    chunk_size: int,
    verify: bool = True,
    timeout: float = 30.0,
    peers: bool = True,
    server: ContextServer | None = None,
    policy: RetryPolicy | None = None,
) -> FetchResult:
    """Make ``dest`` a complete, verified copy of ``context``'s files (on the worker's loop).

    Order: a complete earlier copy in ``dest``; else, when the scheduler
    coordinates transfers and ``peers`` is on, the sources it hands out
    (peers, the origin when it must); else the origin directly. With
    ``server``, files are served to other workers as soon as they are verified.
    Origin reads follow ``policy`` (default: ``pervasive.transfer.*`` read here,
    with ``timeout`` as the stall timeout).
    """
    cached = await asyncio.to_thread(cached_copy, context.source, dest, chunk_size, verify)
    if cached is not None:
        return cached
    if policy is None:
        policy = RetryPolicy.from_config(stall_timeout=timeout)
    if not peers or not await coordinator_available(worker):
        return await asyncio.to_thread(
            fetch_source, context.source, dict(context.storage_options or {}), dest, chunk_size, verify, policy
        )
    return await _Receiver(worker, context, dest, chunk_size, timeout, server, policy).run()


def peer_fetcher(
    worker: Worker,
    chunk_size: int,
    verify: bool,
    timeout: float,
    peers: bool = True,
    server: ContextServer | None = None,
    policy: RetryPolicy | None = None,
) -> Callable[[Context, str], FetchResult]:
    """A ``ContextCache`` fetcher that runs :func:`fetch_context` on the worker's loop.

    The cache calls it from task threads; the copy itself runs on the event
    loop, where the worker's rpc pool lives, with disk and origin I/O in
    threads.
    """
    from distributed.utils import sync

    def fetch(context: Context, dest: str) -> FetchResult:
        return sync(
            worker.loop, fetch_context, worker, context, dest, chunk_size, verify, timeout, peers, server, policy
        )

    return fetch


# -- fsspec ---------------------------------------------------------------------------
def _current_worker() -> Worker:
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        raise TransferError(
            "dask-peer:// (dask_pervasive.PeerFileSystem) reads context files from other Dask workers, "
            "so it only works inside a task running on a worker. From a worker coroutine or plugin, "
            "pass worker=<the Worker>; outside the cluster, read the context's origin instead."
        ) from None


class PeerFile(AbstractBufferedFile):
    """A read-only ``dask-peer://`` file: reads are ranged ``cat_file`` calls.

    fsspec < 2024.12's ``AbstractBufferedFile._fetch_range`` raises
    ``NotImplementedError`` instead of falling back to ``cat_file``.
    """

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path, start=start, end=end)


class PeerFileSystem(AsyncFileSystem):
    """Read-only fsspec filesystem over the context files held by Dask workers.

    ``dask-peer://<context>/<relpath>`` names a file of a context's
    manifest; ``dask-peer://<context>/`` its root. Bytes come from workers
    holding a complete copy (asked from the scheduler's
    :class:`SourceCoordinator`, or the ``peers`` given), over Dask's comms,
    in ``pervasive.transfer.chunk-size`` pieces; a failing peer is replaced
    by the next one at the same offset. Whole-file reads (``cat_file``
    without range, ``get_file``) are checked against the manifest's sha256;
    ranged reads (and ``open(...).read(n)``) are not, and reads do not take
    the coordinator's upload slots (see ``docs/security.md``).

    Parameters
    ----------
    peers
        Worker addresses to read from, in order. Default: the holders the
        scheduler knows (needs :class:`~dask_pervasive.ContextSchedulerPlugin`).
    worker
        The local worker. Default: the worker running the current task.
    timeout
        Seconds a silent peer is waited for (``pervasive.transfer.stall-timeout``).

    Notes
    -----
    The rpc connections live on the worker's event loop, so the file system
    runs its coroutines there (``loop=worker.loop``) instead of on fsspec's
    own IO thread: blocking calls (``fs.cat_file(...)``, ``fs.open(...)``)
    from a task thread hop onto the worker's loop and wait. From a coroutine
    already on that loop, create it with ``asynchronous=True`` and await the
    ``_``-methods; blocking calls there would deadlock, and fsspec refuses
    them.

    Examples
    --------
    >>> def read_config():  # doctest: +SKIP
    ...     fs = fsspec.filesystem("dask-peer")
    ...     return fs.cat_file("dask-peer://llm/config.json")
    >>> client.submit(read_config).result()  # doctest: +SKIP
    """

    protocol = "dask-peer"
    root_marker = ""
    cachable = False  # bound to one worker; instances are cheap

    def __init__(
        self,
        peers: Iterable[str] | None = None,
        worker: Worker | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        worker = worker if worker is not None else _current_worker()
        if not kwargs.get("asynchronous"):
            kwargs.setdefault("loop", worker.loop.asyncio_loop)
        super().__init__(**kwargs)
        self.worker = worker
        self.peers = list(peers) if peers is not None else None
        self.chunk_size = _config_bytes("chunk-size")
        self.timeout = timeout if timeout is not None else _config_seconds("stall-timeout")
        self._contexts: dict[str, tuple[dict, list[str]]] = {}

    # -- helpers ----------------------------------------------------------------------
    def _split(self, path: str) -> tuple[str, str]:
        path = self._strip_protocol(path)
        context, _, rel = path.partition("/")
        return context, rel.strip("/")

    def _token(self, context: str) -> str | None:
        plugin = self.worker.plugins.get(_EVENT_TOPIC)
        entry = getattr(getattr(plugin, "cache", None), "entries", {}).get(context)
        return entry.context.token if entry is not None else None

    async def _holders(self, context: str) -> tuple[list[str], str | None]:
        if self.peers is not None:
            return list(self.peers), None
        if not await coordinator_available(self.worker):
            raise TransferError(
                "dask-peer:// needs dask_pervasive.ContextSchedulerPlugin on the scheduler to find workers "
                "holding a context (dask_pervasive.install(client, ...)), or pass peers=[addresses]"
            )
        reply = await self.worker.scheduler.pervasive_holders(context=context)
        return list(reply["holders"]), reply["digest"]

    async def _context(self, context: str) -> tuple[dict, list[str]]:
        """Manifest of ``context`` and the peers to read it from (first: the one that sent it)."""
        if context in self._contexts:
            return self._contexts[context]
        holders, digest = await self._holders(context)
        if not holders:
            raise FileNotFoundError(f"dask-peer://{context}: no worker holds a complete copy of context {context!r}")
        errors = []
        for i, peer in enumerate(holders):
            try:
                raw = await asyncio.wait_for(
                    self.worker.rpc(peer).pervasive_manifest(context=context, token=self._token(context)),
                    self.timeout,
                )
                manifest = _check_manifest(raw)
                if manifest["partial"]:
                    raise TransferError("its copy is still incomplete")
                if digest is not None and manifest_digest(manifest) != digest:
                    raise _Corrupt("manifest differs from the scheduler's")
            except Exception as exc:  # noqa: BLE001 - try the next holder
                errors.append(f"{peer}: {exc}")
                continue
            found = self._contexts[context] = (manifest, holders[i:] + holders[:i])
            return found
        raise FileNotFoundError(f"dask-peer://{context}: no holder could serve it ({'; '.join(errors)})")

    async def _meta(self, path: str) -> tuple[str, str, dict, list[str]]:
        context, rel = self._split(path)
        manifest, peers = await self._context(context)
        meta = manifest["files"].get(rel)
        if meta is None:
            raise FileNotFoundError(f"dask-peer://{context}/{rel}")
        return context, rel, meta, peers

    # -- fsspec API -------------------------------------------------------------------
    async def _info(self, path: str, **kwargs: Any) -> dict:
        context, rel = self._split(path)
        if not context:
            return {"name": "", "size": 0, "type": "directory"}
        manifest, _ = await self._context(context)
        files = manifest["files"]
        name = f"{context}/{rel}" if rel else context
        if rel in files:
            return {"name": name, "size": files[rel]["size"], "type": "file", "sha256": files[rel]["sha256"]}
        if not rel or any(f.startswith(rel + "/") for f in files):
            return {"name": name, "size": 0, "type": "directory"}
        raise FileNotFoundError(f"dask-peer://{name}")

    async def _ls(self, path: str, detail: bool = True, **kwargs: Any) -> list:
        context, rel = self._split(path)
        if not context:
            if self.peers is None and await coordinator_available(self.worker):
                names = list((await self.worker.scheduler.pervasive_holders())["contexts"])
            else:
                plugin = self.worker.plugins.get(_EVENT_TOPIC)
                names = sorted(getattr(getattr(plugin, "cache", None), "entries", {}))
            out = [{"name": n, "size": 0, "type": "directory"} for n in names]
        else:
            manifest, _ = await self._context(context)
            files = manifest["files"]
            if rel in files:
                out = [await self._info(path)]
            else:
                prefix = f"{rel}/" if rel else ""
                children: dict[str, dict] = {}
                for f, meta in files.items():
                    if not f.startswith(prefix):
                        continue
                    head, sep, _ = f[len(prefix) :].partition("/")
                    name = f"{context}/{prefix}{head}"
                    if sep:
                        children.setdefault(name, {"name": name, "size": 0, "type": "directory"})
                    else:
                        children[name] = {"name": name, "size": meta["size"], "type": "file", "sha256": meta["sha256"]}
                if not children:
                    raise FileNotFoundError(f"dask-peer://{context}/{rel}")
                out = [children[k] for k in sorted(children)]
        return out if detail else [o["name"] for o in out]

    async def _stream_any(
        self, context: str, rel: str, peers: list[str], start: int, end: int, absorb, received, errors: list[str]
    ) -> bool:
        """Stream ``[start, end)`` from the first peer that works; a failing peer is
        replaced by the next at the offset reached (``start + received()``)."""
        for peer in peers:
            try:
                await stream_from_peer(
                    self.worker,
                    peer,
                    context=context,
                    path=rel,
                    start=start + received(),
                    end=end,
                    absorb=absorb,
                    token=self._token(context),
                    chunk_size=self.chunk_size,
                    timeout=self.timeout,
                )
                return True
            except Exception as exc:  # noqa: BLE001 - resume from the next peer
                errors.append(f"{peer}: {type(exc).__name__}: {exc}")
        return False

    async def _cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        context, rel, meta, peers = await self._meta(path)
        size = meta["size"]
        start = 0 if start is None else (max(0, size + start) if start < 0 else min(start, size))
        end = size if end is None else (max(0, size + end) if end < 0 else min(end, size))
        if end <= start:
            return b""
        errors: list[str] = []
        # Whole files are verified; on a mismatch, start over with the next peer first.
        for i in range(len(peers)):
            out = bytearray()

            async def absorb(data: bytes, out: bytearray = out) -> None:
                out.extend(data)

            order = peers[i:] + peers[:i]
            if not await self._stream_any(context, rel, order, start, end, absorb, lambda out=out: len(out), errors):
                break
            if (start, end) != (0, size) or hashlib.sha256(out).hexdigest() == meta["sha256"]:
                return bytes(out)
            errors.append(f"{order[0]}: data does not match the manifest's sha256")
        raise TransferError(f"could not read dask-peer://{context}/{rel}: {'; '.join(errors)}")

    async def _get_file(self, rpath: str, lpath: str, callback=DEFAULT_CALLBACK, **kwargs: Any) -> None:
        if (await self._info(rpath))["type"] == "directory":
            await asyncio.to_thread(os.makedirs, lpath, exist_ok=True)
            return
        context, rel, meta, peers = await self._meta(rpath)
        callback.set_size(meta["size"])
        errors: list[str] = []
        for i in range(len(peers)):
            # temporary name next to lpath, renamed once the sha256 matches
            partial = await asyncio.to_thread(PartialFile, os.fspath(lpath))

            async def absorb(data: bytes, partial: PartialFile = partial) -> None:
                await asyncio.to_thread(partial.absorb, data)
                callback.relative_update(len(data))

            order = peers[i:] + peers[:i]
            try:
                size = meta["size"]
                if not await self._stream_any(context, rel, order, 0, size, absorb, lambda p=partial: p.offset, errors):
                    break
                if await asyncio.to_thread(partial.commit, meta["sha256"]):
                    return
                errors.append(f"{order[0]}: data does not match the manifest's sha256")
            finally:
                await asyncio.to_thread(partial.discard)  # no-op after a commit
        raise TransferError(f"could not copy dask-peer://{context}/{rel}: {'; '.join(errors)}")

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, **kwargs: Any) -> PeerFile:
        if mode != "rb":
            raise NotImplementedError("dask-peer:// is read-only")
        return PeerFile(self, path, mode, block_size=block_size or self.chunk_size, **kwargs)


fsspec.register_implementation(PeerFileSystem.protocol, PeerFileSystem, clobber=True)

__all__ = [
    "ContextServer",
    "Lease",
    "PeerFileSystem",
    "SourceCoordinator",
    "coordinator_available",
    "fetch_context",
    "peer_fetcher",
    "stream_from_peer",
]
