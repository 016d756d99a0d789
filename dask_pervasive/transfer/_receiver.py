"""Worker side, receiving: one copy of one context's files into this worker's cache.

:class:`Receiver` asks the scheduler's coordinator for sources until the copy
is complete: peers first (a peer still copying is followed file by file), the
origin when the coordinator says so; a failing or stalled source is left and
the copy resumes at the same byte offset from the next one. Every file is
verified against its sha256 before it is renamed into place, the whole copy
against the coordinator's reference manifest, and the manifest is written last.
:func:`fetch_context` picks the path: a complete earlier copy, the receiver, or
(no coordinator, or peers off) :func:`~._origin.fetch_source`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._protocol import EVENT_TOPIC, Action, SchedulerHandler, WorkerHandler
from ..errors import TransferError
from ._coordinator import ORIGIN, WAIT, coordinator_available
from ._manifest import (
    Corrupt,
    FetchResult,
    all_blocks,
    cached_copy,
    check_manifest,
    local_path,
    manifest_digest,
    matches,
    write_manifest,
)
from ._origin import OriginCopy, fetch_source, origin_changed
from ._parts import LocalWriteError, PartialFile, remove_stale_parts
from ._stream import stream_from_peer

if TYPE_CHECKING:
    from distributed import Worker

    from .._settings import TransferSettings
    from ..context import Context
    from ._server import ContextServer

logger = logging.getLogger(__name__)

_LONG_POLL = 1.0  # seconds the coordinator holds an acquire while nothing is free
_MAX_FAILED_SOURCES = 8
_PARTIAL_POLL = 0.1  # seconds between looks at a peer that is still copying


class Receiver:
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
        settings: TransferSettings,
        server: ContextServer | None = None,
    ) -> None:
        self.worker = worker
        self.context = context
        self.dest = dest
        self.settings = settings
        self.chunk_size = settings.chunk_size
        self.timeout = settings.stall_timeout  #: seconds a silent peer is waited for
        self.server = server
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
        #: what the origin said identifies each file's version when it was read (recorded in the
        #: manifest, so a later use of this copy can tell whether the origin changed)
        self.stamps: dict | None = None
        self.blocks: dict[str, list[str]] = {}  #: block digests of files this copy wrote
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
            EVENT_TOPIC,
            {
                "action": Action.TRANSFER.value,
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
        acquire = getattr(scheduler, SchedulerHandler.ACQUIRE_SOURCE.value)
        release = getattr(scheduler, SchedulerHandler.RELEASE_SOURCE.value)
        name, me, token = self.context.name, self.worker.address, self.context.token
        exclude: set[str] = set()
        failures: list[str] = []
        while True:
            reply = await acquire(context=name, worker=me, token=token, exclude=sorted(exclude), wait=_LONG_POLL)
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
                manifest["blocks"] = await asyncio.to_thread(all_blocks, self.dest, manifest["files"], self.blocks)
                # Complete (and servable) before the coordinator offers this worker as a source.
                stamps = {"origin": self.stamps} if self.stamps else {}
                await asyncio.to_thread(
                    write_manifest, self.dest, {"source": self.context.source, **manifest, **stamps}
                )
                ok = True
            except LocalWriteError:
                raise  # this worker's disk: no other source can help, and this one is not to blame
            except Corrupt as exc:
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
                    await release(lease=reply["lease"], ok=ok, bad=bad, failed=failed, manifest=manifest, token=token)
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
                holders = getattr(self.worker.scheduler, SchedulerHandler.HOLDERS.value)
                digest = (await holders(context=self.context.name))["digest"]
        if digest is not None and manifest_digest(manifest) != digest:
            self._restart()
            if source == ORIGIN:
                raise TransferError(
                    f"the files of context {self.context.name!r} read from its origin {self.context.source} "
                    "differ from the copies other workers hold (the origin changed?)"
                )
            raise Corrupt(f"the files copied via {source} do not match the scheduler's manifest")
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
                raise Corrupt(f"the manifest of {peer} differs from the one the scheduler holds")
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
                raise Corrupt(f"{peer} lists other files than an earlier source")
            self.expected = expected
        if manifest["is_file"] is not None:
            if self.is_file is not None and manifest["is_file"] != self.is_file:
                raise Corrupt(f"{peer} disagrees with an earlier source on the context's layout")
            self.is_file = manifest["is_file"]
        for rel, meta in manifest["files"].items():
            if self.expected is not None and rel not in self.expected:
                raise Corrupt(f"{peer} lists {rel!r}, which is not a file of the context")
            if self.known.setdefault(rel, meta) != meta:
                raise Corrupt(f"{peer} describes {rel!r} differently than an earlier source")
        self._publish()

    async def _from_peer(self, peer: str, digest: str | None) -> None:
        """Copy what ``peer`` has; from a peer still copying, follow it until every file is here."""
        name, token = self.context.name, self.context.token
        manifest_of = getattr(self.worker.rpc(peer), WorkerHandler.MANIFEST.value)
        last_progress = time.monotonic()
        received = -1
        while True:
            raw = await asyncio.wait_for(manifest_of(context=name, token=token), self.timeout)
            manifest = check_manifest(raw)
            stamps = raw.get("origin") if not manifest["partial"] else None
            if isinstance(stamps, dict) and set(stamps) == set(manifest["files"]):
                self.stamps = {rel: dict(v) for rel, v in stamps.items() if isinstance(v, dict)}
            self._merge(manifest, peer, digest)
            copied = False
            for rel in sorted(manifest["files"]):
                if rel not in self.done:
                    await self._copy_from_peer(peer, rel)
                    copied = True
            if self._complete():
                return
            if not manifest["partial"]:
                raise Corrupt(f"{peer} claims a complete copy but lacks files")
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
            raise Corrupt(f"{rel!r} received from {sorted(partial.sources)} does not match its sha256")
        self.blocks[rel] = partial.block_digests()
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
        """Copy what is missing from the origin (:class:`~._origin.OriginCopy`), each file checked
        against the reference manifest when the coordinator has one (else the first read defines it);
        a file begun from a peer is resumed at the offset reached."""
        ctx = self.context
        if reference is not None:
            try:
                reference = check_manifest(reference)
            except TransferError:
                reference = None  # the coordinator validated it when it trusted it; be safe anyway
        if reference is not None and not reference["partial"]:
            self._adopt(reference)

        def count(n: int) -> None:
            self.bytes["origin"] += n

        copy = OriginCopy(
            ctx.source, ctx.storage_options, self.dest, self.settings, what=f"context {ctx.name!r}", on_bytes=count
        )
        listing = await asyncio.to_thread(copy.list)
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
        for rel in listing.files:
            if rel not in self.done:
                # known: from the reference or an earlier source's manifest
                got = await asyncio.to_thread(copy.fetch, rel, self.known.get(rel), self.partials.pop(rel, None))
                self.known[rel] = got
                self._file_done(rel)
        self.stamps = await asyncio.to_thread(copy.stamps)
        self.blocks.update(copy.blocks)


async def fetch_context(
    worker: Worker,
    context: Context,
    dest: str,
    settings: TransferSettings,
    server: ContextServer | None = None,
) -> FetchResult:
    """Make ``dest`` a complete, verified copy of ``context``'s files (on the worker's loop).

    Order: a complete earlier copy in ``dest``; else, when the scheduler
    coordinates transfers and ``settings.peers`` is on, the sources it hands
    out (peers, the origin when it must); else the origin directly. With
    ``server``, files are served to other workers as soon as they are verified.
    """
    cached = await asyncio.to_thread(cached_copy, context.source, dest, settings)
    coordinated = settings.peers and await coordinator_available(worker)
    if cached is not None:
        await _check_cached(worker, context, cached, dest, settings, coordinated)
        return cached
    if not coordinated:
        return await asyncio.to_thread(fetch_source, context.source, context.storage_options, dest, settings)
    return await Receiver(worker, context, dest, settings, server).run()


async def _check_cached(
    worker: Worker, context: Context, cached: FetchResult, dest: str, settings: TransferSettings, coordinated: bool
) -> None:
    """A complete copy from an earlier run, checked against the cluster's reference before it is used.

    The reference: the coordinator's manifest when it has one (the copies
    other workers hold), else the origin itself (the files it lists, their
    sizes and version markers, as recorded when the copy was made). An
    origin that cannot be asked leaves the copy usable (logged): nobody can
    read another version from it either.

    Raises
    ------
    TransferError
        The copy is not the version the cluster (or the origin) has now.
    """
    fix = (
        "to use the new version give the context a new name (or clear the cache directory, "
        "pervasive.worker.cache-dir); to keep the old one, restore it at the origin"
    )
    digest = None
    if coordinated:
        with contextlib.suppress(Exception):  # no answer: as without a reference
            holders = getattr(worker.scheduler, SchedulerHandler.HOLDERS.value)
            digest = (await holders(context=context.name))["digest"]
    if digest is not None:
        if manifest_digest(cached.manifest) != digest:
            raise TransferError(
                f"the cached copy of context {context.name!r} in {dest} on {worker.address} differs from "
                f"the copies other workers hold (the origin {context.source} changed?); {fix}"
            )
        return
    try:
        # One bounded attempt: a cached copy is what makes a worker independent of a slow or absent origin.
        once = dataclasses.replace(settings, retries=0)
        why = await asyncio.to_thread(origin_changed, cached.manifest, context.source, context.storage_options, once)
    except (OSError, ValueError) as exc:  # TransferError included: the origin could not be asked
        why = None
        logger.warning(
            "pervasive: could not check the cached copy of %r in %s against its origin (%s); using it",
            context.name,
            dest,
            exc,
        )
    if why is not None:
        raise TransferError(
            f"the origin {context.source} of context {context.name!r} changed since the cached copy in {dest} on "
            f"{worker.address} was made ({why}); {fix}"
        )


def peer_fetcher(
    worker: Worker, settings: TransferSettings, server: ContextServer | None = None
) -> Callable[[Context, str], FetchResult]:
    """A ``ContextCache`` fetcher that runs :func:`fetch_context` on the worker's loop.

    The cache calls it from task threads; the copy itself runs on the event
    loop, where the worker's rpc pool lives, with disk and origin I/O in
    threads.
    """
    from distributed.utils import sync

    def fetch(context: Context, dest: str) -> FetchResult:
        return sync(worker.loop, fetch_context, worker, context, dest, settings, server)

    return fetch
