"""Loader and tasks for the SLURM tests, imported by the worker processes of the sbatch jobs.

The jobs get ``tests/slurm`` on ``PYTHONPATH`` (see ``conftest.job_environment``), so tasks and
the loader are pickled by reference to this module and must stay importable with only the
package and this directory on the path.
"""

from __future__ import annotations

import os
import time

from distributed import Event

import dask_pervasive as dp

CONTEXT = "model"


def make_source(root: str, files: int = 2, size: int = 512 * 1024) -> str:
    """A directory of ``files`` files of ``size`` bytes; returns its ``file://`` URL."""
    os.makedirs(root, exist_ok=True)
    for i in range(files):
        with open(os.path.join(root, f"part-{i}.bin"), "wb") as f:
            f.write(bytes([i + 1]) * size)
    return f"file://{root}"


def load_files(path, device, seconds=1.0):
    """Read the context's (copied) files, then pretend to build a model for ``seconds``."""
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            if n.startswith("."):  # the cache's own manifest, not a model file
                continue
            with open(os.path.join(root, n), "rb") as f:
                total += len(f.read())
    time.sleep(seconds)
    return {"value": 1, "bytes": total, "pid": os.getpid()}


@dp.uses_context(CONTEXT)
def infer(model, x, seconds=0.1, gate=None):
    """A context task: returns its input, its result and the SLURM job that computed it.

    With ``gate`` (a :class:`distributed.Event` name) it waits for the event first, after the
    context is loaded: a backlog that lasts until the test has seen what it waits for.
    """
    wait_for(gate)
    time.sleep(seconds)
    return x, model["value"] + model["bytes"] + x, os.environ.get("SLURM_JOB_ID")


def expected(x: int, source_bytes: int) -> int:
    return 1 + source_bytes + x


def plain(x, gate=None):
    """A task with no context (drives adapt without touching the context); waits for ``gate`` if given."""
    wait_for(gate)
    return x


def wait_for(gate: str | None, timeout: float = 120) -> None:
    if gate is not None and not Event(gate).wait(timeout=timeout):
        raise TimeoutError(f"gate {gate!r} was not set within {timeout}s")


def job_info() -> dict:
    """What a worker's job looks like from inside: its SLURM job id and the package it imports."""
    return {"job": os.environ.get("SLURM_JOB_ID"), "package": dp.__file__, "pid": os.getpid()}
