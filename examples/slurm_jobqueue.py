"""dask_pervasive on a SLURM cluster with dask-jobqueue.

Every SLURM job runs one Dask worker (``processes=1``) that starts with
``--preload dask_pervasive.preload --pervasive-contexts MODULE:ATTR``: the
worker installs the context cache with those contexts before it takes any
task. The scheduler, which dask-jobqueue runs in this process, gets the same
preload through ``scheduler_options`` (context-aware placement, the
``dask_pervasive_*`` Prometheus metrics and the ``/pervasive`` page).
With ``--gpus-per-job 1`` each job asks for one GPU (``#SBATCH --gres=gpu:1``);
SLURM sets ``CUDA_VISIBLE_DEVICES`` so that ``device="auto"`` is that GPU.

The contexts module must be importable on the compute nodes: by default this
file itself (``slurm_jobqueue:CONTEXTS``, found through the ``PYTHONPATH``
line the job script exports), or your own with ``--contexts mypkg.ctx:CONTEXTS``.

    python examples/slurm_jobqueue.py --print-script          # show the job script only
    python examples/slurm_jobqueue.py --queue gpu --gpus-per-job 1 --maximum-jobs 8
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import dask_pervasive as dp

EXAMPLES_DIR = os.path.dirname(os.path.abspath(__file__))
PRELOAD = "dask_pervasive.preload"
DEFAULT_CONTEXTS = "slurm_jobqueue:CONTEXTS"
TABLE_ROWS, TABLE_DIM = 2**16, 256  # 64 MiB of float32: a stand-in for model weights


def load_table(path: str | None, device: str) -> Any:
    """Build the "model": a seeded embedding table on the worker's device."""
    if device.startswith("cuda"):
        import torch

        gen = torch.Generator(device=device).manual_seed(0)
        return torch.randn(TABLE_ROWS, TABLE_DIM, generator=gen, device=device)
    import numpy as np

    return np.random.default_rng(0).standard_normal((TABLE_ROWS, TABLE_DIM), dtype="float32")


CONTEXTS = [dp.Context("table", load=load_table, device="auto")]


@dp.uses_context("table")
def embed(table: Any, ids: list[int]) -> float:
    """One pipeline task: look up a batch of rows and reduce them."""
    return float(table[ids].sum())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-script", action="store_true", help="print the job script and exit")
    parser.add_argument("--contexts", default=DEFAULT_CONTEXTS, help="MODULE:ATTR of the workers' contexts")
    parser.add_argument("--queue", default=None, help="SLURM partition")
    parser.add_argument("--account", default=None, help="SLURM account")
    parser.add_argument("--cores", type=int, default=4, help="threads per worker (one worker per job)")
    parser.add_argument("--memory", default="16GB", help="memory per job")
    parser.add_argument("--walltime", default="01:00:00")
    parser.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per job (0: CPU-only jobs)")
    parser.add_argument("--minimum-jobs", type=int, default=0)
    parser.add_argument("--maximum-jobs", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--dashboard-address", default=":8787")
    return parser.parse_args(argv)


def cluster_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``SLURMCluster`` for workers and scheduler with the preload."""
    directives = [f"--gres=gpu:{args.gpus_per_job}"] if args.gpus_per_job else []
    prologue = [f"export PYTHONPATH={shlex.quote(EXAMPLES_DIR)}${{PYTHONPATH:+:$PYTHONPATH}}"]
    return {
        "queue": args.queue,
        "account": args.account,
        "cores": args.cores,
        "processes": 1,  # one worker per job, so one GPU per worker
        "memory": args.memory,
        "walltime": args.walltime,
        "job_extra_directives": directives,
        "job_script_prologue": prologue,
        # The scheduler address comes first on the worker command line, so the
        # preload's own option parses (it would not after --scheduler-file).
        "worker_extra_args": ["--preload", PRELOAD, "--pervasive-contexts", args.contexts],
        "scheduler_options": {"preload": [PRELOAD], "dashboard_address": args.dashboard_address},
    }


def run_pipeline(client: Any, n_tasks: int) -> None:
    """Embed ``n_tasks`` batches as workers arrive; report where the table got loaded."""
    from distributed import as_completed

    batches = [[(i * 7919 + j) % TABLE_ROWS for j in range(64)] for i in range(n_tasks)]
    start = time.monotonic()
    for done, _ in enumerate(as_completed(client.map(embed, batches)), start=1):
        if done % max(1, n_tasks // 10) == 0:
            print(f"{done}/{n_tasks} batches, {len(client.scheduler_info()['workers'])} workers")
    print(f"done in {time.monotonic() - start:.1f}s")
    print("warm map:", dp.where(client))
    table = dp.stats(client)
    print(f"loads: {table.total('loads', 'table')}, hits: {table.total('hits', 'table')}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        print("this example needs dask-jobqueue: pip install dask-jobqueue", file=sys.stderr)
        return 1
    from distributed import Client

    with SLURMCluster(**cluster_kwargs(args)) as cluster:
        if args.print_script:
            print(cluster.job_script())
            return 0
        cluster.adapt(minimum_jobs=args.minimum_jobs, maximum_jobs=args.maximum_jobs)
        print(f"dashboard: {cluster.dashboard_link} (warm map at /pervasive)")
        with Client(cluster) as client:
            run_pipeline(client, args.tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
