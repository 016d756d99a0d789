"""Worker side, reading: a byte range of a context file streamed from a peer, in chunks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .._protocol import WorkerHandler
from ._manifest import Corrupt

if TYPE_CHECKING:
    from distributed import Worker


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
    chunk_size: int,
    timeout: float,
    token: str | None = None,
    window: int = 2,
) -> None:
    """Read bytes ``[start, end)`` of a context file from ``peer``, in chunks, in order.

    Up to ``window`` chunk requests of ``chunk_size`` bytes are in flight
    while ``absorb`` handles the current chunk (the peer reads its disk while
    this worker writes); a peer that serves smaller chunks is re-planned for.
    A peer silent for ``timeout`` seconds raises ``TimeoutError``; an empty
    or oversized reply raises :class:`~dask_pervasive.TransferError`.
    """
    read = getattr(worker.rpc(peer), WorkerHandler.READ.value)
    pending: list[tuple[int, int, asyncio.Future]] = []  # (offset, length, reply), in offset order
    requested = offset = start

    def fill() -> None:
        nonlocal requested
        while len(pending) < window and requested < end:
            n = min(chunk_size, end - requested)
            call = read(context=context, path=path, offset=requested, length=n, token=token)
            pending.append((requested, n, asyncio.ensure_future(asyncio.wait_for(call, timeout))))
            requested += n

    try:
        fill()
        while pending:
            at, expected, reply = pending.pop(0)
            data = await reply
            if not isinstance(data, (bytes, bytearray, memoryview)) or not 0 < len(data) <= expected:
                got = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else type(data).__name__
                raise Corrupt(f"{peer} sent {got} bytes of {path!r} at offset {at}, expected {expected}")
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
