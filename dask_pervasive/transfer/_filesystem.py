"""The ``dask-peer`` fsspec filesystem: context files held by Dask workers, read from inside tasks."""

from __future__ import annotations

import asyncio
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
from ._coordinator import coordinator_available
from ._manifest import Corrupt, check_manifest, manifest_digest
from ._parts import LocalWriteError, PartialFile
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

    async def _holders(self, context: str) -> tuple[list[str], str | None]:
        if self.peers is not None:
            return list(self.peers), None
        if not await coordinator_available(self.worker):
            raise TransferError(
                "dask-peer:// needs dask_pervasive.ContextSchedulerPlugin on the scheduler to find workers "
                "holding a context (dask_pervasive.install(client, ...)), or pass peers=[addresses]"
            )
        reply = await self._ask_holders(context)
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

    async def _read_verified(self, path: str, start: int, end: int, sink: Any, verb: str) -> Any:
        """Stream ``[start, end)`` of ``path`` into a fresh ``sink()`` and commit it.

        A failing peer is replaced by the next at the offset reached; a whole
        file that does not match the manifest's sha256 is read again into a
        new sink, the next peer first (ranged reads are not verified).
        """
        context, rel, meta, peers = await self._meta(path)
        sha256 = meta["sha256"] if (start, end) == (0, meta["size"]) else None
        errors: list[str] = []
        for i in range(len(peers)):
            order = peers[i:] + peers[:i]
            into = await sink()
            try:
                for peer in order:
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
                        break
                    except LocalWriteError:
                        raise  # the caller's disk, not the peer
                    except Exception as exc:  # noqa: BLE001 - resume from the next peer
                        errors.append(f"{peer}: {type(exc).__name__}: {exc}")
                else:
                    break  # every peer failed
                if await into.commit(sha256):
                    return into
                errors.append(f"{order[0]}: data does not match the manifest's sha256")
            finally:
                await into.discard()  # no-op after a commit
        raise TransferError(f"could not {verb} dask-peer://{context}/{rel}: {'; '.join(errors)}")

    async def _cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        _, _, meta, _ = await self._meta(path)
        size = meta["size"]
        start = 0 if start is None else (max(0, size + start) if start < 0 else min(start, size))
        end = size if end is None else (max(0, size + end) if end < 0 else min(end, size))
        if end <= start:
            return b""

        async def sink() -> _Memory:
            return _Memory()

        return bytes((await self._read_verified(path, start, end, sink, "read")).data)

    async def _get_file(self, rpath: str, lpath: str, callback=DEFAULT_CALLBACK, **kwargs: Any) -> None:
        if (await self._info(rpath))["type"] == "directory":
            await asyncio.to_thread(os.makedirs, lpath, exist_ok=True)
            return
        _, _, meta, _ = await self._meta(rpath)
        callback.set_size(meta["size"])

        async def sink() -> _LocalFile:
            # temporary name next to lpath, renamed once the sha256 matches
            return _LocalFile(await asyncio.to_thread(PartialFile, os.fspath(lpath)), callback)

        await self._read_verified(rpath, 0, meta["size"], sink, "copy")

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, **kwargs: Any) -> AbstractBufferedFile:
        if mode != "rb":
            raise NotImplementedError("dask-peer:// is read-only")
        return AbstractBufferedFile(self, path, mode, block_size=block_size or self.chunk_size, **kwargs)


class _Memory:
    """Where :meth:`PeerFileSystem._cat_file` collects bytes."""

    def __init__(self) -> None:
        self.data = bytearray()

    @property
    def offset(self) -> int:
        return len(self.data)

    async def absorb(self, data: bytes) -> None:
        self.data.extend(data)

    async def commit(self, sha256: str | None) -> bool:
        return sha256 is None or hashlib.sha256(self.data).hexdigest() == sha256

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

    async def commit(self, sha256: str | None) -> bool:
        return await asyncio.to_thread(self.partial.commit, sha256)

    async def discard(self) -> None:
        await asyncio.to_thread(self.partial.discard)


fsspec.register_implementation(PeerFileSystem.protocol, PeerFileSystem, clobber=True)
