"""The ``scale`` placement scenario: many in-process workers, many contexts, one run.

Run ``python -m dask_pervasive.bench placement --scenario scale`` (options
``--workers`` (default 64), ``--contexts``, ``--scale-tasks``, ``--scale-cases``,
``--scale-grid``, ``--scale-repeat``, ``--scale-scheduler``). Every case gets a fresh cluster:
``--workers`` one-thread workers in this process and the scheduler in a
subprocess (``--scale-scheduler thread``: in this process too, as
``LocalCluster(processes=False)`` would); contexts load with a sleep
and declare ``nbytes`` (1,000 bytes), tasks sleep ``--task-seconds``; tasks
are submitted round-robin over the contexts under ``dask.annotate(context=...)``.

Cases (``--scale-cases``, comma-separated):

``floor``
    Zero-cost loads, no scheduler plugin: what this harness can do at all on
    this machine. Every makespan ratio divides by ``floor + one load``, the
    floor being the mean of the runs just before and after the case.
``roomy`` / ``roomy-off``
    Budgets with room for every context, plugin on / off (Dask alone).
``tight`` / ``tight-off``
    Room for one context per worker (``max_bytes=1500``), on / off.
``map``
    Roomy, on, one ``client.map`` per context instead of one-by-one submits.
``churn``
    Roomy, on; once a third of the tasks are done, ``--churn`` workers are
    closed abruptly, as many replacements start, and as many more join.
``hetero`` / ``hetero-floor``
    Half the workers run tasks 2x slower (the task looks its worker up in a
    module-level set: workers are in-process). The bound that accounts for
    their speeds is ``hetero-floor × n / Σ rate + one load`` with ``rate`` 1
    or 0.5 (``hetero-floor``: zero-cost loads, no plugin, same slow workers).

``--scale-grid W:C,...`` adds cost-only runs (short tasks, plugin on) that
report the re-plan times as workers grow and contexts multiply.
``--scale-repeat N`` runs each grid point N times and pools their re-plan
times (p50/p90/p99/max over all runs, each run's p99 beside them); the
200 × 20 re-plan target is checked on the pool: one run makes about 100
re-plans, so its own p99 is its slowest or second slowest re-plan.

Measured per case: makespan, loads (from ``dp.stats``) and loads per worker,
and, with the plugin, every re-plan's wall time (p50/p99/max, from
``ContextSchedulerPlugin.replan_seconds``) and the longest single call into
any of the plugin's hooks (wrapped on the scheduler): the event loop's longest
stall caused by us.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any
from unittest import mock

import dask
from distributed import Client, Future, Scheduler, SpecCluster, Worker, get_worker, wait
from distributed.deploy.subprocess import SubprocessScheduler

import dask_pervasive as dp
from dask_pervasive.bench.placement import sleep_load
from dask_pervasive.bench.report import say
from dask_pervasive.bench.targets import floor_of

WORKERS = 64
CONTEXTS = 4
TASKS = 2000
TASK_SECONDS = 0.2
LOAD_SECONDS = 2.0
NBYTES = 1000
TIGHT_BYTES = 1500
CHURN = 4
CASES = ("floor", "roomy", "roomy-off", "tight", "tight-off", "map", "churn", "hetero-floor", "hetero")
QUICK_CASES = ("floor", "roomy", "tight", "hetero-floor", "hetero")
SLOWDOWN = 2.0
GRID_TASK_SECONDS = 0.02
START_BATCH = 25  #: in-process workers started at once
CONNECT_TIMEOUT = "120s"

#: Worker addresses whose tasks sleep ``SLOWDOWN`` times longer (workers are in-process).
SLOW: set[str] = set()
_SLOW_LOCK = threading.Lock()

#: Scheduler plugin methods timed (``replan`` runs from other hooks and the periodic tick).
_HOOK_SAMPLE_FROM = 1e-4  #: seconds: hook calls shorter than this are counted, not kept
_LAG_TICK = 0.01  #: seconds between the loop monitor's callbacks

_HOOKS = (
    "update_graph",
    "transition",
    "replan",
    "add_worker",
    "remove_worker",
    "log_event",
    "_tick",
    "_replan_now",
    "_rebalance",
)


def scale_task(i: int, seconds: float) -> tuple[int, str, str]:
    """``seconds`` of work (``SLOWDOWN`` times more on slow workers) that needs the annotated context."""
    ctx = dp.get_context()
    worker = get_worker().address
    time.sleep(seconds * (SLOWDOWN if worker in SLOW else 1.0))
    return i, ctx["tag"], worker


def _warm_up(i: int) -> int:
    return i


# -- scheduler-side timing ------------------------------------------------------------
def time_hooks(dask_scheduler: Any) -> None:
    """Wrap the plugin's hooks (each outermost call's wall and CPU time) and watch the event loop's ticks.

    The longest hook call is the longest stall of the event loop *we* cause;
    the loop monitor (a callback every ``_LAG_TICK`` seconds, how late it ran)
    sees stalls from any cause (Dask itself, the GIL of 2 cores' worth of
    in-process workers), an upper bound on ours.
    """
    plugin = dask_scheduler.plugins.get(dp.ContextSchedulerPlugin.name)
    if plugin is None:
        return
    state: dict[str, Any] = {"depth": 0, "max": 0.0, "cpu_max": 0.0, "total": 0.0, "cpu_total": 0.0, "calls": 0}
    state.update(gc=0.0, gc_max=0.0, nogc_max=0.0)
    state["wall"], state["cpu"] = [], []
    plugin._bench_hooks = state

    def timed(hook: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            state["depth"] += 1
            t0, c0, g0 = time.perf_counter(), time.thread_time(), state["gc"]
            try:
                return hook(*args, **kwargs)
            finally:
                state["depth"] -= 1
                if state["depth"] == 0:
                    dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                    state["total"] += dt
                    state["cpu_total"] += dc
                    state["calls"] += 1
                    state["max"] = max(state["max"], dt)
                    state["cpu_max"] = max(state["cpu_max"], dc)
                    in_gc = state["gc"] - g0  # the collector's passes that ran inside this call
                    state["gc_max"] = max(state["gc_max"], in_gc)
                    state["nogc_max"] = max(state["nogc_max"], dt - in_gc)
                    if dt > _HOOK_SAMPLE_FROM:  # the distribution's tail; the many tiny calls only count
                        state["wall"].append(dt)
                        state["cpu"].append(dc)

        return wrapper

    for name in _HOOKS:
        setattr(plugin, name, timed(getattr(plugin, name)))

    # Garbage collector passes inside our hooks: a full pass walks the whole process's heap (here
    # every in-process worker's too), whoever's allocation triggers it, so it is reported apart.
    collecting: dict[str, float] = {}

    def on_gc(phase: str, info: dict) -> None:
        if threading.get_ident() != loop_thread:
            return
        if phase == "start":
            collecting["t"] = time.perf_counter()
        elif "t" in collecting and state["depth"] > 0:
            state["gc"] += time.perf_counter() - collecting.pop("t")

    loop_thread = threading.get_ident()
    gc.callbacks.append(on_gc)
    state["gc_callback"] = on_gc

    lag = state["lag"] = {"max": 0.0, "ticks": 0}
    loop = asyncio.get_running_loop()

    def tick(expected: float) -> None:
        now = loop.time()
        lag["max"] = max(lag["max"], now - expected)
        lag["ticks"] += 1
        if not state.get("stopped"):
            loop.call_at(now + _LAG_TICK, tick, now + _LAG_TICK)

    loop.call_at(loop.time() + _LAG_TICK, tick, loop.time() + _LAG_TICK)


def _brief(timings: dict[str, Any] | None) -> dict[str, Any] | None:
    """``timings`` for a progress line: without the per-re-plan samples."""
    return None if timings is None else {k: v for k, v in timings.items() if k != "replan_samples_ms"}


def _percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of ascending ``ordered`` (not empty): the sample at rank ``int(q * n)``."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def plugin_timings(dask_scheduler: Any) -> dict[str, Any] | None:
    """Re-plan p50/p99/max (ms, wall and CPU), the hooks' longest call and total (ms), the loop's longest stall."""
    plugin = dask_scheduler.plugins.get(dp.ContextSchedulerPlugin.name)
    if plugin is None:
        return None
    samples = sorted(plugin.replan_seconds)
    cpu = sorted(plugin.replan_cpu_seconds)
    hooks = getattr(plugin, "_bench_hooks", {})
    hooks["stopped"] = True
    if hooks.get("gc_callback") in gc.callbacks:
        gc.callbacks.remove(hooks["gc_callback"])
    out: dict[str, Any] = {"replans": len(samples)}
    if samples:
        out.update(
            replan_p50_ms=round(1e3 * statistics.median(samples), 3),
            replan_p99_ms=round(1e3 * _percentile(samples, 0.99), 3),
            replan_max_ms=round(1e3 * samples[-1], 3),
            replan_cpu_p50_ms=round(1e3 * statistics.median(cpu), 3),
            replan_cpu_p99_ms=round(1e3 * _percentile(cpu, 0.99), 3),
            replan_cpu_max_ms=round(1e3 * cpu[-1], 3),
            # Every re-plan's wall time, in order: a p99 over ~100 re-plans is their slowest or second
            # slowest, so runs are pooled to compare trees (docs/placement.md).
            replan_samples_ms=[round(1e3 * t, 3) for t in plugin.replan_seconds],
        )
    calls = hooks.get("calls", 0)
    out.update(
        hook_max_ms=round(1e3 * hooks.get("max", 0.0), 3),
        hook_cpu_max_ms=round(1e3 * hooks.get("cpu_max", 0.0), 3),
        hook_total_ms=round(1e3 * hooks.get("total", 0.0), 1),
        hook_cpu_total_ms=round(1e3 * hooks.get("cpu_total", 0.0), 1),
        hook_calls=calls,
        hook_gc_max_ms=round(1e3 * hooks.get("gc_max", 0.0), 3),
        hook_nogc_max_ms=round(1e3 * hooks.get("nogc_max", 0.0), 3),
        hook_gc_total_ms=round(1e3 * hooks.get("gc", 0.0), 1),
    )
    for kind in ("wall", "cpu"):
        tail = sorted(hooks.get(kind, ()))
        # p99 over all calls: those not sampled were all below _HOOK_SAMPLE_FROM.
        rank = int(0.99 * calls)
        below = calls - len(tail)
        value = tail[rank - below] if calls and rank >= below and tail else _HOOK_SAMPLE_FROM
        out[f"hook_{kind}_p99_ms"] = round(1e3 * value, 3) if calls else None
    lag = hooks.get("lag", {})
    out["loop_stall_max_ms"] = round(1e3 * lag.get("max", 0.0), 1)
    # When each context's backlog began, from the earliest: a burst of maps wider than the planner's
    # settling wait is planned a context at a time.
    began = {name: plan.demand_since for name, plan in plugin.plans.items() if plan.demand_since is not None}
    if began:
        first = min(began.values())
        out["backlog_began_s"] = {name: round(t - first, 3) for name, t in sorted(began.items())}
    return out


# -- one case ---------------------------------------------------------------------------
@contextmanager
def in_process_cluster(n_workers: int, scheduler_process: bool = True) -> Iterator[tuple[SpecCluster, Client]]:
    """``n_workers`` one-thread in-process workers, their scheduler, and a client, all up.

    ``scheduler_process`` (the default) runs the scheduler in a subprocess, as
    every real deployment does: otherwise the scheduler shares its one GIL and
    heap with every in-process worker, so each garbage collector pass inside a
    hook walks all the workers' objects too (0.4-0.5 s at 50 workers, far past
    what the scheduler's own state costs) and every hook waits for worker
    threads. Workers start ``START_BATCH`` at a time, each batch registered
    before the next starts, and comms get ``CONNECT_TIMEOUT``: with 200
    in-process workers on 2 cores, starting them all at once ran past Dask's
    30 s connect timeout.
    """
    first = min(n_workers, START_BATCH)
    host = "127.0.0.1"
    # No memory limit: in-process workers share one process, and each would compare the whole
    # process's memory with 1/n of the machine (LocalCluster's split): at 200 workers all paused.
    worker = {"cls": Worker, "options": {"nthreads": 1, "host": host, "memory_limit": 0}}
    if scheduler_process:
        scheduler_kwargs = {"host": host, "port": 0, "dashboard": False}
        scheduler = {"cls": SubprocessScheduler, "options": {"scheduler_kwargs": scheduler_kwargs}}
    else:
        scheduler = {"cls": Scheduler, "options": {"host": host, "port": 0, "dashboard": False}}
    # The subprocess reads its config from the environment: the same timeout, and quiet logs (its
    # stderr is a pipe nobody reads while it runs, so it must not fill up).
    env = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": CONNECT_TIMEOUT, "DASK_LOGGING__DISTRIBUTED": "error"}
    with (
        mock.patch.dict(os.environ, env),
        dask.config.set({"distributed.comm.timeouts.connect": CONNECT_TIMEOUT}),
        SpecCluster(
            workers={i: worker for i in range(first)},
            scheduler=scheduler,
            worker=worker,
            silence_logs=logging.CRITICAL,
            name="scale",
        ) as cluster,
        Client(cluster) as client,
    ):
        up = first
        client.wait_for_workers(up)
        while up < n_workers:
            up = min(n_workers, up + START_BATCH)
            cluster.scale(up)
            client.wait_for_workers(up)
        yield cluster, client


def _contexts(n: int, load_seconds: float) -> list[dp.Context]:
    return [
        dp.Context(f"c{i}", load=partial(sleep_load, seconds=load_seconds, tag=f"c{i}"), device="cpu", nbytes=NBYTES)
        for i in range(n)
    ]


def _submit(client: Client, n_tasks: int, n_contexts: int, seconds: float, bulk: bool) -> list[Future]:
    if bulk:
        futures = []
        for c in range(n_contexts):
            with dask.annotate(context=f"c{c}"):
                futures += client.map(scale_task, range(c, n_tasks, n_contexts), seconds=seconds, pure=False)
        return futures
    futures = []
    for i in range(n_tasks):
        with dask.annotate(context=f"c{i % n_contexts}"):
            futures.append(client.submit(scale_task, i, seconds, pure=False))
    return futures


def _churn(cluster: SpecCluster, client: Client, futures: list[Future], n: int, after: int) -> dict[str, Any]:
    """Once ``after`` tasks finished: close ``n`` workers abruptly, start ``n`` replacements and ``n`` more."""
    while sum(f.status == "finished" for f in futures) < after:
        time.sleep(0.01)
    at = time.perf_counter()
    names = sorted(cluster.workers)[:n]
    for name in names:
        worker = cluster.workers[name]
        cluster.worker_spec.pop(name, None)
        cluster.sync(worker.close, executor_wait=False, reason="bench churn")
    cluster.scale(len(cluster.worker_spec) + 2 * n)
    return {"closed": len(names), "joined": 2 * n, "at_s": at}


def run_case(
    case: str,
    workers: int,
    contexts: int,
    tasks: int,
    task_seconds: float,
    load_seconds: float,
    churn: int,
    scheduler_process: bool = True,
) -> dict[str, Any]:
    """One case on a fresh cluster: makespan, loads, and the plugin's timings."""
    plugin = not case.endswith(("-off", "floor"))
    load = 0.0 if case.endswith("floor") else load_seconds
    tight = case.startswith("tight")
    with in_process_cluster(workers, scheduler_process) as (cluster, client):
        dp.install(client, _contexts(contexts, load), max_bytes=TIGHT_BYTES if tight else None, scheduler=plugin)
        addresses = sorted(client.scheduler_info(n_workers=-1)["workers"])
        with _SLOW_LOCK:
            SLOW.clear()
            if case.startswith("hetero"):
                SLOW.update(addresses[::2])
        client.gather(client.map(_warm_up, range(2 * workers), pure=False))  # comms and threads, not contexts
        client.run_on_scheduler(time_hooks)
        out: dict[str, Any] = {"case": case, "workers": workers, "contexts": contexts, "tasks": tasks}
        t0 = time.perf_counter()
        futures = _submit(client, tasks, contexts, task_seconds, bulk=case == "map")
        if case == "churn":
            out["churn"] = _churn(cluster, client, futures, churn, tasks // 3)
            out["churn"]["at_s"] = round(out["churn"]["at_s"] - t0, 3)
        wait(futures)
        out["makespan_s"] = round(time.perf_counter() - t0, 3)
        results = client.gather(futures)
        out["correct"] = sum(tag == f"c{i % contexts}" for i, tag, _ in results)
        rows = dp.stats(client)
        out["loads"] = int(rows.total("loads"))
        out["workers_at_end"] = len(client.scheduler_info(n_workers=-1)["workers"])
        out["loads_per_worker"] = round(out["loads"] / workers, 3)
        out["slow_workers"] = len(SLOW)
        if SLOW:
            per = {}
            for _, _, w in results:
                per[w] = per.get(w, 0) + 1
            slow = [per.get(a, 0) for a in addresses if a in SLOW]
            fast = [per.get(a, 0) for a in addresses if a not in SLOW]
            out["slow_fast_task_ratio"] = round(statistics.mean(slow) / max(statistics.mean(fast), 1e-9), 3)
        out["timings"] = client.run_on_scheduler(plugin_timings)
        with _SLOW_LOCK:
            SLOW.clear()
        return out


def parse_grid(text: str | None) -> list[tuple[int, int]]:
    """``"25:1,200:20"`` -> ``[(25, 1), (200, 20)]``."""
    if not text:
        return []
    return [(int(w), int(c)) for w, c in (item.split(":") for item in text.split(",") if item)]


def reference_loop_ms() -> float:
    """CPU milliseconds of a fixed pure-Python loop (10⁶ additions), the fastest of three.

    The re-plan targets are absolute milliseconds, and the machines these
    runs share differ 2-3x in CPU speed: this says which one a result came from.
    """
    best = math.inf
    for _ in range(3):
        t0 = time.thread_time()
        x = 0
        for i in range(10**6):
            x += i
        best = min(best, time.thread_time() - t0)
    return round(1e3 * best, 1)


def pool_replans(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The re-plan times of repeated runs of one grid point, pooled: p50/p90/p99/max over all of them.

    Beside them, each run's own p99 and the longest hook call of any run
    (the event-loop stall we cause).
    """
    first = runs[0]
    timings = [r.get("timings") or {} for r in runs]
    samples = sorted(x for t in timings for x in t.get("replan_samples_ms", ()))
    out: dict[str, Any] = {
        "case": first["case"],
        "workers": first["workers"],
        "contexts": first["contexts"],
        "runs": len(runs),
        "replans": len(samples),
        "run_p99_ms": [t.get("replan_p99_ms") for t in timings],
        "loads": [r["loads"] for r in runs],
        "makespan_s": [r["makespan_s"] for r in runs],
        "hook_max_ms": max(t.get("hook_max_ms", 0.0) for t in timings),
    }
    if samples:
        out.update(
            replan_p50_ms=round(statistics.median(samples), 3),
            replan_p90_ms=_percentile(samples, 0.9),
            replan_p99_ms=_percentile(samples, 0.99),
            replan_max_ms=samples[-1],
        )
    return out


def run_scale(
    workers: int = WORKERS,
    contexts: int = CONTEXTS,
    tasks: int = TASKS,
    task_seconds: float = TASK_SECONDS,
    load_seconds: float = LOAD_SECONDS,
    cases: tuple[str, ...] | list[str] = CASES,
    grid: list[tuple[int, int]] | None = None,
    churn: int = CHURN,
    scheduler_process: bool = True,
    repeat: int = 1,
) -> dict[str, Any]:
    """Every case, then the grid: ``{"cases": {case: result}, "grid": [...], "grid_pooled": [...], "parameters": ...}``.

    Each grid point runs ``repeat`` times, one entry per run in ``grid``, and
    ``grid_pooled`` holds one entry per point with its runs' re-plan times
    pooled (:func:`pool_replans`): a run makes about 100 re-plans, so its own
    p99 is its slowest or second slowest.

    A floor named in ``cases`` is run before and after every case divided by
    it (one run between two such cases serves both), and each case keeps the
    mean of the two beside it as ``floor_makespan_s``: on a shared machine the
    floor alone varied 1.8x between runs minutes apart, so a floor measured
    once decides the ratio more than the case does. The floor's own entry is
    its first run, with every run's makespan in ``runs_s``.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    out: dict[str, Any] = {
        "parameters": {
            "workers": workers,
            "contexts": contexts,
            "tasks": tasks,
            "task_seconds": task_seconds,
            "load_seconds": load_seconds,
            "churn": churn,
            "scheduler": "subprocess" if scheduler_process else "in-process",
            "repeat": repeat,
        },
        "cases": {},
        "grid": [],
        "grid_pooled": [],
        "reference_loop_ms": reference_loop_ms(),
    }

    def run(case: str) -> dict[str, Any]:
        result = run_case(case, workers, contexts, tasks, task_seconds, load_seconds, churn, scheduler_process)
        say(f"  {case}: {result['makespan_s']} s, {result['loads']} loads, {_brief(result['timings']) or 'no plugin'}")
        return result

    def floor(name: str) -> float:
        result = run(name)
        if name in out["cases"]:
            out["cases"][name]["runs_s"].append(result["makespan_s"])
        else:
            out["cases"][name] = {**result, "runs_s": [result["makespan_s"]]}
        return result["makespan_s"]

    last: tuple[str, float] | None = None  # the floor run just before, which the next case shares
    for case in cases:
        if case in ("floor", "hetero-floor"):
            continue
        name = floor_of(case)
        bracket = name in cases
        if bracket:
            before = last[1] if last and last[0] == name else floor(name)
        out["cases"][case] = result = run(case)
        last = None
        if bracket:
            after = floor(name)
            last = (name, after)
            result["floor_makespan_s"] = round((before + after) / 2, 3)
            result["floor_runs_s"] = [before, after]
    for name in ("floor", "hetero-floor"):
        if name in cases and name not in out["cases"]:
            floor(name)  # asked for alone
    for w, c in grid or ():
        runs = []
        for i in range(repeat):
            result = run_case(
                f"grid-{w}x{c}", w, c, 10 * w, GRID_TASK_SECONDS, load_seconds / 4, churn, scheduler_process
            )
            result["repeat"] = i
            runs.append(result)
            out["grid"].append(result)
            say(f"  {result['case']}: {result['makespan_s']} s, {result['loads']} loads, {_brief(result['timings'])}")
        out["grid_pooled"].append(pool_replans(runs))
    out["reference_loop_ms"] = min(out["reference_loop_ms"], reference_loop_ms())  # the quieter of before/after
    return out
