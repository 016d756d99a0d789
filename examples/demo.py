"""dask_pervasive demo: score (claim, evidence) pairs with a model kept resident on workers.

The same fact-verification-like workload runs twice on one Dask cluster:

* ``naive``: every task loads the model itself (one ``from_pretrained`` per task);
* ``pervasive``: the model is a ``dp.TransformersContext``, loaded once per worker
  and reused by every later task on that worker.

The model is a tiny, randomly initialised GPT-2 built locally, so the verdicts
mean nothing: the demo shows the systems behaviour (loads, makespan), not accuracy.

    python examples/demo.py [--workers 4] [--tasks 200] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import tempfile
import time

import dask_pervasive as dp
from dask_pervasive.testing import CORPUS, make_tiny_gpt2

EXTRA_SENTENCES = [
    "The Eiffel Tower is in Rome.",
    "Water freezes at zero degrees Celsius.",
    "The Sun rises in the east.",
    "The Sun rises in the west.",
    "Paris is the capital of France.",
    "Berlin is the capital of Spain.",
    "Sound travels faster than light.",
    "The Atlantic is the largest ocean on Earth.",
    "Mount Everest is in the Himalayas.",
    "Python was created by Linus Torvalds.",
    "Dask runs tasks on many workers at once.",
    "The Moon is made of cheese.",
    "Cats are mammals.",
    "Spiders have six legs.",
    "A week has seven days.",
    "Bees make honey.",
    "The Earth orbits the Sun once a year.",
    "Ice is colder than boiling water.",
    "Gold is heavier than water.",
    "Whales are fish.",
]


def quiet_transformers() -> None:
    """Silence transformers' progress bars and warnings so the demo output stays readable."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_from_disk(model_dir: str):
    """What the naive strategy does in every task: ``from_pretrained`` for model and tokenizer."""
    import torch
    import transformers

    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # same choice as device="auto"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    return model, transformers.AutoTokenizer.from_pretrained(model_dir), device


def prepare_worker(model_dir: str) -> None:
    # One throwaway load per worker imports torch, transformers and the GPT-2
    # code up front (seconds, once), so the comparison is only about model loads.
    quiet_transformers()
    load_from_disk(model_dir)


def score_pair(model, tokenizer, device: str, claim: str, evidence: str) -> dict:
    """Mean log-likelihood of the claim tokens given the evidence, and a verdict."""
    import torch

    bos = [tokenizer.bos_token_id]
    claim_ids = tokenizer(" " + claim, add_special_tokens=False)["input_ids"]
    evidence_ids = tokenizer(evidence, add_special_tokens=False)["input_ids"]

    def claim_loglik(prefix: list[int]) -> float:
        ids = torch.tensor([prefix + claim_ids], device=device)
        with torch.inference_mode():
            logp = model(ids).logits.float().log_softmax(-1)[0]
        # logits at position t predict token t+1: claim tokens are predicted from len(prefix)-1 on
        n = len(prefix)
        return logp[n - 1 : -1].gather(-1, ids[0, n:, None]).mean().item()

    score = claim_loglik(bos + evidence_ids)
    # "Supported" when the evidence makes the claim more likely than it is on its own.
    verdict = "supported" if score > claim_loglik(bos) else "refuted"
    return {"claim": claim, "evidence": evidence, "score": score, "verdict": verdict}


def verify_naive(model_dir: str, claim: str, evidence: str) -> dict:
    """Baseline: load model and tokenizer from disk in every single task."""
    quiet_transformers()
    return score_pair(*load_from_disk(model_dir), claim, evidence)


@dp.uses_context("verifier")
def verify_pervasive(verifier: dp.LoadedModel, claim: str, evidence: str) -> dict:
    """Same scoring, with the model resident on the worker (loaded on first use only)."""
    return score_pair(verifier.model, verifier.tokenizer, verifier.device, claim, evidence)


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (claim, evidence) pairs from every ordered pair of distinct sentences."""
    pairs = list(itertools.permutations(CORPUS + EXTRA_SENTENCES, 2))
    random.Random(seed).shuffle(pairs)
    return list(itertools.islice(itertools.cycle(pairs), n))


def run(client, name: str, fn, *args) -> tuple[list[dict], float]:
    """Submit one task per pair, show progress, return results in order and the makespan."""
    from distributed import as_completed
    from tqdm import tqdm

    start = time.perf_counter()
    futures = client.map(fn, *args, pure=False)  # pure=False: repeated pairs are separate tasks
    for _ in tqdm(as_completed(futures), total=len(futures), desc=f"{name:>9}", unit="task"):
        pass
    results = client.gather(futures)
    return results, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--model-dir", help="model directory (built here if it has no config.json)")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    args = parser.parse_args()
    if args.workers < 1 or args.tasks < 1:
        parser.error("--workers and --tasks must be at least 1")

    # Never touch the Hugging Face Hub; the workers inherit this environment.
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from distributed import Client, LocalCluster
    from rich.console import Console
    from rich.table import Table

    console = Console()
    quiet_transformers()  # save_pretrained shows a progress bar too
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.abspath(args.model_dir or os.path.join(tmp, "tiny-gpt2"))
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            make_tiny_gpt2(model_dir, n_layer=args.n_layer, n_embd=args.n_embd, n_head=4, n_positions=256)
        claims, evidences = zip(*make_pairs(args.tasks))

        with (
            LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):
            console.print(f"{args.workers} workers, {args.tasks} tasks, dashboard: {client.dashboard_link}")
            client.run(prepare_worker, model_dir)

            naive, naive_s = run(client, "naive", verify_naive, [model_dir] * len(claims), claims, evidences)

            # Installing counts towards the pervasive makespan (it is cheap: loads happen lazily in tasks).
            start = time.perf_counter()
            dp.install(client, [dp.TransformersContext("verifier", source=f"file://{model_dir}")])
            install_s = time.perf_counter() - start
            pervasive, pervasive_s = run(client, "pervasive", verify_pervasive, claims, evidences)
            pervasive_s += install_s
            loads = int(dp.stats(client).total("loads", "verifier"))

    # Same model, same inputs, same device: both strategies must agree exactly.
    mismatches = [
        (a["claim"], a["score"], b["score"])
        for a, b in zip(naive, pervasive)
        if round(a["score"], 4) != round(b["score"], 4)
    ]
    if mismatches:
        console.print(f"[red]{len(mismatches)} scores differ between runs, e.g. {mismatches[0]}")
        return 1

    table = Table(title="naive vs pervasive (same cluster, same tasks)")
    for col in ("strategy", "tasks", "model loads", "makespan (s)", "speed-up"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    table.add_row("naive", str(len(naive)), str(len(naive)), f"{naive_s:.2f}", "1.00x")  # one load per task
    table.add_row("pervasive", str(len(pervasive)), str(loads), f"{pervasive_s:.2f}", f"{naive_s / pervasive_s:.2f}x")
    console.print(table)
    supported = sum(r["verdict"] == "supported" for r in pervasive)
    console.print(
        f"[green]scores identical in both runs for all {len(naive)} pairs (4 decimals); "
        f"{supported} supported, {len(pervasive) - supported} refuted"
    )

    examples = Table(title="example verdicts (random model: the plumbing is real, the verdicts are not)")
    for col in ("verdict", "score", "claim", "evidence"):
        examples.add_column(col, justify="right" if col == "score" else "left")
    for r in pervasive[:5]:
        examples.add_row(r["verdict"], f"{r['score']:.3f}", r["claim"], r["evidence"])
    console.print(examples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
