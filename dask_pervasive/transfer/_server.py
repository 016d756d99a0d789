"""Worker side, serving: the files of this worker's context copies, to peers.

Handlers :attr:`~dask_pervasive._protocol.WorkerHandler.MANIFEST` and
:attr:`~dask_pervasive._protocol.WorkerHandler.READ`, over Dask's own comms
(no new port; ``distributed.security`` TLS applies).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from distributed.protocol import to_serialize

from .._protocol import WorkerHandler
from ..errors import TransferError
from ._manifest import MANIFEST, is_count, read_manifest, resolve_file

if TYPE_CHECKING:
    from distributed import Worker

    from .._settings import TransferSettings
    from ..cache import ContextCache
    from ._receiver import Receiver

logger = logging.getLogger(__name__)


class ContextServer:
    """Serve files of this worker's context copies to peers.

    Only files listed in the manifest of a complete copy of a declared
    context (or, while this worker copies it, files already verified) are
    served, resolved strictly inside that copy's directory
    (:func:`~._manifest.resolve_file`): ``..``, absolute paths, ``\\``,
    symlinks leading out of the directory, unlisted files, unknown contexts
    and malformed ranges are refused with a logged warning and a
    :class:`~dask_pervasive.TransferError` to the caller. Reads are capped
    at ``settings.chunk_size`` bytes.
    """

    def __init__(self, worker: Worker, cache: ContextCache, settings: TransferSettings) -> None:
        self.worker = worker
        self.cache = cache
        self.chunk_size = settings.chunk_size
        #: copies in progress on this worker, by context: their verified files are served too
        self.in_progress: dict[str, Receiver] = {}
        self._capped: set[tuple[Any, Any]] = set()  #: (caller, context) told about the chunk cap

    def install(self) -> None:
        self.worker.handlers[WorkerHandler.MANIFEST.value] = self.manifest
        self.worker.handlers[WorkerHandler.READ.value] = self.read

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
            full, _ = resolve_file(dest, manifest, path)
            if not is_count(offset) or not (length is None or (is_count(length) and length > 0)):
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
