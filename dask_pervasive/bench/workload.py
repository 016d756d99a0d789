"""The benchmark workload: fact verification with a real ``transformers`` model.

Everything here runs on workers too, so it lives at module level and workers
unpickle it by reference to ``dask_pervasive.bench.workload``.

* :func:`make_items` builds (claim, evidence passage) pairs; a task scores a
  batch of them with :func:`score_batch`: two batched forward passes (claim
  after the evidence, claim alone) and the difference of the claim's mean
  token log-likelihood, positive when the evidence supports the claim.
* :func:`fetch_and_load` is what the baselines do to get a model: copy the
  context's directory from the origin URL into a fresh temporary directory
  with fsspec ``get``, then ``from_pretrained`` model and tokenizer — the same
  two steps :class:`dask_pervasive.TransformersContext` performs.
* :data:`MODEL_SIZES` names the model configurations (``--model``);
  ``--model minilm`` (:data:`MINILM`) is the pretrained all-MiniLM-L6-v2
  sentence encoder instead: a task then scores each pair by the cosine
  similarity of the claim's and the evidence's embeddings
  (:func:`encoder_scores`), the retrieval score of a FEVER-style pipeline.
  Which kind a model directory holds is read from its ``config.json``
  (:func:`model_class_for`).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from dask_pervasive.testing.models import CORPUS

SENTENCES = [
    *CORPUS,
    "The Eiffel Tower is in Rome.",
    "Water freezes at zero degrees Celsius.",
    "The Sun rises in the east.",
    "Paris is the capital of France.",
    "Berlin is the capital of Spain.",
    "Sound travels faster than light.",
    "Mount Everest is in the Himalayas.",
    "Python was created by Linus Torvalds.",
    "Dask runs tasks on many workers at once.",
    "The Moon is made of cheese.",
    "Cats are mammals and spiders have eight legs.",
    "A week has seven days.",
    "Bees make honey from the nectar of flowers.",
    "The Earth orbits the Sun once a year.",
    "Gold is heavier than water.",
    "Whales are mammals that live in the ocean.",
]

#: Sentences per evidence passage (about 160 tokens): long enough that one item's forward
#: passes are real work, so that per-task overheads stay small next to them.
EVIDENCE_SENTENCES = 10


@dataclass(frozen=True)
class ModelSize:
    """A ``GPT2Config`` size for :func:`dask_pervasive.testing.make_tiny_gpt2`."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    description: str

    def as_kwargs(self) -> dict[str, int]:
        return {"n_layer": self.n_layer, "n_embd": self.n_embd, "n_head": self.n_head, "n_positions": 512}


MODEL_SIZES = {
    s.name: s
    for s in (
        ModelSize("tiny", 4, 256, 4, "4 layers x 256, about 13 MB: the default, sized for 2 CPU cores"),
        ModelSize("large", 8, 512, 8, "8 layers x 512, about 100 MB"),
        ModelSize("gpu", 12, 1024, 16, "12 layers x 1024, about 600 MB: the default when CUDA is present"),
    )
}


#: ``--model`` name of the pretrained sentence encoder (see :func:`dask_pervasive.bench.harness.build_minilm_models`).
MINILM = "minilm"
MINILM_DESCRIPTION = "the pretrained all-MiniLM-L6-v2 sentence encoder (6-layer BERT, 91 MB), scores by cosine"
#: Every ``--model`` choice.
MODEL_CHOICES = (*MODEL_SIZES, MINILM)
#: ``model_type`` values of sentence encoders (loaded with ``AutoModel``, scored by :func:`encoder_scores`).
ENCODER_TYPES = frozenset({"bert"})


def model_class_for(path: str) -> str:
    """The ``transformers`` auto class for the model directory ``path``, from its ``config.json``."""
    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    return "AutoModel" if model_type in ENCODER_TYPES else "AutoModelForCausalLM"


def model_description(name: str) -> str:
    """What ``--model name`` is (the help text)."""
    return MINILM_DESCRIPTION if name == MINILM else MODEL_SIZES[name].description


def make_items(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` deterministic (claim, evidence passage) pairs.

    The evidence is :data:`EVIDENCE_SENTENCES` other sentences, one of which
    may be the claim itself (so some claims are "supported" by construction,
    although the random model's verdicts mean nothing).
    """
    rng = random.Random(seed)
    items = []
    for claim in itertools.islice(itertools.cycle(SENTENCES), n):
        evidence = rng.sample([s for s in SENTENCES if s != claim], EVIDENCE_SENTENCES)
        if rng.random() < 0.5:
            evidence[rng.randrange(EVIDENCE_SENTENCES)] = claim
        items.append((claim, " ".join(evidence)))
    rng.shuffle(items)
    return items


def batches(items: list[Any], size: int) -> list[list[Any]]:
    """``items`` cut into consecutive batches of ``size`` (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def _claim_loglik(model: Any, rows: list[list[int]], claim_lens: list[int], pad: int, device: str) -> Any:
    """Mean log-likelihood of the last ``claim_lens[i]`` tokens of each row (one padded forward pass)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, (row, n) in enumerate(zip(rows, claim_lens)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        target[i, len(row) - n - 1 : len(row) - 1] = True  # logits at t predict token t + 1
    ids, mask, target = ids.to(device), mask.to(device), target.to(device)
    logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
    token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    return (token_logp * target).sum(-1) / target.sum(-1)


def micro_batch(device: str) -> int:
    """Items per forward pass: 1 on the CPU, 16 on a GPU.

    On the CPU, each item runs its own forward passes (no padding): the
    per-item cost is then the same for every batch size, and the batch-sweep
    measures what a task's size costs each strategy (scheduling, loads), not
    how well torch's CPU kernels use a bigger matrix, which on 2 shared cores
    varies by 1.2-1.6x with the machine's load. A GPU needs batched tensors.
    """
    return 16 if device.startswith("cuda") else 1


def score_batch(model: Any, tokenizer: Any, device: str, items: list[tuple[str, str]]) -> list[float]:
    """Support score of each (claim, evidence) pair: log p(claim | evidence) - log p(claim), per token.

    Items go through the model :func:`micro_batch` at a time. Right padding
    with an attention mask leaves every row's result as if it ran alone (up to
    float rounding), so any batching scores the same. A sentence encoder
    (:data:`ENCODER_TYPES`) scores with :func:`encoder_scores` instead.
    """
    import torch

    if model.config.model_type in ENCODER_TYPES:
        return encoder_scores(model, tokenizer, device, items)

    bos = tokenizer.bos_token_id
    claims = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c, _ in items]
    evidence = [tokenizer(e, add_special_tokens=False)["input_ids"] for _, e in items]
    step = micro_batch(device)
    scores: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(items), step):
            c, e = claims[i : i + step], evidence[i : i + step]
            lens = [len(x) for x in c]
            with_evidence = _claim_loglik(model, [[bos, *ev, *cl] for ev, cl in zip(e, c)], lens, bos, device)
            alone = _claim_loglik(model, [[bos, *cl] for cl in c], lens, bos, device)
            scores.extend((with_evidence - alone).cpu().tolist())
    return scores


def _embed(model: Any, tokenizer: Any, device: str, texts: list[str]) -> Any:
    """Mean-pooled, L2-normalised embeddings (how all-MiniLM-L6-v2 was trained), one padded pass."""
    import torch

    batch = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt").to(device)
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def encoder_scores(model: Any, tokenizer: Any, device: str, items: list[tuple[str, str]]) -> list[float]:
    """Support score of each (claim, evidence) pair with a sentence encoder: cosine of their embeddings.

    Items go through the model :func:`micro_batch` at a time, as in :func:`score_batch`.
    """
    import torch

    step = micro_batch(device)
    scores: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(items), step):
            part = items[i : i + step]
            claims = _embed(model, tokenizer, device, [c for c, _ in part])
            evidence = _embed(model, tokenizer, device, [e for _, e in part])
            scores.extend((claims * evidence).sum(-1).cpu().tolist())
    return scores


def default_device() -> str:
    """What ``device="auto"`` resolves to: this worker's first GPU, else the CPU."""
    from dask_pervasive.devices import resolve_device

    return resolve_device("auto")


@dataclass
class Loaded:
    """A model the baselines loaded themselves, with what it cost."""

    model: Any
    tokenizer: Any
    device: str
    nbytes: int  #: host + device bytes of parameters and buffers (as dask_pervasive measures them)
    fetch_s: float
    load_s: float  #: fetch + from_pretrained
    origin_bytes: int


def fetch_and_load(url: str) -> Loaded:
    """Copy ``url`` (a model directory) into a temporary directory with fsspec, then ``from_pretrained``.

    The temporary copy is removed once loaded: a baseline keeps the model in
    memory, not its files.
    """
    import fsspec
    import torch
    import transformers

    from dask_pervasive.devices import measure_nbytes

    start = time.perf_counter()
    fs, root = fsspec.core.url_to_fs(url)
    local = tempfile.mkdtemp(prefix="bench-model-")
    try:
        files = fs.find(root)
        fs.get(files, local + os.sep)
        fetched = time.perf_counter()
        nbytes_read = sum(os.path.getsize(os.path.join(local, f)) for f in os.listdir(local))
        device = default_device()
        auto = getattr(transformers, model_class_for(local))
        model = auto.from_pretrained(local, dtype=torch.float32).to(device).eval()
        model.requires_grad_(False)
        tokenizer = transformers.AutoTokenizer.from_pretrained(local)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    host, dev = measure_nbytes(model)
    return Loaded(model, tokenizer, device, host + dev, fetched - start, time.perf_counter() - start, nbytes_read)
