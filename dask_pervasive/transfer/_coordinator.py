"""Scheduler side: where cold workers copy context files from (:class:`SourceCoordinator`).

Created by :class:`~dask_pervasive.ContextSchedulerPlugin`; workers ask it
through the scheduler handlers of
:class:`~dask_pervasive._protocol.SchedulerHandler`. While it runs, the
scheduler's metadata :data:`~dask_pervasive._protocol.METADATA_TRANSFER` is
set, which is how workers (:func:`coordinator_available`) know to ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._protocol import EVENT_TOPIC, LEAVING_STATUSES, METADATA_TRANSFER, Action, SchedulerHandler
from .._settings import TransferSettings
from ..errors import ConfigurationError, TransferError
from ._manifest import check_manifest, manifest_digest

if TYPE_CHECKING:
    from distributed import Scheduler, Worker

logger = logging.getLogger(__name__)

#: The origin as a source, in coordinator replies.
ORIGIN = "origin"
#: Coordinator reply: no source is free now, ask again.
WAIT = "wait"
_FAILED_HOLDER_COOLDOWN = 30.0  # seconds a holder whose upload failed is not offered again


async def coordinator_available(worker: Worker) -> bool:
    """Whether the scheduler runs a :class:`SourceCoordinator`.

    Workers check before asking: a missing scheduler handler would only log
    an error there.
    """
    try:
        found = await worker.scheduler.get_metadata(keys=list(METADATA_TRANSFER), default=None)
    except Exception:  # noqa: BLE001 - an old or unreachable scheduler: no coordination
        return False
    return found is not None


@dataclass
class Lease:
    """One copy in progress: ``receiver`` reads ``context`` from ``source``."""

    id: str
    context: str
    receiver: str
    source: str  #: a worker address or :data:`ORIGIN`
    #: a ``dask-peer://`` read of ``receiver`` (not a copy: it takes an upload slot, nothing else)
    read: bool = False


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
    waiting for a peer is cheaper than reading the origin again. A worker
    that is leaving (retiring, closing) still serves until it is removed, but
    other holders with a free slot are preferred to it. Slots of a worker
    that dies (as receiver or holder) are released.

    Parameters
    ----------
    scheduler
        The scheduler; handlers are added to it by :meth:`start`.
    warm
        ``{context: {worker: record with a .files flag}}``, the scheduler
        plugin's warm map (read only).
    settings
        The caps ``origin_max_concurrent`` and ``peer_max_uploads``, as the
        scheduler plugin was built with (default: ``pervasive.transfer.*``
        as set where the coordinator is created).

    Raises
    ------
    ConfigurationError
        A cap below 1.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        warm: Mapping[str, Mapping[str, Any]] | None = None,
        settings: TransferSettings | None = None,
    ) -> None:
        settings = settings if settings is not None else TransferSettings.from_config()
        for key in ("origin_max_concurrent", "peer_max_uploads"):
            value = getattr(settings, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                name = "pervasive.transfer." + key.replace("_", "-")
                raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}", name)
        self.scheduler = scheduler
        self.warm = warm if warm is not None else {}
        self.origin_max = settings.origin_max_concurrent
        self.peer_max = settings.peer_max_uploads
        self.leases: dict[str, Lease] = {}
        self.uploads: dict[str, int] = defaultdict(int)
        self.origin_active = 0
        self.complete: dict[str, set[str]] = defaultdict(set)  #: finished copies reported to us
        self.suspect: dict[str, set[str]] = defaultdict(set)  #: holders that served corrupt data
        self.cooling: dict[str, float] = {}  #: holder -> when it may serve again after a failed upload
        self.manifests: dict[str, tuple[str | None, str, dict]] = {}  #: context -> (token, digest, manifest)
        self._changed = asyncio.Event()

    def _handlers(self) -> dict[str, Any]:
        return {
            SchedulerHandler.ACQUIRE_SOURCE.value: self.acquire,
            SchedulerHandler.RELEASE_SOURCE.value: self.release,
            SchedulerHandler.HOLDERS.value: self.holders_handler,
        }

    def start(self) -> None:
        self.scheduler.handlers.update(self._handlers())
        self.scheduler.set_metadata(list(METADATA_TRANSFER), {"peer_max_uploads": self.peer_max})

    def close(self) -> None:
        for name in self._handlers():
            self.scheduler.handlers.pop(name, None)
        with contextlib.suppress(KeyError, TypeError, AttributeError):
            del self.scheduler.task_metadata[METADATA_TRANSFER[0]][METADATA_TRANSFER[1]]
        self._notify()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # -- state -------------------------------------------------------------------------
    def _leaving(self, worker: str) -> bool:
        ws = self.scheduler.workers.get(worker)
        return ws is not None and ws.status.name in LEAVING_STATUSES

    def holders(self, context: str) -> list[str]:
        """Workers with a complete, trusted copy of ``context``: staying ones first, then fewest uploads."""
        alive = self.scheduler.workers
        found = {w for w, rec in self.warm.get(context, {}).items() if getattr(rec, "files", False)}
        found |= self.complete.get(context, set())
        found -= self.suspect.get(context, set())
        now = time.monotonic()
        found = {w for w in found if w in alive and self.cooling.get(w, 0.0) <= now}
        return sorted(found, key=lambda w: (self._leaving(w), self.uploads.get(w, 0), w))

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
        source_of = {
            lease.receiver: lease.source
            for lease in self.leases.values()
            if lease.context == context and not lease.read
        }
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
            # A leaving holder serves only when no staying one has a free slot.
            return self._least_loaded([h for h in free if not self._leaving(h)] or free, self.uploads)
        depth = self._copying(context, worker, exclude)
        free = [c for c in depth if self.uploads.get(c, 0) < self.peer_max]
        free = [c for c in free if not self._leaving(c)] or free
        if free:
            # Shallowest first: a breadth-first tree stays log(n) deep, which matters for
            # contexts of one big file (a follower waits for each whole file upstream).
            top = min(depth[c] for c in free)
            return self._least_loaded([c for c in free if depth[c] == top], self.uploads)
        others = any(
            lease.context == context and lease.receiver != worker and not lease.read for lease in self.leases.values()
        )
        if not usable and not others and self.origin_active < self.origin_max:
            return ORIGIN
        return WAIT

    def _lease(self, context: str, worker: str, source: str, read: bool = False) -> Lease:
        lease = Lease(uuid.uuid4().hex, context, worker, source, read)
        self.leases[lease.id] = lease
        if source == ORIGIN:
            self.origin_active += 1
        else:
            self.uploads[source] += 1
        self.scheduler.log_event(
            EVENT_TOPIC,
            {
                "action": Action.TRANSFER_SOURCE.value,
                "context": context,
                "receiver": worker,
                "source": source,
                "complete": source == ORIGIN or source in self.holders(context),
                "read": read,
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
        read: bool = False,
    ) -> dict:
        """Handler ``pervasive_acquire_source``.

        Returns ``{"source": <peer address> | "origin" | "wait", "lease":
        id | None, "digest": manifest digest | None}`` (plus ``"manifest"``,
        the reference, when the source is the origin and one is known); with
        ``wait``, holds the request up to that many seconds for a source to
        become free. With ``read`` (a ``dask-peer://`` read), the source is a
        complete holder with a free upload slot (the worker itself included),
        ``"wait"`` while all are busy, or ``None`` when nobody holds the
        context; such leases may be many per worker and are not copies.
        """
        exclude = set(exclude or ())
        deadline = time.monotonic() + float(wait or 0)
        if read:
            return await self._acquire_read(context, worker, token, exclude, deadline)
        # A worker copies a context from one source at a time: a lease it still
        # holds for it was lost on the way back (failed release), so free it.
        for old in [
            lease
            for lease in self.leases.values()
            if (lease.context, lease.receiver) == (context, worker) and not lease.read
        ]:
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

    async def _acquire_read(
        self, context: str, worker: str, token: str | None, exclude: set[str], deadline: float
    ) -> dict:
        while True:
            changed = self._changed
            if worker not in self.scheduler.workers:
                return {"source": WAIT, "lease": None, "digest": None}
            usable = [h for h in self.holders(context) if h not in exclude]
            if not usable:
                return {"source": None, "lease": None, "digest": None}
            free = [h for h in usable if self.uploads.get(h, 0) < self.peer_max]
            if free:
                known = self.manifests.get(context)
                digest = known[1] if known is not None and (token is None or known[0] in (None, token)) else None
                lease = self._lease(context, worker, self._least_loaded(free, self.uploads), read=True)
                return {"source": lease.source, "lease": lease.id, "digest": digest}
            left = deadline - time.monotonic()
            if left <= 0:
                return {"source": WAIT, "lease": None, "digest": None}
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
        if ok and not entry.read:
            self.complete[entry.context].add(entry.receiver)
            if manifest is not None and entry.context not in self.manifests:
                # Trust on first use: the first complete copy defines the context's files.
                try:
                    checked = check_manifest(manifest)
                    if checked["partial"]:
                        raise TransferError("partial manifest")
                    reference = {"is_file": checked["is_file"], "files": checked["files"]}
                    digest = manifest_digest(reference)
                    if checked["blocks"]:  # not in the digest: what ranged readers check against
                        reference["blocks"] = checked["blocks"]
                    self.manifests[entry.context] = (token, digest, reference)
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
        return {
            "holders": self.holders(context),
            "digest": known[1] if known else None,
            "blocks": known[2].get("blocks", {}) if known else {},
        }

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
