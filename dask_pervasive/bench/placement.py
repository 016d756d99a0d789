"""Placement benchmark: the scheduler plugin on vs off, side by side, in one run.

Run ``python -m dask_pervasive.bench placement`` (see ``--help``). Each
scenario runs twice, with :class:`~dask_pervasive.ContextSchedulerPlugin`
installed (``dp.install(..., scheduler=True)``, "on") and with only the worker
plugin (``scheduler=False``, "off"), each variant on a fresh
``LocalCluster(n_workers=4, threads_per_worker=1, processes=True)``:

``few``
    Context prewarmed on one worker, then 20 tasks of 50 ms. Loads (the
    prewarm included) and makespan.
``backlog``
    Same set-up, 400 tasks of 50 ms: makespan against the single-warm-worker
    time (400 x 50 ms) and the number of workers that loaded.
``multi``
    Four 1 MiB contexts, a budget with room for one per worker, 400 tasks of
    20 ms in a seeded random context order, submitted one by one under
    ``dask.annotate(context=...)``. Loads.
``preempt``
    Context prewarmed on two workers, 200 tasks of 50 ms; once a quarter of
    them are done, one warm worker's process gets SIGKILL (the nanny then
    starts a cold replacement, as a preempted node would be replaced).
    Checks every result, that none lives on the dead worker, where the tasks
    that started after the kill ran, and how many loads started after it.
``plain``
    10,000 no-op tasks without a context (context declared, plugin on vs
    off), three interleaved repetitions each: median throughput ratio.

Method notes
------------
* Loads are ``time.sleep(load_seconds)``: this benchmark measures
  scheduling, not model loading, so a sleep gives a controlled, exactly known
  load cost that does not compete for this machine's few cores. Tasks sleep
  too, for the same reason.
* In ``few`` and ``backlog``, one task of the same function runs on the warm
  worker before timing (``client.submit(f, -1, workers=[warm])``), so that
  Dask knows the task duration when the timed tasks arrive, as it would in
  any longer-running workload. The plugin ignores tasks with user
  restrictions, so this task is placed identically on and off.
* Makespan is wall time from the first submit to the last result in memory.
* A task "waited for a load" when ``get_context`` found its context not yet
  resident (read from the worker's cache inside the task).
* The worker is killed with ``os.kill(pid, SIGKILL)`` on the nanny's worker
  process: abrupt like a preemption, and safe to call from this thread
  (``Nanny.kill`` and ``AsyncProcess.kill`` belong to the cluster's event loop).
* ``plain`` keeps one cluster per variant up for its three repetitions
  (alternating which goes first) and submits with ``pure=False``, so each
  repetition computes fresh keys. On a small, shared machine wall-clock
  throughput varies a lot between repetitions, so it also reports the time
  spent inside the scheduler plugin's hooks (measured by wrapping them on the
  scheduler): the plugin's own cost, free of that noise.
* Task and load functions live at module level here, so worker processes
  unpickle them by reference to ``dask_pervasive.bench.placement``.

Targets are in :mod:`dask_pervasive.bench.targets`; results go to a ``rich``
table on stdout and, with every raw number, versions and machine facts, to
``--out`` (JSON), through :mod:`dask_pervasive.bench.report`.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import dask
from distributed import Client, Future, LocalCluster, get_worker, wait

import dask_pervasive as dp
from dask_pervasive._protocol import EVENT_TOPIC, PLUGIN_NAME
from dask_pervasive.bench import harness
from dask_pervasive.worker import plugin_on

N_WORKERS = 4
MODEL = "model"  #: the context of few, backlog, preempt and plain
TASK_SECONDS = 0.05
MULTI_TASK_SECONDS = 0.02
MULTI_CONTEXTS = ("m0", "m1", "m2", "m3")
FEW_TASKS = 20
BACKLOG_TASKS = 400
MULTI_TASKS = 400
PREEMPT_TASKS = 200
PREEMPT_KILL_FRACTION = 0.25
PLAIN_TASKS = 10_000
PLAIN_REPETITIONS = 3
SCENARIOS = ("few", "backlog", "multi", "preempt", "plain")


# -- functions that run on workers (module level: unpickled by reference) ----------
def sleep_load(path: str | None, device: str, *, seconds: float, tag: str) -> dict[str, str]:
    """Context loader standing in for a model load of known cost."""
    time.sleep(seconds)
    return {"tag": tag, "device": device}


def _record(value: Any, started: float) -> dict[str, Any]:
    """What a benchmark task returns: its value, where and when it ran, whether it waited for a load."""
    worker = get_worker()
    key = worker.active_threads.get(threading.get_ident())
    plugin = plugin_on(worker)
    # get_context records a span for the running task only when it loaded or waited for a load.
    waited = bool(plugin is not None and plugin.cache.load_spans.get(key))
    return {"value": value, "worker": worker.address, "start": started, "waited": waited}


@dp.uses_context(MODEL)
def model_task(model: dict[str, str], i: int) -> dict[str, Any]:
    """50 ms of work that needs the ``model`` context."""
    started = time.time()
    time.sleep(TASK_SECONDS)
    return _record((i, model["tag"]), started)


def multi_task(i: int) -> dict[str, Any]:
    """20 ms of work that needs the context named by its annotation."""
    ctx = dp.get_context()
    started = time.time()  # after the context is ready, as in uses_context tasks
    time.sleep(MULTI_TASK_SECONDS)
    return _record((i, ctx["tag"]), started)


def inc(x: int) -> int:
    """A no-op task."""
    return x + 1


# -- cluster and measurement helpers -------------------------------------------------
@contextmanager
def fresh_cluster() -> Iterator[tuple[LocalCluster, Client]]:
    """A new 4-worker, 1-thread-each process cluster and its client."""
    # the preempt kill makes nannies and comms log warnings
    with harness.fresh_cluster(N_WORKERS, silence_logs=logging.ERROR) as (cluster, client):
        yield cluster, client


def model_context(load_seconds: float) -> dp.Context:
    """The ``model`` context: ``load_seconds`` to load, 1 MiB declared."""
    return dp.Context(MODEL, load=partial(sleep_load, seconds=load_seconds, tag=MODEL), device="cpu", nbytes="1MiB")


def worker_addresses(client: Client) -> list[str]:
    """Addresses of the running workers, sorted."""
    return sorted(client.scheduler_info(n_workers=-1)["workers"])


def timed(submit: Callable[[], list[Future]]) -> tuple[list[Future], float]:
    """Submit tasks and wait for all of them: ``(futures, seconds)``."""
    t0 = time.perf_counter()
    futures = submit()
    wait(futures)
    return futures, time.perf_counter() - t0


def placement_events(client: Client, since: float) -> list[dict[str, Any]]:
    """The scheduler plugin's ``placement`` decisions logged after wall time ``since``."""
    return [
        {"t": round(t - since, 3), **msg}
        for t, msg in client.get_events(EVENT_TOPIC)
        if isinstance(msg, dict) and msg.get("action") == "placement" and t >= since
    ]


def loads_started(client: Client, since: float, after: float) -> list[dict[str, Any]]:
    """Context loads that started (state became fetching/loading) after wall time ``after``, timed from ``since``."""
    return [
        {"t": round(t - since, 3), "worker": msg.get("worker"), "context": msg["context"]}
        for t, msg in client.get_events(EVENT_TOPIC)
        if isinstance(msg, dict)
        and msg.get("action") == "context-state"
        and msg.get("state") in ("fetching", "loading")
        and t >= after
    ]


def workers_joined(client: Client, since: float, after: float) -> list[dict[str, Any]]:
    """Workers that joined after wall time ``after``, timed from ``since``."""
    return [
        {"t": round(t - since, 3), "worker": msg["worker"]}
        for t, msg in client.get_events("all")
        if isinstance(msg, dict) and msg.get("action") == "add-worker" and t >= after
    ]


def summarize(client: Client, records: list[dict[str, Any]], makespan: float, since: float) -> dict[str, Any]:
    """Numbers common to every context scenario."""
    rows = dp.stats(client)
    return {
        "makespan_s": round(makespan, 3),
        "loads": int(rows.total("loads")),
        "workers_loaded": len({r["worker"] for r in rows if r["loads"] > 0}),
        "evictions": int(rows.total("evictions")),
        "tasks_waited_for_load": sum(r["waited"] for r in records),
        "tasks_per_worker": dict(Counter(r["worker"] for r in records)),
        "stats": [{k: r[k] for k in ("worker", "context", "state", "loads", "hits", "evictions")} for r in rows],
        "placements": placement_events(client, since),
    }


def task_rows(records: list[dict[str, Any]], since: float) -> list[list[Any]]:
    """Compact per-task raw data: ``[index, worker, start offset (s), waited for a load]``."""
    return [[r["value"][0], r["worker"], round(r["start"] - since, 3), r["waited"]] for r in records]


# -- scenarios -------------------------------------------------------------------------
def run_single_warm(plugin: bool, n_tasks: int, load_seconds: float) -> dict[str, Any]:
    """``few`` and ``backlog``: one warm worker, ``n_tasks`` tasks of 50 ms."""
    with fresh_cluster() as (_, client):
        dp.install(client, [model_context(load_seconds)], scheduler=plugin)
        warm = worker_addresses(client)[0]
        dp.prewarm(client, MODEL, workers=[warm], progress=False)
        client.submit(model_task, -1, workers=[warm]).result()  # Dask learns the task duration
        since = time.time()
        futures, makespan = timed(lambda: client.map(model_task, range(n_tasks)))
        records = client.gather(futures)
        out = summarize(client, records, makespan, since)
        out["warm_worker"] = warm
        out["correct"] = sum(r["value"] == (i, MODEL) for i, r in enumerate(records))
        out["tasks"] = task_rows(records, since)
        return out


def run_multi(plugin: bool, n_tasks: int, load_seconds: float, seed: int) -> dict[str, Any]:
    """``multi``: four contexts, room for one per worker, random order."""
    contexts = [
        dp.Context(name, load=partial(sleep_load, seconds=load_seconds, tag=name), device="cpu", nbytes="1MiB")
        for name in MULTI_CONTEXTS
    ]
    order = [MULTI_CONTEXTS[i % len(MULTI_CONTEXTS)] for i in range(n_tasks)]
    random.Random(seed).shuffle(order)

    with fresh_cluster() as (_, client):
        dp.install(client, contexts, max_bytes="1.5MiB", scheduler=plugin)
        since = time.time()
        futures, makespan = timed(partial(submit_annotated, client, order))
        records = client.gather(futures)
        out = summarize(client, records, makespan, since)
        out["correct"] = sum(r["value"] == (i, name) for i, (r, name) in enumerate(zip(records, order)))
        out["tasks"] = task_rows(records, since)
        return out


def submit_annotated(client: Client, order: list[str]) -> list[Future]:
    """Submit ``multi_task(i)`` one by one, each annotated with its context ``order[i]``."""
    futures = []
    for i, name in enumerate(order):
        with dask.annotate(context=name):
            futures.append(client.submit(multi_task, i))
    return futures


def kill_worker(cluster: LocalCluster, address: str) -> None:
    """SIGKILL the process of worker ``address`` (its nanny then starts a replacement)."""
    nanny = next(n for n in cluster.workers.values() if n.worker_address == address)
    os.kill(nanny.pid, signal.SIGKILL)


def wait_done(futures: list[Future], n: int) -> None:
    """Block until at least ``n`` of ``futures`` finished."""
    while sum(f.status == "finished" for f in futures) < n:
        time.sleep(0.005)


def worker_state_at(client: Client) -> dict[str, str]:
    """``{worker: state of the model context}``, from the workers' caches."""
    return {r["worker"]: r["state"] for r in dp.stats(client) if r["context"] == MODEL}


def run_preempt(plugin: bool, n_tasks: int, load_seconds: float, kill_fraction: float) -> dict[str, Any]:
    """``preempt``: two warm workers, kill one after ``kill_fraction`` of the tasks."""
    with fresh_cluster() as (cluster, client):
        dp.install(client, [model_context(load_seconds)], scheduler=plugin)
        warm = worker_addresses(client)[:2]
        dp.prewarm(client, MODEL, workers=warm, progress=False)
        client.submit(model_task, -1, workers=[warm[0]]).result()  # Dask learns the task duration
        since = time.time()
        t0 = time.perf_counter()
        futures = client.map(model_task, range(n_tasks))
        wait_done(futures, int(n_tasks * kill_fraction))
        states = worker_state_at(client)
        victim = warm[0]
        killed_at = time.time()
        kill_worker(cluster, victim)
        wait(futures)
        makespan = time.perf_counter() - t0
        records = client.gather(futures)
        held = sum(victim in holders for holders in client.who_has(futures).values())
        out = summarize(client, records, makespan, since)
        after = [r for r in records if r["start"] >= killed_at]
        out.update(
            victim=victim,
            kill_at_s=round(killed_at - since, 3),
            state_at_kill=states,
            workers_after=worker_addresses(client),
            correct=sum(r["value"] == (i, MODEL) for i, r in enumerate(records)),
            # Held there per who_has, or computed there (then lost, so recomputation failed).
            results_on_dead_worker=held + sum(r["worker"] == victim for r in records),
            post_kill_tasks=len(after),
            post_kill_by_state=dict(Counter(states.get(r["worker"], "replacement") for r in after)),
            post_kill_per_worker=dict(Counter(r["worker"] for r in after)),
            post_kill_waited=sum(r["waited"] for r in after),
            loads_after_kill=loads_started(client, since, killed_at),
            joined_after_kill=workers_joined(client, since, killed_at),
            tasks=task_rows(records, since),
        )
        return out


#: Scheduler plugin methods timed in ``plain`` (``replan`` also runs from the periodic tick).
_TIMED_HOOKS = ("update_graph", "transition", "replan", "add_worker", "remove_worker", "log_event")


def time_plugin_hooks(dask_scheduler: Any) -> None:
    """Wrap the scheduler plugin's hooks to accumulate the wall time spent in them (outermost calls)."""
    plugin = dask_scheduler.plugins[PLUGIN_NAME]
    clock = plugin.bench_clock = {"seconds": 0.0, "depth": 0}

    def timed_hook(hook: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            clock["depth"] += 1
            t0 = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                clock["depth"] -= 1
                if clock["depth"] == 0:  # replan inside update_graph counts once
                    clock["seconds"] += time.perf_counter() - t0

        return wrapper

    for name in _TIMED_HOOKS:
        setattr(plugin, name, timed_hook(getattr(plugin, name)))


def plugin_hook_seconds(dask_scheduler: Any) -> float | None:
    """Seconds spent in the scheduler plugin's hooks so far (``None`` without the plugin)."""
    plugin = dask_scheduler.plugins.get(PLUGIN_NAME)
    return plugin.bench_clock["seconds"] if plugin is not None else None


def plain_once(client: Client, n_tasks: int) -> dict[str, Any]:
    """Time ``n_tasks`` no-op tasks: throughput, and the time spent in scheduler plugin hooks."""
    hooks = client.run_on_scheduler(plugin_hook_seconds)
    # pure=False: fresh keys each repetition, so no result of the previous one is reused.
    futures, seconds = timed(lambda: client.map(inc, range(n_tasks), pure=False))
    if hooks is not None:
        hooks = round(client.run_on_scheduler(plugin_hook_seconds) - hooks, 3)
    correct = sum(client.gather(futures)) == sum(range(1, n_tasks + 1))
    return {
        "seconds": round(seconds, 3),
        "tasks_per_s": round(n_tasks / seconds, 1),
        "plugin_hook_s": hooks,
        "correct": correct,
    }


def run_plain(n_tasks: int, load_seconds: float, repetitions: int) -> dict[str, Any]:
    """``plain``: on/off repetitions interleaved; median throughputs and their ratio.

    Both clusters stay up for all repetitions (starting six clusters would
    cost more than the measurements), and the on/off order alternates, so
    drift in machine load hits both variants alike. The time spent inside the
    plugin's hooks bounds its overhead independently of that drift.
    """
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    clients: dict[str, Client] = {}
    with ExitStack() as stack:
        for variant in runs:
            _, clients[variant] = stack.enter_context(fresh_cluster())
            dp.install(clients[variant], [model_context(load_seconds)], scheduler=variant == "on")
            if variant == "on":
                clients[variant].run_on_scheduler(time_plugin_hooks)
            wait(clients[variant].map(inc, range(-100, 0)))  # import this module on workers before timing
        for rep in range(repetitions):
            for variant in ("on", "off") if rep % 2 == 0 else ("off", "on"):
                runs[variant].append(plain_once(clients[variant], n_tasks))
    out: dict[str, Any] = {
        v: {
            "runs": runs[v],
            "median_tasks_per_s": statistics.median(r["tasks_per_s"] for r in runs[v]),
        }
        for v in runs
    }
    out["ratio"] = round(out["on"]["median_tasks_per_s"] / out["off"]["median_tasks_per_s"], 3)
    out["on"]["hook_share_pct"] = round(
        statistics.median(100 * r["plugin_hook_s"] / r["seconds"] for r in runs["on"]), 2
    )
    return out


# -- driver ------------------------------------------------------------------------------
def run_scenario(name: str, load_seconds: float, multi_load_seconds: float, seed: int) -> dict[str, Any]:
    """Run scenario ``name`` with the plugin on and off: ``{"on": ..., "off": ...}`` (``plain``: and the ratio)."""
    if name == "plain":
        return run_plain(PLAIN_TASKS, load_seconds, PLAIN_REPETITIONS)
    run: Callable[[bool], dict[str, Any]] = {
        "few": partial(run_single_warm, n_tasks=FEW_TASKS, load_seconds=load_seconds),
        "backlog": partial(run_single_warm, n_tasks=BACKLOG_TASKS, load_seconds=load_seconds),
        "multi": partial(run_multi, n_tasks=MULTI_TASKS, load_seconds=multi_load_seconds, seed=seed),
        "preempt": partial(
            run_preempt, n_tasks=PREEMPT_TASKS, load_seconds=load_seconds, kill_fraction=PREEMPT_KILL_FRACTION
        ),
    }[name]
    return {variant: run(variant == "on") for variant in ("on", "off")}


if __name__ == "__main__":
    # The entry point moved; without this, running the module would silently do nothing.
    raise SystemExit("use: python -m dask_pervasive.bench placement (see --help)")
