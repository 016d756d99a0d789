"""Scenarios: what runs, on how many workers, with which disturbance, and what is measured.

Every strategy of a scenario runs the same jobs on a fresh
``LocalCluster(n_workers, threads_per_worker=1, processes=True)``, reading the
same origin (its byte counter reset per run). A job is a batch of (claim,
evidence) items scored with one model. Sizes, origin caps and the strategies
each preset runs are in :data:`~dask_pervasive.bench.presets.PRESETS`.

``steady``
    One model, many jobs.
``multi``
    ``multi_contexts`` models (same size, different weights) in a seeded
    random job order; each worker's context budget fits ``multi_fit`` of
    them (the cluster as a whole fits all of them, no single worker does).
    global-cache and actors get an LRU cache of the same capacity in bytes.
``preempt``
    One model; after each fraction ``preempt_kills`` of the jobs is done, a
    random worker (seeded choice among the nannies) gets SIGKILL; its nanny
    starts a cold replacement. A kill waits for the previous replacement to
    join and for ``preempt_gap_s`` since the previous kill.
``scale-out``
    One model; the cluster starts with one worker and ``cluster.scale``
    grows it to ``scale_to`` once ``scale_at`` of the jobs are done. Time to
    warm: from a new worker joining to its first load finishing.
``opportunistic``
    One model; workers join, are preempted and are given back on a trace
    (:mod:`~dask_pervasive.bench.opportunistic`).
``batch-sweep``
    The same items scored at each batch size of ``sweep_batches``, one
    cluster per strategy, every worker warmed first (untimed: this measures
    warm throughput; cold starts are ``steady``'s business).
"""

from __future__ import annotations

import functools
import math
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dask_pervasive.bench import ray_strategies
from dask_pervasive.bench.harness import (
    Job,
    Model,
    Progress,
    Session,
    fresh_cluster,
    now,
    pervasive_loads,
    pervasive_transfers,
    worker_timeline,
)
from dask_pervasive.bench.opportunistic import opportunistic_action
from dask_pervasive.bench.presets import Params
from dask_pervasive.bench.strategies import make_strategy
from dask_pervasive.bench.workload import batches, make_items


@dataclass
class Env:
    """What all scenarios share: the origin and the models."""

    origin: Any
    models: list[Model]
    model_nbytes: int  #: parameter bytes of one loaded model (as dask_pervasive measures it)

    def session(self, cluster: Any, client: Any, capacity: int | None, n_jobs: int) -> Session:
        return Session(cluster, client, self.origin, {m.name: m for m in self.models}, capacity, Progress(n_jobs))


# -- disturbances (run in a thread during a timed run) -----------------------------------------------
def preempt_action(session: Session, log: list[dict[str, Any]], params: Params) -> None:
    """SIGKILL a seeded-random worker after each fraction ``preempt_kills`` of the jobs is done.

    A kill also waits until the previous replacement has joined and
    ``preempt_gap_s`` have passed since the previous kill, so that every
    strategy's replacement had time to load before the next preemption.
    """
    rng = random.Random(params.seed)
    total = session.progress.total
    last = -math.inf
    for fraction in params.preempt_kills:
        if not session.progress.wait_for(math.ceil(fraction * total)):
            return
        nannies = _wait_for_full_cluster(session, params.workers)
        if nannies is None or session.progress.finished.wait(max(0.0, last + params.preempt_gap_s - time.monotonic())):
            return
        name = rng.choice(sorted(nannies, key=str))
        nanny = nannies[name]
        os.kill(nanny.pid, signal.SIGKILL)
        last = time.monotonic()
        log.append({"t": now(), "worker": nanny.worker_address, "name": str(name), "done": session.progress.done})


def _wait_for_full_cluster(session: Session, n: int, timeout: float = 60.0) -> dict[Any, Any] | None:
    """Nannies by name once all ``n`` worker processes are up (None if the run ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not session.progress.finished.is_set():
        live = {
            name: nanny
            for name, nanny in list(session.cluster.workers.items())
            if nanny.worker_address and nanny.pid is not None
        }
        registered = session.client.scheduler_info(n_workers=-1)["workers"]
        if len(live) >= n and all(nanny.worker_address in registered for nanny in live.values()):
            return live
        time.sleep(0.05)
    return None


def scale_action(session: Session, log: list[dict[str, Any]], params: Params) -> None:
    """``cluster.scale(scale_to)`` once ``scale_at`` of the jobs are done."""
    if session.progress.wait_for(math.ceil(params.scale_at * session.progress.total)):
        log.append({"t": now(), "scale_to": params.scale_to, "done": session.progress.done})
        session.cluster.scale(params.scale_to)


# -- one strategy, one cluster -----------------------------------------------------------------------
def _base_loads(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Loads the baselines did, from their task records."""
    return [{"worker": r["worker"], "t": r["load_end"], "load_s": r["load_s"]} for r in records if r.get("loads")]


def _worker_seconds(n0: int, timeline: list[dict[str, Any]], since: float, until: float) -> float:
    """Integral of the number of live workers over ``[since, until]``."""
    total, n, t = 0.0, n0, since
    for e in sorted(timeline, key=lambda e: e["t"]):
        if e["t"] > until:
            break
        total += n * (e["t"] - t)
        n += 1 if e["action"] == "add-worker" else -1
        t = e["t"]
    return total + n * (until - t)


def _time_to_warm(timeline: list[dict[str, Any]], loads: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per worker that joined during the run: seconds from joining to its first finished load."""
    first_load: dict[str, float] = {}
    for load in sorted(loads, key=lambda x: x["t"]):
        first_load.setdefault(load["worker"], load["t"])
    return {
        e["worker"]: (round(first_load[e["worker"]] - e["t"], 3) if e["worker"] in first_load else None)
        for e in timeline
        if e["action"] == "add-worker"
    }


def settle_joined_loads(session: Session, since: float, timeout: float = 120.0) -> bool:
    """Wait (untimed) until no worker that joined since ``since`` has a pervasive load in flight.

    The run ends when its last job does; a worker that joined late may then
    still be loading its first copy (its tasks went back to warm workers
    meanwhile), and its ``resident`` event comes after the run. Without this
    wait its time to warm was read as missing (``None``, the "n/a" of the
    scale-out target). ``False`` if loads were still in flight at the timeout.
    """
    import dask_pervasive as dp
    from dask_pervasive._protocol import WARMING_STATES

    warming = {s.value for s in WARMING_STATES}
    deadline = time.monotonic() + timeout
    while True:
        joined = {e["worker"] for e in worker_timeline(session.client, since) if e["action"] == "add-worker"}
        if not joined:
            return True
        live = set(session.client.scheduler_info(n_workers=-1)["workers"])
        rows = dp.stats(session.client) if joined & live else []
        if not any(r["worker"] in joined and r["state"] in warming for r in rows):
            time.sleep(0.1)  # the last resident event on its way to the scheduler
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def summarize_run(
    name: str, records: list[dict[str, Any]], session: Session, n0: int, since: float, until: float, makespan: float
) -> dict[str, Any]:
    """Metrics of one strategy run, with the raw per-task and per-load data.

    ``since``/``until`` are the run's wall-clock bounds (scheduler events are
    stamped with wall time), ``makespan`` its duration on the monotonic clock.
    """
    client, origin_bytes = session.client, session.origin.bytes_served
    ok = [r for r in records if "error" not in r]
    pervasive = name.startswith("pervasive")
    loads = pervasive_loads(client, since) if pervasive else _base_loads(ok)
    transfers = pervasive_transfers(client, since) if pervasive else []
    timeline = worker_timeline(client, since)
    worker_seconds = _worker_seconds(n0, timeline, since, until)
    load_s = sum(x["load_s"] for x in loads)
    return {
        "strategy": name,
        "makespan_s": round(makespan, 3),
        "tasks": len(records),
        "completed": len(ok),
        "errors": [r["error"] for r in records if "error" in r],
        "loads": len(loads),
        "load_seconds": round(load_s, 3),
        "compute_seconds": round(sum(r["compute_s"] for r in ok), 3),
        # CPU seconds of the compute thread in those forward passes: what the work cost, whatever
        # share of the cores other processes left it (compute_seconds is wall time).
        "compute_cpu_seconds": round(sum(r.get("cpu_s", 0.0) for r in ok), 3),
        "origin_bytes": origin_bytes,
        "origin_reads": round(origin_bytes / session.model_bytes, 3),
        "peer_bytes": sum(t["bytes_from_peers"] or 0 for t in transfers),
        "worker_seconds": round(worker_seconds, 3),
        "load_share": round(load_s / worker_seconds, 4) if worker_seconds else None,
        "tasks_per_worker": dict(Counter(r["worker"] for r in ok)),
        "time_to_warm": _time_to_warm(timeline, loads),
        "timeline": [{**e, "t": round(e["t"] - since, 3)} for e in timeline],
        "load_events": [{**x, "t": round(x["t"] - since, 3)} for x in loads],
        "transfers": [{**t, "t": round(t["t"] - since, 3)} for t in transfers],
        # [worker, start, end, compute seconds, load seconds] per task, times relative to the start.
        "task_rows": [
            [
                r["worker"],
                round(r["start"] - since, 3),
                round(r["end"] - since, 3),
                round(r["compute_s"], 4),
                round(r["load_s"], 3),
            ]
            for r in ok
        ],
        "scores": [r.get("scores") for r in records],
    }


def run_strategy(
    name: str,
    jobs: list[Job],
    env: Env,
    n_workers: int,
    capacity: int | None,
    action: Callable[[Session, list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Run ``jobs`` with strategy ``name`` on a fresh cluster, timed from the first submit to the last result.

    The strategy's set-up (``dp.install``, the actor pool) happens before the
    clock starts, as plugins and long-lived actors exist before a workload
    arrives; its duration is recorded as ``setup_s``.
    """
    contexts = sorted({j.context for j in jobs})
    with fresh_cluster(n_workers) as (cluster, client):
        session = env.session(cluster, client, capacity, len(jobs))
        strategy = make_strategy(name)
        log: list[dict[str, Any]] = []
        thread = threading.Thread(target=action, args=(session, log), daemon=True) if action else None
        t_setup = time.perf_counter()
        strategy.start(session, contexts)
        setup_s = time.perf_counter() - t_setup
        env.origin.reset_counters()
        since = now()
        t0 = time.perf_counter()
        if thread:
            thread.start()
        records = strategy.run(session, jobs)
        makespan = time.perf_counter() - t0
        until = now()
        session.progress.finished.set()
        if thread:
            thread.join(timeout=60)
        time.sleep(0.1)  # let the last worker events reach the scheduler
        if name.startswith("pervasive"):
            settle_joined_loads(session, since)
        out = summarize_run(name, records, session, n_workers, since, until, makespan)
        out["setup_s"] = round(setup_s, 3)
        out["disturbances"] = [{**e, "t": round(e["t"] - since, 3)} for e in log]
        if hasattr(strategy, "failed_calls"):
            out["actor_calls_lost"] = strategy.failed_calls
        return out


# -- scenarios ---------------------------------------------------------------------------------------
def _jobs(items: list[tuple[str, str]], size: int, contexts: list[str]) -> list[Job]:
    return [Job(i, contexts[i % len(contexts)], tuple(b)) for i, b in enumerate(batches(items, size))]


def scenario_jobs(scenario: str, params: Params, env: Env) -> list[Job]:
    """The jobs of a scenario (identical for every strategy)."""
    size = params.sizes[scenario]
    items = make_items(size.tasks * size.items, params.seed)
    if scenario != "multi":
        return _jobs(items, size.items, [env.models[0].name])
    names = [m.name for m in env.models[: params.multi_contexts]]
    # Equal work per context, in a random order.
    order = [names[i % len(names)] for i in range(size.tasks)]
    random.Random(params.seed).shuffle(order)
    return [Job(i, c, tuple(b)) for i, (c, b) in enumerate(zip(order, batches(items, size.items)))]


def first_load_s(run: dict[str, Any]) -> float | None:
    """ "One load" of the ideal bound: the shortest first load of a worker that read the origin.

    (pervasive's copies from peers are faster than any origin read; the bound
    is what every worker reading the origin alone, at once, would take.)
    """
    peers_only = {t["worker"] for t in run["transfers"] if "origin" not in (t["sources"] or ())}
    firsts: dict[str, float] = {}
    for load in sorted(run["load_events"], key=lambda x: x["t"]):
        firsts.setdefault(load["worker"], load["load_s"])
    origin = [v for w, v in firsts.items() if w not in peers_only]
    return min(origin or firsts.values()) if firsts else None


def ideal_s(scenario: str, params: Params, run: dict[str, Any]) -> float | None:
    """Lower bound on a run's makespan: each worker loads what it must once, its compute splits evenly.

    Both terms come from the run itself (its shortest cold load, its tasks'
    compute seconds), so the bound sees the same machine load as the run.
    """
    per_worker_loads = {
        "steady": 1,
        "preempt": 1,  # the bound without preemption
        "multi": math.ceil(params.multi_contexts / params.workers),
    }.get(scenario)
    load = first_load_s(run)
    if per_worker_loads is None or load is None:
        return None
    return per_worker_loads * load + run["compute_seconds"] / params.workers


def run_scenario(
    scenario: str, params: Params, strategies: list[str], env: Env, say: Callable[[str], None]
) -> dict[str, Any]:
    """Every strategy on ``scenario``; per-strategy results plus the scenario's common numbers."""
    size = params.sizes[scenario]
    env.origin.bandwidth = params.origin_bandwidth(scenario, env.models[0].file_bytes)
    strategies = _runnable(scenario, strategies, say)
    if scenario == "batch-sweep":
        return run_batch_sweep(params, strategies, env, say)
    jobs = scenario_jobs(scenario, params, env)
    n0, capacity, action = params.workers, None, None
    if scenario == "multi":
        capacity = int((params.multi_fit + 0.5) * env.model_nbytes)
    elif scenario == "preempt":
        action = functools.partial(preempt_action, params=params)
    elif scenario == "opportunistic":
        action = functools.partial(opportunistic_action, params=params)
    elif scenario == "scale-out":
        n0 = 1
        action = functools.partial(scale_action, params=params)
        if "pervasive" in strategies and "pervasive-origin" not in strategies:
            strategies = [*strategies, "pervasive-origin"]  # the origin-only reference for time to warm
    runs = {}
    for name in strategies:
        say(f"{scenario}: {name}")
        if name in ray_strategies.RAY_STRATEGY_NAMES:
            try:
                run = runs[name] = ray_strategies.run_strategy(name, jobs, env, n0, capacity, summarize_run)
            except Exception as exc:  # noqa: BLE001 - an optional peer system must not end the benchmark
                say(f"skipping {name} in {scenario}: Ray failed ({type(exc).__name__}: {exc})")
                continue
        else:
            run = runs[name] = run_strategy(name, jobs, env, n0, capacity, action)
        ideal = ideal_s(scenario, params, run)
        run["ideal_s"] = round(ideal, 3) if ideal else None
        run["efficiency"] = round(ideal / run["makespan_s"], 3) if ideal else None
    return {
        "origin_bandwidth": env.origin.bandwidth,
        "jobs": len(jobs),
        "items_per_job": size.items,
        "contexts": sorted({j.context for j in jobs}),
        "initial_workers": n0,
        "capacity_bytes": capacity,
        "equality": compare_scores({n: r["scores"] for n, r in runs.items()}),
        "runs": runs,
    }


def _runnable(scenario: str, strategies: list[str], say: Callable[[str], None]) -> list[str]:
    """``strategies`` without the Ray ones that cannot run ``scenario`` here (each skip said once)."""
    out = []
    for name in strategies:
        why = ray_strategies.unavailable(name, scenario) if name in ray_strategies.RAY_STRATEGY_NAMES else None
        if why:
            say(why)
        else:
            out.append(name)
    return out


def compare_scores(by_strategy: dict[str, list[Any]], tolerance: float = 1e-4) -> dict[str, Any]:
    """Largest difference of any item's score between any strategy and the first one."""
    names = list(by_strategy)
    if not names:
        return {"identical": True, "max_abs_diff": 0.0, "missing": 0}
    ref = by_strategy[names[0]]
    worst, missing = 0.0, 0
    for other in names[1:]:
        for a, b in zip(ref, by_strategy[other]):
            if a is None or b is None or len(a) != len(b):
                missing += 1
                continue
            worst = max([worst, *(abs(x - y) for x, y in zip(a, b))])
    return {
        "identical": missing == 0 and worst <= tolerance,
        "max_abs_diff": worst,
        "missing": missing,
        "reference": names[0],
        "tolerance": tolerance,
    }


def run_batch_sweep(params: Params, strategies: list[str], env: Env, say: Callable[[str], None]) -> dict[str, Any]:
    """Warm throughput at each batch size, one cluster per strategy."""
    items = make_items(params.sizes["batch-sweep"].tasks, params.seed)
    context = env.models[0].name
    runs: dict[str, Any] = {}
    for name in strategies:
        say(f"batch-sweep: {name}")
        runs[name] = _sweep_one(name, items, context, params, env)
    equality = {
        str(b): compare_scores({n: r["phases"][str(b)]["scores"] for n, r in runs.items()})
        for b in params.sweep_batches
    }
    for r in runs.values():
        tp = [p["throughput"] for p in r["phases"].values()]
        r["throughput_max_over_min"] = round(max(tp) / min(tp), 3)
    return {
        "origin_bandwidth": env.origin.bandwidth,
        "items": len(items),
        "batch_sizes": list(params.sweep_batches),
        "contexts": [context],
        "equality": equality,
        "equality_across_batch_sizes": _across_batches(runs),
        "runs": runs,
    }


def _across_batches(runs: dict[str, Any]) -> float:
    """Largest score difference of one item between batch sizes (float rounding of padded batches)."""
    worst = 0.0
    for r in runs.values():
        flat = [[s for job in p["scores"] for s in job] for p in r["phases"].values()]
        for other in flat[1:]:
            worst = max([worst, *(abs(a - b) for a, b in zip(flat[0], other))])
    return worst


def _sweep_one(name: str, items: list[Any], context: str, params: Params, env: Env) -> dict[str, Any]:
    """One cluster: warm every worker (untimed), then time each batch size.

    Warm strategies sweep twice (increasing, then decreasing batch size) and
    keep the better pass per batch size: other processes on the machine only
    ever slow a phase down, and the reversed order spreads the passes over
    time. naive (one load per job, long phases) sweeps once.
    """
    with fresh_cluster(params.workers) as (cluster, client):
        session = env.session(cluster, client, None, 0)
        strategy = make_strategy(name)
        strategy.start(session, [context])
        strategy.prime(session, [context])
        order = list(params.sweep_batches)
        if name != "naive":
            order += order[::-1]
        passes: dict[str, list[dict[str, Any]]] = {}
        for size in order:
            passes.setdefault(str(size), []).append(_sweep_phase(session, strategy, name, items, size, context, params))
    phases = {
        b: {**max(runs, key=lambda r: r["throughput"]), "passes": [r["throughput"] for r in runs]}
        for b, runs in passes.items()
    }
    return {"strategy": name, "phases": phases}


def _sweep_phase(
    session: Session, strategy: Any, name: str, items: list[Any], size: int, context: str, params: Params
) -> dict[str, Any]:
    """Time all items at one batch size."""
    jobs = _jobs(items, size, [context])
    session.progress = Progress(len(jobs))
    session.origin.reset_counters()
    since = now()
    t0 = time.perf_counter()
    records = strategy.run(session, jobs)
    makespan = time.perf_counter() - t0
    run = summarize_run(name, records, session, params.workers, since, now(), makespan)
    compute = run["compute_seconds"]
    run["batch_size"] = size
    run["throughput"] = round(len(items) / makespan, 3)
    run["ideal_throughput"] = round(len(items) / (compute / params.workers), 3) if compute else None
    return run
