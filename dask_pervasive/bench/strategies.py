"""The strategies compared, and the task functions they run on workers.

``naive``
    Every task fetches the model from the origin and loads it
    (:func:`naive_task`).
``global-cache``
    A module-level LRU cache of models per worker process, default Dask
    scheduling (:func:`cached_task`): what Dask users do today. Its capacity
    in bytes is the context budget ``pervasive`` gets, measured the same way.
``actors``
    A pool of Dask Actors (:class:`ModelServer`), one per worker, each with
    the same LRU cache; a client-side dispatcher feeds them from one queue,
    one call in flight per actor, and starts an actor on every worker that
    joins (replacements, scale-out). A call lost with its worker is re-queued.
``pervasive``
    ``dp.install`` with one :class:`~dask_pervasive.TransformersContext` per
    model (``source`` = the origin URL) and ``@dp.uses_context`` tasks
    (:func:`pervasive_task`).
``pervasive-origin``
    ``pervasive`` with peer transfer off (``pervasive.transfer.peers:
    false``): every worker reads the origin. Used by ``scale-out`` as the
    origin-only reference.

Every task returns a record (:func:`_record`): its scores, worker, wall-clock
start and end, compute seconds (the forward passes only) and, for the
baselines, whether and how long it loaded. ``pervasive`` loads happen inside
``get_context``, before the task body, and are read from the workers' events.
"""

from __future__ import annotations

import functools
import gc
import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import dask

import dask_pervasive as dp
from dask_pervasive.bench.harness import Job, Session
from dask_pervasive.bench.workload import Loaded, fetch_and_load, model_class_for, score_batch


# -- task side (runs on workers) -----------------------------------------------------------
def _record(model: Any, tokenizer: Any, device: str, items: Any, loaded: Loaded | None) -> dict[str, Any]:
    """Score ``items`` and describe the task (see the module docstring)."""
    from distributed import get_worker

    start = time.time()
    t0, cpu0 = time.perf_counter(), time.thread_time()
    scores = score_batch(model, tokenizer, device, list(items))
    compute_s, cpu_s = time.perf_counter() - t0, time.thread_time() - cpu0
    return {
        "worker": get_worker().address,
        "start": start - (loaded.load_s if loaded else 0.0),
        "end": time.time(),
        "compute_s": compute_s,
        "cpu_s": cpu_s,
        "loads": int(loaded is not None),
        "load_s": loaded.load_s if loaded else 0.0,
        "load_end": start if loaded else None,
        "origin_bytes": loaded.origin_bytes if loaded else 0,
        "scores": scores,
    }


def naive_task(url: str, items: Any) -> dict[str, Any]:
    """Load the model from the origin, score, drop the model."""
    loaded = fetch_and_load(url)
    return _record(loaded.model, loaded.tokenizer, loaded.device, items, loaded)


class ModelLRU:
    """Loaded models by URL, least recently used evicted beyond ``capacity`` bytes."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.models: OrderedDict[str, Loaded] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, url: str) -> tuple[Loaded, bool]:
        """``(model, loaded now)``."""
        with self.lock:
            if url in self.models:
                self.models.move_to_end(url)
                return self.models[url], False
            loaded = self.models[url] = fetch_and_load(url)
            evicted = False
            while self.capacity is not None and len(self.models) > 1 and self._bytes() > self.capacity:
                self.models.popitem(last=False)
                evicted = True
            if evicted:  # what dask_pervasive does on eviction too
                gc.collect()
                _empty_cuda_cache()
            return loaded, True

    def _bytes(self) -> int:
        return sum(m.nbytes for m in self.models.values())


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


#: The global-cache strategy's per-process cache (created by the first task).
_GLOBAL_CACHE: ModelLRU | None = None


def _global_cache(capacity: int | None) -> ModelLRU:
    global _GLOBAL_CACHE
    if _GLOBAL_CACHE is None:
        _GLOBAL_CACHE = ModelLRU(capacity)
    return _GLOBAL_CACHE


def cached_task(url: str, capacity: int | None, items: Any) -> dict[str, Any]:
    """Score with the model from this worker process's module-level cache."""
    loaded, fresh = _global_cache(capacity).get(url)
    return _record(loaded.model, loaded.tokenizer, loaded.device, items, loaded if fresh else None)


class ModelServer:
    """A Dask Actor holding models (same LRU cache as global-cache)."""

    def __init__(self, capacity: int | None) -> None:
        self.cache = ModelLRU(capacity)

    def load(self, url: str) -> bool:
        """Load ``url`` now (priming); ``True`` if it was not resident."""
        return self.cache.get(url)[1]

    def score(self, url: str, items: Any) -> dict[str, Any]:
        loaded, fresh = self.cache.get(url)
        return _record(loaded.model, loaded.tokenizer, loaded.device, items, loaded if fresh else None)


def _pervasive_body(ctx: dp.LoadedModel, items: Any) -> dict[str, Any]:
    return _record(ctx.model, ctx.tokenizer, ctx.device, items, None)


@functools.lru_cache
def pervasive_task(context: str) -> Callable[..., dict[str, Any]]:
    """The task function for ``context``: :func:`_pervasive_body` decorated with ``uses_context``.

    (One decorated function per context name; cloudpickle ships it by value,
    with the attribute the scheduler plugin reads.)
    """
    return dp.uses_context(context)(_pervasive_body)


# -- client side ---------------------------------------------------------------------------
def _gather(session: Session, futures: list[Any]) -> list[dict[str, Any]]:
    """Wait for every future in completion order, counting progress; records in job order.

    Results that finish together are fetched in one ``gather`` (fewer round
    trips to the workers than one ``result()`` per task) and then released:
    otherwise a worker killed later (preempt) takes them along and Dask
    recomputes them for nothing.
    """
    from distributed import as_completed

    index = {f.key: i for i, f in enumerate(futures)}
    out: list[dict[str, Any]] = [{}] * len(futures)
    pending = as_completed(futures)
    futures.clear()
    for batch in pending.batches():
        for future, record in zip(batch, _results(session, batch)):
            out[index[future.key]] = record
            future.release()
        session.progress.add(len(batch))
    return out


def _results(session: Session, batch: list[Any]) -> list[dict[str, Any]]:
    """Records of finished futures; an ``error`` record for a failed task (the run goes on)."""
    try:
        return session.client.gather(batch)
    except Exception:  # noqa: BLE001 - find which one failed
        records = []
        for future in batch:
            try:
                records.append(future.result())
            except Exception as exc:  # noqa: BLE001
                records.append({"error": f"{type(exc).__name__}: {exc}"})
        return records


def _submit(session: Session, jobs: list[Job], call: Callable[[Job], tuple[Callable, tuple]]) -> list[Any]:
    """Submit ``call(job) = (function, args)`` for every job, in order.

    Consecutive jobs with the same function go in one ``client.map``; every
    strategy submits the same sequence of graphs.
    """
    futures: list[Any] = []
    calls = [call(j) for j in jobs]
    for fn, group in itertools.groupby(calls, key=lambda c: c[0]):
        args = [c[1] for c in group]
        futures.extend(session.client.map(fn, *zip(*args), pure=False))
    return futures


class Strategy:
    """How one strategy starts on a cluster, warms every worker, and runs jobs.

    Only ``run`` is timed: ``start`` is set-up that exists before a workload
    (plugins, an actor pool), ``prime`` warms every worker for ``batch-sweep``,
    which measures warm throughput.
    """

    name = ""

    def start(self, session: Session, contexts: list[str]) -> None:
        """Set up on the cluster (before the clock starts)."""

    def prime(self, session: Session, contexts: list[str]) -> None:
        """Make every worker warm before a timed phase."""

    def run(self, session: Session, jobs: list[Job]) -> list[dict[str, Any]]:
        """Run ``jobs``; one record per job, in job order."""
        raise NotImplementedError


class Naive(Strategy):
    name = "naive"

    def run(self, session: Session, jobs: list[Job]) -> list[dict[str, Any]]:
        return _gather(session, _submit(session, jobs, lambda j: (naive_task, (session.url(j.context), j.items))))


def prime_global_cache(url: str, capacity: int | None) -> None:
    """Load ``url`` into this worker's global cache (``client.run``)."""
    _global_cache(capacity).get(url)


class GlobalCache(Strategy):
    name = "global-cache"

    def prime(self, session: Session, contexts: list[str]) -> None:
        for name in contexts:
            session.client.run(prime_global_cache, session.url(name), session.capacity)

    def run(self, session: Session, jobs: list[Job]) -> list[dict[str, Any]]:
        call = lambda j: (cached_task, (session.url(j.context), session.capacity, j.items))
        return _gather(session, _submit(session, jobs, call))


class Pervasive(Strategy):
    """``dp.install`` + ``uses_context``; ``peers=False`` is the origin-only variant."""

    def __init__(self, peers: bool = True) -> None:
        self.peers = peers
        self.name = "pervasive" if peers else "pervasive-origin"

    def start(self, session: Session, contexts: list[str]) -> None:
        ctxs = [
            dp.TransformersContext(n, source=session.url(n), model_class=model_class_for(session.models[n].path))
            for n in contexts
        ]
        kwargs = {"max_bytes": session.capacity} if session.capacity is not None else {}
        # The plugins read pervasive.* settings when constructed, on the client.
        with dask.config.set({"pervasive.transfer.peers": self.peers}):
            dp.install(session.client, ctxs, **kwargs)

    def prime(self, session: Session, contexts: list[str]) -> None:
        for name in contexts:
            dp.prewarm(session.client, name, progress=False)

    def run(self, session: Session, jobs: list[Job]) -> list[dict[str, Any]]:
        return _gather(session, _submit(session, jobs, lambda j: (pervasive_task(j.context), (j.items,))))


class Actors(Strategy):
    """Client-side dispatcher over one :class:`ModelServer` actor per live worker.

    One thread per actor takes the next job from a shared queue and waits for
    the call; a call that fails (its worker died) goes back to the front of
    the queue and the thread ends. A manager loop starts an actor on each
    worker without one, including replacements and workers added by
    ``cluster.scale``. Actors persist across ``run`` calls.
    """

    name = "actors"
    POLL_S = 0.1

    def __init__(self) -> None:
        self.actors: dict[str, Any] = {}
        self.cond = threading.Condition()
        self.queue: deque[tuple[int, Job]] = deque()
        self.results: dict[int, dict[str, Any]] = {}
        self.total = 0
        self.failed_calls = 0

    def start(self, session: Session, contexts: list[str]) -> None:
        for address in self._live(session):
            self._actor(session, address)

    def prime(self, session: Session, contexts: list[str]) -> None:
        for address in self._live(session):
            actor = self._actor(session, address)
            for name in contexts:
                actor.load(session.url(name)).result()

    def run(self, session: Session, jobs: list[Job]) -> list[dict[str, Any]]:
        with self.cond:
            self.queue = deque(enumerate(jobs))
            self.results = {}
            self.total = len(jobs)
        serving: dict[str, threading.Thread] = {}
        while not self._all_done():
            for address in self._live(session) - {a for a, t in serving.items() if t.is_alive()}:
                serving[address] = threading.Thread(target=self._serve, args=(session, address), daemon=True)
                serving[address].start()
            with self.cond:
                self.cond.wait(self.POLL_S)
        for thread in serving.values():
            thread.join(timeout=5)
        return [self.results[i] for i in range(self.total)]

    @staticmethod
    def _live(session: Session) -> set[str]:
        return set(session.client.scheduler_info(n_workers=-1)["workers"])

    def _actor(self, session: Session, address: str) -> Any:
        if address not in self.actors:
            future = session.client.submit(ModelServer, session.capacity, actor=True, workers=[address], pure=False)
            self.actors[address] = future.result(timeout=60)
        return self.actors[address]

    def _all_done(self) -> bool:
        with self.cond:
            return len(self.results) == self.total

    def _next(self) -> tuple[int, Job] | None:
        with self.cond:
            self.cond.wait_for(lambda: self.queue or len(self.results) == self.total)
            return self.queue.popleft() if self.queue else None

    def _serve(self, session: Session, address: str) -> None:
        try:
            actor = self._actor(session, address)
        except Exception:  # noqa: BLE001 - the worker left before its actor started
            return
        while (item := self._next()) is not None:
            index, job = item
            try:
                record = actor.score(session.url(job.context), job.items).result(timeout=300)
            except Exception:  # noqa: BLE001 - lost with its worker: another actor takes the job
                with self.cond:
                    self.actors.pop(address, None)
                    self.queue.appendleft(item)
                    self.failed_calls += 1
                    self.cond.notify_all()
                return
            with self.cond:
                self.results[index] = record
                self.cond.notify_all()
            session.progress.add()


def make_strategy(name: str) -> Strategy:
    """A fresh strategy object (actors keep per-cluster state)."""
    factories: dict[str, Callable[[], Strategy]] = {
        "naive": Naive,
        "global-cache": GlobalCache,
        "actors": Actors,
        "pervasive": Pervasive,
        "pervasive-origin": lambda: Pervasive(peers=False),
    }
    return factories[name]()


STRATEGY_NAMES = ("naive", "global-cache", "actors", "pervasive", "pervasive-origin")
#: What ``--strategies`` selects by default (pervasive-origin joins scale-out on its own).
DEFAULT_STRATEGIES = ("naive", "global-cache", "actors", "pervasive")
