"""dask_pervasive on every GPU of one machine with dask-cuda's ``LocalCUDACluster``.

``LocalCUDACluster`` starts one worker per visible GPU and gives worker *i*
a ``CUDA_VISIBLE_DEVICES`` list that starts with GPU *i*, so inside each
worker ``cuda:0`` is that worker's own GPU. A context declared with
``device="auto"`` therefore resolves to ``cuda:0`` in every worker — a
different physical GPU each — and the default GPU budget
(``pervasive.worker.device-max-bytes: 0.9``) is 90% of *that* GPU's memory.
Each GPU gets its own copy of the context, loaded once and reused by every
task placed on that worker.

    python examples/local_cuda_cluster.py [--tasks 64] [--size-mib 256] [--gpus 0,1]

Without dask-cuda or a CUDA device it prints why and exits with status 0.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import dask_pervasive as dp
from dask_pervasive.devices import cuda_available


def load_weights(path: str | None, device: str, size_mib: int = 256) -> Any:
    """The "model": ``size_mib`` MiB of seeded float32 weights on the worker's device."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    return torch.randn(size_mib * 2**18, generator=gen, device=device)


@dp.uses_context("weights")
def probe(weights: Any, i: int) -> dict[str, Any]:
    """One task: use the resident weights; report where they live."""
    import torch
    from distributed import get_worker

    return {
        "worker": get_worker().address,
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "device": str(weights.device),
        "gpu": torch.cuda.get_device_name(weights.device) if weights.is_cuda else "-",
        "checksum": float(weights[: 1000 + i].sum()),
    }


def _broken_dask_cuda(exc: ImportError) -> str:
    # e.g. plain `pip install dask-cuda` lacks the CUDA bindings its [cu12]/[cu13] extras bring
    return (
        f"dask-cuda is installed but does not import: {type(exc).__name__}: {exc} "
        '(pip install "dask-cuda[cu12]", or [cu13] for CUDA 13, brings the CUDA bindings it needs)'
    )


def missing_requirement() -> str | None:
    """Why this example cannot run here, or ``None``."""
    try:
        import dask_cuda  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "dask_cuda":
            return 'dask-cuda is not installed (pip install "dask-cuda[cu12]", or [cu13] for CUDA 13)'
        return _broken_dask_cuda(exc)
    except ImportError as exc:
        return _broken_dask_cuda(exc)
    if not cuda_available():
        return "no CUDA device is visible (torch with CUDA and a GPU are needed)"
    return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--size-mib", type=int, default=256, help="size of the context on each GPU")
    parser.add_argument("--gpus", default=None, help="GPUs to use, e.g. '0,1' (default: all visible)")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument(
        "--device-max-bytes", default=None, help="GPU budget per worker, e.g. '20GiB' or 0.5 (default: config, 0.9)"
    )
    return parser.parse_args(argv)


def _visible_devices() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def report(client: Any, results: list[dict[str, Any]]) -> None:
    """One line per worker: its GPUs, its copy of the context, how many tasks used it."""
    tasks = Counter(r["worker"] for r in results)
    devices = {r["worker"]: (r["device"], r["gpu"]) for r in results}
    visible = client.run(_visible_devices)
    rows = {r["worker"]: r for r in dp.stats(client) if r["context"] == "weights"}
    print(f"{'worker':<28} {'CUDA_VISIBLE_DEVICES':<22} {'device':<8} {'loads':>5} {'tasks':>5}  GPU")
    for addr in sorted(visible):
        device, gpu = devices.get(addr, ("-", "-"))
        loads = rows.get(addr, {}).get("loads", 0)
        print(f"{addr:<28} {visible[addr] or '(unset)':<22} {device:<8} {loads:>5} {tasks[addr]:>5}  {gpu}")
    print("warm map:", dp.where(client)["weights"]["resident"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = missing_requirement()
    if reason is not None:
        print(f"local_cuda_cluster example skipped: {reason}")
        return 0
    from dask_cuda import LocalCUDACluster

    with LocalCUDACluster(CUDA_VISIBLE_DEVICES=args.gpus, threads_per_worker=args.threads) as cluster:
        run(cluster, args)
    return 0


def run(cluster: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Declare the context on ``cluster``, run the tasks, print where everything ran."""
    from distributed import Client

    context = dp.Context("weights", load=functools.partial(load_weights, size_mib=args.size_mib), device="auto")
    device_max_bytes = args.device_max_bytes
    if device_max_bytes is not None and device_max_bytes.replace(".", "", 1).isdigit():
        device_max_bytes = float(device_max_bytes)  # a fraction of each worker's GPU
    with Client(cluster) as client:
        print(f"{len(cluster.workers)} workers, one per GPU; dashboard {client.dashboard_link}")
        dp.install(client, [context], device_max_bytes=device_max_bytes)
        # One copy per GPU, loaded up front; placement then spreads the tasks over warm workers.
        dp.prewarm(client, "weights", progress=False)
        results = client.gather(client.map(probe, range(args.tasks)))
        report(client, results)
    return results


if __name__ == "__main__":
    sys.exit(main())
