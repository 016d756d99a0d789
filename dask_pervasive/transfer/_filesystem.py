"""The ``dask-peer`` fsspec filesystem: context files held by Dask workers, read from inside tasks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.callbacks import DEFAULT_CALLBACK
from fsspec.spec import AbstractBufferedFile

from .._protocol import PLUGIN_NAME, SchedulerHandler, WorkerHandler
from .._settings import TransferSettings
from ..errors import TransferError
from ._coordinator import WAIT, coordinator_available
from ._manifest import Corrupt, check_manifest, manifest_digest
from ._parts import BLOCK_SIZE, LocalWriteError, PartialFile
from ._stream import stream_from_peer

if TYPE_CHECKING:
    from distributed import Worker


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
    by the next one at the same offset. Every byte returned is verified:
    whole-file reads (``cat_file`` without range, ``get_file``) against the
    manifest's sha256, ranged reads (and ``open(...).read(n)``) against the
    sha256 of each :data:`~._parts.BLOCK_SIZE` block they touch (the blocks
    are read whole; a copy without block digests is read whole). With the
    scheduler's coordinator, each read takes one of the holder's upload slots
    (``pervasive.transfer.peer-max-uploads``), like a peer copy, and the block
    digests are the coordinator's reference (see ``docs/security.md``).

    Parameters
    ----------
    peers
        Worker addresses to read from, in order. Default: the holders the
        scheduler knows (needs :class:`~dask_pervasive.ContextSchedulerPlugin`).
    worker
        The local worker. Default: the worker running the current task.
    timeout
        Seconds a silent peer is waited for (default: ``settings.stall_timeout``).
    settings
        Chunk size and stall timeout (default: ``pervasive.transfer.*`` as
        set where the file system is created).

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
        settings: TransferSettings | None = None,
        **kwargs: Any,
    ) -> None:
        worker = worker if worker is not None else _current_worker()
        if not kwargs.get("asynchronous"):
            kwargs.setdefault("loop", worker.loop.asyncio_loop)
        super().__init__(**kwargs)
        self.worker = worker
        self.peers = list(peers) if peers is not None else None
        settings = settings if settings is not None else TransferSettings.from_config()
        self.chunk_size = settings.chunk_size
        self.timeout = timeout if timeout is not None else settings.stall_timeout
        self._contexts: dict[str, tuple[dict, list[str]]] = {}
        self._blocks: dict[str, dict[str, list[str]]] = {}  #: context -> block digests to check against
        self._coordinated: bool | None = None

    # -- helpers ----------------------------------------------------------------------
    def _split(self, path: str) -> tuple[str, str]:
        path = self._strip_protocol(path)
        context, _, rel = path.partition("/")
        return context, rel.strip("/")

    def _declared(self) -> dict:
        """The contexts declared on this worker (its plugin's cache entries), by name."""
        return getattr(getattr(self.worker.plugins.get(PLUGIN_NAME), "cache", None), "entries", {})

    def _token(self, context: str) -> str | None:
        entry = self._declared().get(context)
        return entry.context.token if entry is not None else None

    async def _ask_holders(self, context: str | None = None) -> dict:
        return await getattr(self.worker.scheduler, SchedulerHandler.HOLDERS.value)(context=context)

    async def _holders(self, context: str) -> tuple[list[str], str | None, dict]:
        if self.peers is not None:
            return list(self.peers), None, {}
        if not await coordinator_available(self.worker):
            raise TransferError(
                "dask-peer:// needs dask_pervasive.ContextSchedulerPlugin on the scheduler to find workers "
                "holding a context (dask_pervasive.install(client, ...)), or pass peers=[addresses]"
            )
        self._coordinated = True
        reply = await self._ask_holders(context)
        return list(reply["holders"]), reply["digest"], dict(reply.get("blocks") or {})

    async def _context(self, context: str) -> tuple[dict, list[str]]:
        """Manifest of ``context`` and the peers to read it from (first: the one that sent it)."""
        if context in self._contexts:
            return self._contexts[context]
        holders, digest, reference_blocks = await self._holders(context)
        if not holders:
            raise FileNotFoundError(f"dask-peer://{context}: no worker holds a complete copy of context {context!r}")
        errors = []
        for i, peer in enumerate(holders):
            try:
                raw = await asyncio.wait_for(
                    getattr(self.worker.rpc(peer), WorkerHandler.MANIFEST.value)(
                        context=context, token=self._token(context)
                    ),
                    self.timeout,
                )
                manifest = check_manifest(raw)
                if manifest["partial"]:
                    raise TransferError("its copy is still incomplete")
                if digest is not None and manifest_digest(manifest) != digest:
                    raise Corrupt("manifest differs from the scheduler's")
            except Exception as exc:  # noqa: BLE001 - try the next holder
                errors.append(f"{peer}: {exc}")
                continue
            found = self._contexts[context] = (manifest, holders[i:] + holders[:i])
            # the reference's block digests where the coordinator has them, else the holder's own
            self._blocks[context] = reference_blocks if digest is not None else manifest["blocks"]
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
                names = list((await self._ask_holders())["contexts"])
            else:
                names = sorted(self._declared())
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

    async def _source(self, context: str, peers: list[str], exclude: set[str]) -> tuple[str | None, str | None]:
        """The next peer to read from and its lease: with the coordinator, a holder with a free upload
        slot (waiting while all are busy); else the next of ``peers``. ``(None, None)``: none left."""
        if not self._coordinated:
            left = [p for p in peers if p not in exclude]
            return (left[0], None) if left else (None, None)
        acquire = getattr(self.worker.scheduler, SchedulerHandler.ACQUIRE_SOURCE.value)
        while True:
            reply = await acquire(
                context=context,
                worker=self.worker.address,
                token=self._token(context),
                exclude=sorted(exclude),
                wait=1.0,
                read=True,
            )
            if not isinstance(reply, dict):
                return None, None
            if reply["source"] != WAIT:
                return reply["source"], reply["lease"]

    async def _release(self, lease: str | None, failed: bool = False, bad: bool = False) -> None:
        if lease is not None:
            release = getattr(self.worker.scheduler, SchedulerHandler.RELEASE_SOURCE.value)
            with contextlib.suppress(Exception):
                await release(lease=lease, ok=False, bad=bad, failed=failed)

    async def _read_verified(self, path: str, start: int, end: int, sink: Any, verb: str, expect: dict) -> Any:
        """Stream ``[start, end)`` of ``path`` into a fresh ``sink()`` and commit it if it checks out.

        ``expect``: ``{"sha256": ...}`` (the whole file) or ``{"blocks": [...], "first": i}``
        (block-aligned range starting at block ``i``). A failing peer is replaced by the next at the
        offset reached; data that does not check out is read again into a new sink from other peers
        (one that alone sent it is reported to the coordinator as bad).
        """
        context, rel, _, peers = await self._meta(path)
        errors: list[str] = []
        exclude: set[str] = set()
        for _ in range(len(peers) + 1):
            into = await sink()
            used: list[str] = []
            leases: list[str | None] = []
            ok = False
            try:
                while into.offset < end - start:
                    peer, lease = await self._source(context, peers, exclude)
                    if peer is None:
                        break
                    used.append(peer)
                    leases.append(lease)
                    try:
                        await stream_from_peer(
                            self.worker,
                            peer,
                            context=context,
                            path=rel,
                            start=start + into.offset,
                            end=end,
                            absorb=into.absorb,
                            token=self._token(context),
                            chunk_size=self.chunk_size,
                            timeout=self.timeout,
                        )
                    except LocalWriteError:
                        raise  # the caller's disk, not the peer
                    except Exception as exc:  # noqa: BLE001 - resume from the next peer
                        errors.append(f"{peer}: {type(exc).__name__}: {exc}")
                        exclude.add(peer)
                        await self._release(leases.pop(), failed=True)
                if into.offset < end - start:
                    break  # every peer failed
                ok = await into.commit(expect)
                if ok:
                    return into
                errors.append(f"{used}: data does not match the manifest's sha256")
                exclude.update(used)
            finally:
                alone = len(set(used)) == 1
                for lease in leases:
                    await self._release(lease, bad=not ok and alone and into.offset >= end - start)
                await into.discard()  # no-op after a commit
        raise TransferError(f"could not {verb} dask-peer://{context}/{rel}: {'; '.join(errors)}")

    async def _cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        context, rel, meta, _ = await self._meta(path)
        size = meta["size"]
        start = 0 if start is None else (max(0, size + start) if start < 0 else min(start, size))
        end = size if end is None else (max(0, size + end) if end < 0 else min(end, size))
        if end <= start:
            return b""
        blocks = self._blocks.get(context, {}).get(rel)
        if (start, end) != (0, size) and blocks:
            # the blocks the range touches, read whole and checked one by one
            first, lo, hi = (
                start // BLOCK_SIZE,
                start // BLOCK_SIZE * BLOCK_SIZE,
                min(size, -(-end // BLOCK_SIZE) * BLOCK_SIZE),
            )
            expect: dict = {"blocks": blocks, "first": first}
        else:  # the whole file (also for a range of a copy without block digests), checked by its sha256
            lo, hi, expect = 0, size, {"sha256": meta["sha256"]}

        async def sink() -> _Memory:
            return _Memory()

        data = (await self._read_verified(path, lo, hi, sink, "read", expect)).data
        return bytes(data[start - lo : end - lo])

    async def _get_file(self, rpath: str, lpath: str, callback=DEFAULT_CALLBACK, **kwargs: Any) -> None:
        if (await self._info(rpath))["type"] == "directory":
            await asyncio.to_thread(os.makedirs, lpath, exist_ok=True)
            return
        _, _, meta, _ = await self._meta(rpath)
        callback.set_size(meta["size"])

        async def sink() -> _LocalFile:
            # temporary name next to lpath, renamed once the sha256 matches
            return _LocalFile(await asyncio.to_thread(PartialFile, os.fspath(lpath)), callback)

        await self._read_verified(rpath, 0, meta["size"], sink, "copy", {"sha256": meta["sha256"]})

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, **kwargs: Any) -> PeerFile:
        if mode != "rb":
            raise NotImplementedError("dask-peer:// is read-only")
        return PeerFile(self, path, mode, block_size=block_size or self.chunk_size, **kwargs)


class _Memory:
    """Where :meth:`PeerFileSystem._cat_file` collects bytes."""

    def __init__(self) -> None:
        self.data = bytearray()

    @property
    def offset(self) -> int:
        return len(self.data)

    async def absorb(self, data: bytes) -> None:
        self.data.extend(data)

    async def commit(self, expect: dict) -> bool:
        if "sha256" in expect:
            return hashlib.sha256(self.data).hexdigest() == expect["sha256"]
        blocks, first = expect["blocks"], expect["first"]
        view = memoryview(self.data)
        for i in range(0, len(view), BLOCK_SIZE):
            n = first + i // BLOCK_SIZE
            if n >= len(blocks) or hashlib.sha256(view[i : i + BLOCK_SIZE]).hexdigest() != blocks[n]:
                return False
        return True

    async def discard(self) -> None:
        pass


class _LocalFile:
    """Where :meth:`PeerFileSystem._get_file` writes: a temporary file, renamed into place when verified."""

    def __init__(self, partial: PartialFile, callback: Any) -> None:
        self.partial = partial
        self.callback = callback

    @property
    def offset(self) -> int:
        return self.partial.offset

    async def absorb(self, data: bytes) -> None:
        await asyncio.to_thread(self.partial.absorb, data)
        self.callback.relative_update(len(data))

    async def commit(self, expect: dict) -> bool:
        return await asyncio.to_thread(self.partial.commit, expect["sha256"])

    async def discard(self) -> None:
        await asyncio.to_thread(self.partial.discard)


fsspec.register_implementation(PeerFileSystem.protocol, PeerFileSystem, clobber=True)
