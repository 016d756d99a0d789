"""The ``opportunistic`` scenario's disturbance: workers join and leave on a trace.

Opportunistic GPU allocations come and go: a batch system hands out workers,
preempts some, and the cluster gives idle ones back. The trace (:data:`TRACE`)
is a sequence of steps, each at a fraction of the jobs done:

``join k``
    ``cluster.scale(len(spec) + k)``: ``k`` cold workers join.
``preempt``
    SIGKILL of a seeded-random worker process, no warning; its nanny starts a
    cold replacement (a batch system granting a new allocation).
``leave k``
    The cluster gives ``k`` workers back the way Adaptive does, through the
    scheduler's choice (:func:`dask_pervasive.scale_down`: ``workers_to_close``,
    graceful retirement, spec update). Every strategy uses the same call; only
    pervasive's scheduler plugin makes the choice context-aware.

A step waits until the cluster has settled from the previous one (every spec
entry has a registered worker) and for ``preempt_gap_s`` since it.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from typing import Any

from dask_pervasive.bench.harness import Session, now
from dask_pervasive.bench.presets import Params

#: (fraction of jobs done, step, count)
TRACE: tuple[tuple[float, str, int], ...] = (
    (0.15, "join", 1),
    (0.30, "preempt", 1),
    (0.45, "leave", 2),
    (0.60, "join", 2),
    (0.75, "preempt", 1),
    (0.85, "leave", 1),
)


def _settled(session: Session, timeout: float = 60.0) -> dict[Any, Any] | None:
    """Nannies by name once every spec entry has a live, registered worker (None if the run ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not session.progress.finished.is_set():
        cluster = session.cluster
        live = {
            name: nanny
            for name, nanny in list(cluster.workers.items())
            if name in cluster.worker_spec and nanny.worker_address and nanny.pid is not None
        }
        registered = session.client.scheduler_info(n_workers=-1)["workers"]
        if len(live) >= len(cluster.worker_spec) and all(n.worker_address in registered for n in live.values()):
            return live
        time.sleep(0.05)
    return None


def warm_workers(session: Session) -> list[str]:
    """Workers where a model is loaded, as each strategy's own task records would say: pervasive's warm map,
    or (baselines) nothing known: ``[]``."""
    import dask_pervasive as dp

    try:
        return sorted({w for row in dp.where(session.client).values() for w in row["resident"]})
    except Exception:  # noqa: BLE001 - no pervasive plugin on this cluster
        return []


def opportunistic_action(session: Session, log: list[dict[str, Any]], params: Params) -> None:
    """Play :data:`TRACE` against the running strategy (in a thread, like the other disturbances)."""
    import dask_pervasive as dp

    rng = random.Random(params.seed)
    total = session.progress.total
    last = -math.inf
    for fraction, step, count in TRACE:
        if not session.progress.wait_for(math.ceil(fraction * total)):
            return
        nannies = _settled(session)
        if nannies is None or session.progress.finished.wait(max(0.0, last + params.preempt_gap_s - time.monotonic())):
            return
        entry: dict[str, Any] = {"t": now(), "step": step, "count": count, "done": session.progress.done}
        if step == "join":
            session.cluster.scale(len(session.cluster.worker_spec) + count)
        elif step == "preempt":
            name = rng.choice(sorted(nannies, key=str))
            entry["worker"] = nannies[name].worker_address
            os.kill(nannies[name].pid, signal.SIGKILL)
        elif step == "leave":
            before = warm_workers(session)
            entry["retired"] = dp.scale_down(session.client, count, cluster=session.cluster)
            entry["warm_before"] = before
            entry["warm_retired"] = sorted(set(before) & set(entry["retired"]))
        else:  # pragma: no cover - TRACE is fixed
            raise ValueError(step)
        last = time.monotonic()
        log.append(entry)
