"""Helpers for the worker-fault tests: contexts, tasks and a scheduler-state probe.

Everything here is importable on spawned worker processes (their ``sys.path``
is the test process's), so tasks and loaders live here and not in test modules.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterable

import dask_pervasive as dp

CONTEXT = "faulty"
#: Prefixes of worker addresses; any string in scheduler-plugin state that starts with one is a worker reference.
_ADDRESS_PREFIXES = ("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")
#: Plugin attributes that hold no per-worker state of ours (the scheduler, asyncio objects).
_SKIP = {"scheduler", "_callback", "_background", "_changed", "warm_ref"}


def load_files_slow(path, device, seconds=0.4):
    """Read the context's (copied) files, then pretend to build a model for ``seconds``."""
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                total += len(f.read())
    time.sleep(seconds)
    return {"value": 1, "bytes": total, "pid": os.getpid()}


def load_array_mb(path, device, mb=4, seconds=0.2):
    """A context of ``mb`` MiB (numpy) whose load costs ``seconds``; reads its files when it has a source."""
    import numpy as np

    if path is not None:
        load_files_slow(path, device, seconds=0)
    time.sleep(seconds)
    return {"value": 1, "data": np.ones(mb * 2**20 // 8)}


def make_source(root, files: int = 2, size: int = 256 * 1024) -> str:
    """A directory of ``files`` files of ``size`` bytes; returns its ``file://`` URL."""
    os.makedirs(root, exist_ok=True)
    for i in range(files):
        with open(os.path.join(root, f"part-{i}.bin"), "wb") as f:
            f.write(bytes([i % 251]) * size)
    return f"file://{root}"


def run_task(model, x, seconds=0.01):
    """A cheap context task: returns its input, its result and the worker that computed it."""
    from distributed import get_worker

    time.sleep(seconds)
    worker = get_worker()
    worker.log_event("fault-exec", {"x": x})  # side channel: counts executions (lost with killed workers)
    return x, model["value"] + x, worker.address


def context_task(name: str):
    """``run_task`` declared to use context ``name`` (for tests with several contexts)."""
    return dp.uses_context(name)(run_task)


def pid_of_worker() -> int:
    return os.getpid()


def sigkill(client, address: str) -> int:
    """SIGKILL the process of worker ``address`` (no goodbye, as a preempted node); returns its pid."""
    pid = client.run(pid_of_worker, workers=[address])[address]
    os.kill(pid, signal.SIGKILL)
    return pid


def _walk(obj, path: str, out: dict[str, set[str]], depth: int = 0) -> None:
    if depth > 8:
        return
    if isinstance(obj, str):
        if obj.startswith(_ADDRESS_PREFIXES):
            out.setdefault(obj, set()).add(path)
        return
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            _walk(k, f"{path}[key]", out, depth + 1)
            _walk(v, f"{path}[{k!r}]", out, depth + 1)
    elif isinstance(obj, (set, frozenset, list, tuple)):
        for v in list(obj):
            _walk(v, f"{path}[]", out, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _walk(getattr(obj, f.name), f"{path}.{f.name}", out, depth + 1)


def worker_references(dask_scheduler) -> dict:
    """Every worker address held anywhere in the scheduler plugin's state (and its SourceCoordinator).

    Walks all attributes (dicts, sets, lists, dataclass records), so state
    added later is covered too. Returns ``{"alive", "refs", "stale", ...}``
    where ``stale`` maps dead addresses to where they were found.
    """
    plugin = dask_scheduler.plugins["pervasive"]
    refs: dict[str, set[str]] = {}
    for attr, value in vars(plugin).items():
        if attr not in _SKIP and attr != "transfer":
            _walk(value, f"plugin.{attr}", refs)
    transfer = plugin.transfer
    if transfer is not None:
        for attr, value in vars(transfer).items():
            if attr not in _SKIP and attr != "warm":  # warm is the plugin's own map
                _walk(value, f"transfer.{attr}", refs)
    alive = set(dask_scheduler.workers)
    loading = {
        name: sorted(a for a, wc in states.items() if wc.state in ("fetching", "loading"))
        for name, states in plugin.warm.items()
    }
    return {
        "alive": sorted(alive),
        "stale": {a: sorted(where) for a, where in refs.items() if a not in alive},
        "loading": loading,
        "members": {n: sorted(p.members) for n, p in plugin.plans.items()},
        "pending": {n: len(p.pending) for n, p in plugin.plans.items()},
        "task_context": len(plugin.task_context),
        "load_seconds": {n: p.load_seconds for n, p in plugin.plans.items()},
        "leases": len(transfer.leases) if transfer is not None else 0,
        "origin_active": transfer.origin_active if transfer is not None else 0,
        "uploads": dict(transfer.uploads) if transfer is not None else {},
        "background": len(plugin._background),
        "budgets": sorted(plugin.budgets),
    }


def assert_no_dead_worker_state(client, timeout: float = 20.0) -> dict:
    """Wait until the plugin's state names only live workers and no transfer slot is held; return the probe."""
    deadline = time.monotonic() + timeout
    while True:
        state = client.run_on_scheduler(worker_references)
        clean = (
            not state["stale"]
            and state["leases"] == 0
            and state["origin_active"] == 0
            and not any(state["uploads"].values())
        )
        if clean or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not state["stale"], f"scheduler plugin still references dead workers: {state['stale']}"
    assert state["leases"] == 0 and state["origin_active"] == 0, state
    assert not any(state["uploads"].values()), state["uploads"]
    return state


def wait_for_drained(client, timeout: float = 20.0) -> dict:
    """Wait until the plugin forgets every task (futures released); return the probe."""
    deadline = time.monotonic() + timeout
    while True:
        state = client.run_on_scheduler(worker_references)
        if (state["task_context"] == 0 and not any(state["pending"].values())) or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def running_workers(client) -> list[str]:
    info = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(a for a, w in info.items() if w.get("status", "running") == "running")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02, describe=None) -> None:
    """Poll ``predicate`` until true; on timeout fail naming ``what`` (and ``describe()``: the state seen)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            seen = f"; seen: {describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{seen}")
        time.sleep(interval)


def collect_once(futures: Iterable, timeout: float = 120) -> dict[int, tuple]:
    """Gather results as they complete, asserting each input's result arrives exactly once."""
    from distributed import as_completed

    out: dict[int, tuple] = {}
    for fut in as_completed(list(futures), timeout=timeout):
        x, value, worker = fut.result()
        assert x not in out, f"result for input {x} arrived twice"
        out[x] = (value, worker)
    return out
