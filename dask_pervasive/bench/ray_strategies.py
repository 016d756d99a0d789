"""Ray as the peer system: the strategies a user would pick instead of Dask, on the same workload.

``ray-data``
    Ray Data ``map_batches`` with a callable class (:class:`RayScorer`) on a
    fixed actor pool (``concurrency=n_slots``), one job per row and per
    batch. With one context (steady) each actor loads it once, in
    ``__init__``; with several (multi) each actor keeps the same LRU cache as
    the ``actors`` strategy (:class:`~dask_pervasive.bench.strategies.ModelLRU`,
    same capacity in bytes), since a Ray Data pool has one callable for every
    row.
``ray-serve``
    A Ray Serve deployment of ``n_slots`` replicas whose model comes from
    ``@serve.multiplexed(max_num_models_per_replica=k)``, ``k`` = how many
    models the context budget fits (steady: 1); each job is one request with
    ``multiplexed_model_id`` = its context, so Serve routes it to a replica
    that has the model when it can.

Both fetch the model with :func:`~dask_pervasive.bench.workload.fetch_and_load`
(the Dask baselines' loader: fsspec from the same bandwidth-capped origin) and
score with :func:`~dask_pervasive.bench.workload.score_batch`; they return the
same per-job records as the Dask strategies, so loads, origin bytes and scores
are counted and compared the same way.

CPU slots (see docs/benchmarks.md)
----------------------------------
``ray.init(num_cpus=n_slots)``, and ``n_slots`` actors or replicas, each one
process with one torch thread (``OMP_NUM_THREADS=1``, as the Dask workers):
``n_slots`` compute slots, like ``n_slots`` single-threaded Dask workers.
Ray Data actors ask for :data:`ACTOR_CPUS` (0.5) logical CPUs each: with one
CPU each, the pool takes every CPU and Ray Data's own tasks starve
(measured on 2 CPUs: a deadlock, "backpressured: ResourceBudget"). Serve
replicas ask for one CPU each (Serve runs no tasks of its own; the
controller takes none and the HTTP proxy is off).

Timing
------
``ray.init`` (``ray_init_s``) and the set-up (``setup_s``: Serve's
deployment, or warming Ray's worker processes) are outside the makespan, as
the Dask strategies' cluster start and ``dp.install`` are. The Dask workers
fork from a process that imported torch and transformers once; Ray starts its
worker processes itself, so the set-up runs one task per slot that imports the
same modules (:data:`~dask_pervasive.bench.harness.PRELOAD`) and the actors
reuse those idle workers. Each record says how long the actor's imports took
(``import_s``), so a cold import inside the makespan shows.

Interface for the harness: :data:`RAY_STRATEGY_NAMES`, :func:`unavailable`
(why a Ray strategy cannot run a scenario, or ``None``) and
:func:`run_strategy` (one timed run, the same result dict as
:func:`dask_pervasive.bench.scenarios.run_strategy`). Its targets are
:func:`dask_pervasive.bench.targets.ray_checks`.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dask_pervasive.bench.harness import ENVIRONMENT, PRELOAD, Job, Progress, Session
from dask_pervasive.bench.strategies import ModelLRU
from dask_pervasive.bench.workload import Loaded, fetch_and_load, score_batch

RAY_STRATEGY_NAMES = ("ray-data", "ray-serve")
#: Scenarios the Ray strategies run (no preemption or scale-out on a single-node Ray here).
RAY_SCENARIOS = ("steady", "multi")
#: Logical CPUs per Ray Data actor (see the module notes: a whole CPU each starves Ray Data's tasks).
ACTOR_CPUS = 0.5
#: Jobs queued per Ray Data actor: 2 overlaps the next row's hand-over with the current job
#: (Ray's advice for pipelining) and leaves at most one job of imbalance at the end.
IN_FLIGHT = 2
#: The install hint printed when Ray is missing.
INSTALL_HINT = 'pip install "dask-pervasive[bench-ray]"'


def ray_installed() -> bool:
    """Whether ``ray`` (with Data and Serve) can be imported."""
    return all(importlib.util.find_spec(m) is not None for m in ("ray", "ray.data", "ray.serve"))


def unavailable(name: str, scenario: str) -> str | None:
    """Why Ray strategy ``name`` cannot run ``scenario`` here (a line to print), or ``None``."""
    if name not in RAY_STRATEGY_NAMES:
        return f"{name} is not a Ray strategy"
    if not ray_installed():
        return f"skipping {name} in {scenario}: Ray is not installed ({INSTALL_HINT})"
    if scenario not in RAY_SCENARIOS:
        return f"skipping {name} in {scenario}: the Ray strategies run {', '.join(RAY_SCENARIOS)} only"
    return None


# -- actor side ------------------------------------------------------------------------------
def preload_modules() -> float:
    """Import :data:`PRELOAD` (what the Dask workers' forkserver imported); seconds it took."""
    t0 = time.perf_counter()
    for module in PRELOAD:
        importlib.import_module(module)
    return time.perf_counter() - t0


class LoadLog:
    """Every model load of a run, as the actors and replicas report them (a Ray actor, no CPU).

    Counted here rather than from job records: a Ray Data actor that loads in
    ``__init__`` and then gets no row would otherwise load unseen.
    """

    def __init__(self) -> None:
        self.loads: list[dict[str, Any]] = []
        self.starts: list[dict[str, Any]] = []

    def add(self, load: dict[str, Any]) -> None:
        self.loads.append(load)

    def started(self, start: dict[str, Any]) -> None:
        self.starts.append(start)

    def all(self) -> list[dict[str, Any]]:
        return self.loads

    def all_starts(self) -> list[dict[str, Any]]:
        return self.starts


#: The :class:`LoadLog` actor's name.
LOAD_LOG = "dask-pervasive-bench-loads"


def log_load(worker: str, url: str, loaded: Loaded) -> None:
    """Report one load to the :class:`LoadLog` (waits for it: the run's count must be complete)."""
    import ray

    load = {"worker": worker, "url": url, "t": time.time(), "load_s": loaded.load_s}
    ray.get(ray.get_actor(LOAD_LOG).add.remote({**load, "origin_bytes": loaded.origin_bytes}))


def log_start(worker: str) -> None:
    """Report when this actor's process started and when its ``__init__`` began (wall clock)."""
    import psutil
    import ray

    start = {"worker": worker, "process_start": psutil.Process().create_time(), "init_start": time.time()}
    ray.get(ray.get_actor(LOAD_LOG).started.remote(start))


def _worker_id() -> str:
    import ray

    ctx = ray.get_runtime_context()
    return f"ray-actor-{ctx.get_actor_id() or ctx.get_worker_id()}"


def ray_record(worker: str, loaded: Loaded, items: Any, fresh: bool, import_s: float) -> dict[str, Any]:
    """A job's record, as :func:`dask_pervasive.bench.strategies._record` makes it, with ``import_s``."""
    start = time.time()
    t0, cpu0 = time.perf_counter(), time.thread_time()
    scores = score_batch(loaded.model, loaded.tokenizer, loaded.device, [tuple(i) for i in items])
    compute_s, cpu_s = time.perf_counter() - t0, time.thread_time() - cpu0
    return {
        "worker": worker,
        "start": start - (loaded.load_s if fresh else 0.0),
        "end": time.time(),
        "compute_s": compute_s,
        "cpu_s": cpu_s,
        "loads": int(fresh),
        "load_s": loaded.load_s if fresh else 0.0,
        "load_end": start if fresh else None,
        "origin_bytes": loaded.origin_bytes if fresh else 0,
        "scores": scores,
        "import_s": import_s,
    }


class RayScorer:
    """The Ray Data callable class: models by URL, loaded once per actor.

    Parameters
    ----------
    capacity
        LRU capacity in bytes (``None``: unlimited), as the ``actors`` strategy.
    preload
        A model URL to load in ``__init__`` (the steady case); its load is
        reported with the first job this actor scores.
    """

    def __init__(self, capacity: int | None, preload: str | None = None) -> None:
        self.import_s = preload_modules()
        self.worker = _worker_id()
        log_start(self.worker)
        self.cache = ModelLRU(capacity)
        self.unreported: set[str] = set()
        if preload is not None:
            log_load(self.worker, preload, self.cache.get(preload)[0])
            self.unreported.add(preload)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"index": [], "record": []}
        for index, url, items in zip(batch["index"], batch["url"], batch["items"]):
            loaded, fresh = self.cache.get(url)
            if fresh:
                log_load(self.worker, url, loaded)
            fresh = fresh or url in self.unreported  # the record shows the __init__ load too
            self.unreported.discard(url)
            record = ray_record(self.worker, loaded, json.loads(items), fresh, self.import_s)
            out["index"].append(int(index))
            out["record"].append(json.dumps(record))
        return out


def warm_worker() -> int:
    """A Ray task: import the libraries in this worker process (set-up, before the clock)."""
    preload_modules()
    return os.getpid()


def serve_app(urls: dict[str, str], models_per_replica: int, n_slots: int) -> Any:
    """The Serve application: ``n_slots`` replicas, ``models_per_replica`` multiplexed models each."""
    from ray import serve

    @serve.deployment(
        num_replicas=n_slots,
        max_ongoing_requests=1,  # one job at a time per replica, as one Dask worker thread
        ray_actor_options={"num_cpus": 1},
    )
    class MultiplexedScorer:
        def __init__(self, urls: dict[str, str]) -> None:
            self.import_s = preload_modules()
            self.urls = urls
            self.worker = _worker_id()
            log_start(self.worker)
            self.fresh: set[str] = set()

        @serve.multiplexed(max_num_models_per_replica=models_per_replica)
        async def get_model(self, model_id: str) -> Loaded:
            loaded = await asyncio.to_thread(fetch_and_load, self.urls[model_id])
            await asyncio.to_thread(log_load, self.worker, self.urls[model_id], loaded)
            self.fresh.add(model_id)
            return loaded

        async def __call__(self, items: str) -> str:
            model_id = serve.get_multiplexed_model_id()
            loaded = await self.get_model(model_id)
            fresh = model_id in self.fresh
            self.fresh.discard(model_id)
            record = await asyncio.to_thread(ray_record, self.worker, loaded, json.loads(items), fresh, self.import_s)
            return json.dumps(record)

    return MultiplexedScorer.bind(urls)


# -- driver side -------------------------------------------------------------------------------
@dataclass
class RayRun:
    """One timed Ray run: records in job order and its clocks."""

    records: list[dict[str, Any]]
    makespan: float
    since: float
    until: float
    ray_init_s: float
    setup_s: float
    config: dict[str, Any] = field(default_factory=dict)
    loads: list[dict[str, Any]] = field(default_factory=list)  #: from the LoadLog
    starts: list[dict[str, Any]] = field(default_factory=list)  #: actor starts, from the LoadLog


class _NoDaskEvents:
    """Stands in for a Dask client in :func:`summarize_run`: Ray has no Dask scheduler events (no joins)."""

    def get_events(self, topic: str) -> list[Any]:
        return []


def _init_ray(n_slots: int, attempts: int = 3) -> float:
    """``ray.init`` with ``n_slots`` CPUs; seconds it took (all attempts).

    Retried: Ray waits a fixed 30 s for its raylet, which a crowded machine
    can miss ("The current node timed out during startup").
    """
    import ray

    t0 = time.perf_counter()
    for attempt in range(attempts):
        try:
            ray.init(
                num_cpus=n_slots,
                include_dashboard=False,
                log_to_driver=False,
                logging_level="ERROR",
                # Every Ray worker process imports the libraries when it starts (the Dask workers
                # fork from a process that has them); the set-up then waits for it (_warm_workers).
                runtime_env={
                    "env_vars": dict(ENVIRONMENT),
                    "worker_process_setup_hook": f"{__name__}.preload_modules",
                },
            )
            break
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise
    return time.perf_counter() - t0


def _warm_workers(n_slots: int) -> None:
    """Start and warm ``n_slots`` worker processes, which the actors then reuse."""
    import ray

    ray.get([ray.remote(num_cpus=ACTOR_CPUS)(warm_worker).remote() for _ in range(n_slots)])


def _run_data(
    jobs: list[Job], urls: dict[str, str], n_slots: int, capacity: int | None, reset: Callable[[], None]
) -> RayRun:
    import ray

    t0 = time.perf_counter()
    _warm_workers(n_slots)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    contexts = sorted({j.context for j in jobs})
    rows = [{"index": j.index, "url": urls[j.context], "items": json.dumps(j.items)} for j in jobs]
    setup_s = time.perf_counter() - t0
    reset()
    since, t0 = time.time(), time.perf_counter()
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        RayScorer,
        fn_constructor_kwargs={
            "capacity": capacity,
            "preload": urls[contexts[0]] if len(contexts) == 1 else None,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=n_slots, max_tasks_in_flight_per_actor=IN_FLIGHT),
        num_cpus=ACTOR_CPUS,
    )
    out = {int(r["index"]): json.loads(r["record"]) for r in ds.iter_rows()}
    makespan = time.perf_counter() - t0
    config = {
        "compute": f"ActorPoolStrategy(size={n_slots}, max_tasks_in_flight_per_actor={IN_FLIGHT})",
        "num_cpus_per_actor": ACTOR_CPUS,
        "batch_size": 1,
        "lru_capacity": capacity,
    }
    return RayRun([out[j.index] for j in jobs], makespan, since, time.time(), 0.0, setup_s, config)


def _run_serve(
    jobs: list[Job], urls: dict[str, str], n_slots: int, capacity: int | None, nbytes: int, reset: Callable[[], None]
) -> RayRun:
    from ray import serve

    contexts = sorted({j.context for j in jobs})
    per_replica = len(contexts) if capacity is None else max(1, min(len(contexts), capacity // nbytes))
    t0 = time.perf_counter()
    serve.start(proxy_location="Disabled")
    handle = serve.run(serve_app(urls, per_replica, n_slots), name="bench", route_prefix=None)
    setup_s = time.perf_counter() - t0
    reset()
    since, t0 = time.time(), time.perf_counter()
    responses = [handle.options(multiplexed_model_id=j.context).remote(json.dumps(j.items)) for j in jobs]
    records = [json.loads(r.result(timeout_s=600)) for r in responses]
    makespan = time.perf_counter() - t0
    until = time.time()
    serve.shutdown()
    config = {"num_replicas": n_slots, "num_cpus_per_replica": 1, "max_ongoing_requests": 1}
    config["max_num_models_per_replica"] = per_replica
    return RayRun(records, makespan, since, until, 0.0, setup_s, config)


def run_ray(name: str, jobs: list[Job], env: Any, n_slots: int, capacity: int | None) -> RayRun:
    """Start Ray with ``n_slots`` CPUs, run ``jobs`` with strategy ``name`` (timed), shut Ray down.

    ``env`` is the scenario's :class:`~dask_pervasive.bench.scenarios.Env`
    (the origin, the models, one model's parameter bytes); the origin's
    counters are reset just before the clock starts.
    """
    import ray

    if name not in RAY_STRATEGY_NAMES:
        raise ValueError(f"unknown Ray strategy {name!r}; choose from {', '.join(RAY_STRATEGY_NAMES)}")
    urls = {m.name: env.origin.url(m.rel) for m in env.models}
    ray_init_s = _init_ray(n_slots)
    try:
        log = ray.remote(num_cpus=0)(LoadLog).options(name=LOAD_LOG).remote()
        ray.get(log.all.remote())
        if name == "ray-data":
            run = _run_data(jobs, urls, n_slots, capacity, env.origin.reset_counters)
        else:
            run = _run_serve(jobs, urls, n_slots, capacity, env.model_nbytes, env.origin.reset_counters)
        run.loads = [x for x in ray.get(log.all.remote()) if x["t"] >= run.since]
        run.starts = ray.get(log.all_starts.remote())
    finally:
        ray.shutdown()
    run.ray_init_s = ray_init_s
    return run


def run_strategy(
    name: str,
    jobs: list[Job],
    env: Any,
    n_slots: int,
    capacity: int | None,
    summarize: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """One timed Ray run summarised like a Dask strategy's run.

    Parameters
    ----------
    name
        ``"ray-data"`` or ``"ray-serve"``.
    jobs
        The scenario's jobs (identical for every strategy).
    env
        The scenario's ``Env`` (origin, models, ``model_nbytes``).
    n_slots
        CPU slots: the Dask runs' worker count.
    capacity
        Context budget per slot in bytes (``None``: unlimited).
    summarize
        :func:`dask_pervasive.bench.scenarios.summarize_run` (passed in, so
        this module does not import the scenarios that call it).

    Returns
    -------
    dict
        ``summarize``'s metrics (loads and load seconds from the
        :class:`LoadLog`) plus ``setup_s``, ``ray_init_s``, ``import_s`` (the
        slowest actor's library imports in ``__init__``, 0 when the worker
        set-up hook did them), ``actor_start_s`` (from the start of the run to
        the last actor's ``__init__``: Ray Data's actor processes start inside
        the run), ``ray_config`` and ``disturbances`` (always empty).
    """
    run = run_ray(name, jobs, env, n_slots, capacity)
    session = Session(None, _NoDaskEvents(), env.origin, {m.name: m for m in env.models}, capacity, Progress(len(jobs)))
    out = summarize(name, run.records, session, n_slots, run.since, run.until, run.makespan)
    # Loads as the LoadLog saw them (records miss a Ray Data actor's __init__ load when it got no row).
    load_s = sum(x["load_s"] for x in run.loads)
    out["loads"] = len(run.loads)
    out["load_seconds"] = round(load_s, 3)
    out["load_share"] = round(load_s / out["worker_seconds"], 4) if out["worker_seconds"] else None
    out["load_events"] = [
        {"worker": x["worker"], "t": round(x["t"] - run.since, 3), "load_s": x["load_s"]}
        for x in sorted(run.loads, key=lambda x: x["t"])
    ]
    out["setup_s"] = round(run.setup_s, 3)
    out["ray_init_s"] = round(run.ray_init_s, 3)
    out["import_s"] = round(max((r.get("import_s", 0.0) for r in run.records if "error" not in r), default=0.0), 3)
    # Ray Data starts its actor processes inside the timed run (Serve's replicas start in the
    # set-up): seconds from the start to the last actor's __init__, i.e. process start and imports.
    inits = [x["init_start"] - run.since for x in run.starts if x["init_start"] >= run.since]
    out["actor_start_s"] = round(max(inits), 3) if inits else 0.0
    out["ray_config"] = run.config
    out["disturbances"] = []
    return out


# -- targets (issue 15) ---------------------------------------------------------------------------
