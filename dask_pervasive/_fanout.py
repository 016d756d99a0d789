"""Fan-out of client helpers to every worker, tolerant of workers leaving mid-call.

The functions ``*_on_worker`` run on workers through ``client.run``;
:func:`run_on_workers` calls one on every (or the listed) worker and skips the
workers that left the cluster during the call instead of failing the whole
call, naming every other failing worker in its error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ._protocol import PLUGIN_NAME
from .errors import PervasiveError, PluginNotInstalledError
from .worker import plugin_on

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger("dask_pervasive.client")


# -- functions run on workers with client.run ---------------------------------
def snapshot_on_worker(dask_worker) -> list[dict]:
    plugin = plugin_on(dask_worker)
    return plugin.cache.snapshot() if plugin is not None else []


def tokens_on_worker(dask_worker) -> dict[str, str]:
    plugin = plugin_on(dask_worker)
    if plugin is None:
        return {}
    return {n: e.context.token for n, e in plugin.cache.entries.items()}


def describe_on_worker(name: str, dask_worker) -> str | None:
    plugin = plugin_on(dask_worker)
    entry = plugin.cache.entries.get(name) if plugin is not None else None
    return entry.context.describe() if entry is not None else None


def evict_on_worker(name: str, dask_worker) -> str:
    plugin = plugin_on(dask_worker)
    if plugin is None or name not in plugin.cache.entries:
        return "unknown"
    try:
        return "evicted" if plugin.cache.evict(name) else "not-resident"
    except RuntimeError:
        return "in-use"


async def prewarm_on_worker(name: str, dask_worker) -> str:
    plugin = plugin_on(dask_worker)
    if plugin is None:
        raise PluginNotInstalledError(
            f"ContextWorkerPlugin is not installed on worker {dask_worker.address}: "
            "call dask_pervasive.install(client, contexts) first"
        )
    await plugin.prewarm(name)
    return dask_worker.address


def running_workers(dask_scheduler) -> list[str]:
    """Workers neither closing nor gone."""
    return [a for a, ws in dask_scheduler.workers.items() if ws.status.name in ("running", "paused")]


#: Seconds a worker that failed a fan-out call with a connection error gets to leave the
#: scheduler's view before the error is raised as the worker's own.
_LEAVE_GRACE = 5.0


def _is_pervasive(exc: BaseException) -> bool:
    return isinstance(exc, PervasiveError)


def has_plugin_on_worker(dask_worker) -> bool:
    return plugin_on(dask_worker) is not None


def worker_plugin_names(dask_scheduler) -> list[str]:
    return list(dask_scheduler.worker_plugins)


def warm_map_on_scheduler(dask_scheduler) -> dict | None:
    plugin = dask_scheduler.plugins.get(PLUGIN_NAME)
    return plugin.where() if plugin is not None and hasattr(plugin, "where") else None


class WorkerList(list):
    """A list of worker addresses (what :func:`prewarm` returns), with ``left``.

    ``left`` lists the workers that left the cluster during the call: their
    part was skipped rather than failing the whole call.
    """

    left: list[str]

    def __init__(self, items: Iterable[str] = (), left: Iterable[str] = ()) -> None:
        super().__init__(items)
        self.left = sorted(left)


async def run_on_workers(client: Client, func, *args, workers: list[str] | None = None) -> tuple[dict, list[str]]:
    """``client.run`` that tolerates workers leaving mid-call.

    Returns ``({worker: result}, left)``: ``left`` names the workers that
    failed because they left (no longer known to the scheduler afterwards).
    Any other failure is raised; one that is not a dask_pervasive error (a
    connection error from a worker that is still there) is raised as
    :class:`~dask_pervasive.errors.PervasiveError` naming the worker.
    """
    replies = await client.run(func, *args, workers=workers, on_error="return")
    failed = {w: r for w, r in replies.items() if isinstance(r, BaseException)}
    if not failed:
        return replies, []
    # A worker that closes answers with a connection error (or, its plugin torn down, an
    # error of ours) a moment before the scheduler drops it: wait for that, bounded.
    deadline = asyncio.get_running_loop().time() + _LEAVE_GRACE
    while True:
        running = await client.run_on_scheduler(running_workers)
        left = sorted(w for w in failed if w not in running)
        undecided = [w for w in failed if w in running and not _is_pervasive(failed[w])]
        if not undecided or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    if left:
        logger.info("pervasive: %s left the cluster during %s; skipped", ", ".join(left), func.__name__)
    for w, exc in failed.items():
        if w not in left:
            if isinstance(exc, PervasiveError):
                raise exc
            raise PervasiveError(f"{func.__name__} failed on worker {w}: {type(exc).__name__}: {exc}") from exc
    return {w: r for w, r in replies.items() if w not in failed}, left
