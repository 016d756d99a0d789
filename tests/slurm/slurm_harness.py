"""A real one-host SLURM for the ``slurm`` tests, and dask-jobqueue clusters on it.

Not a conftest.py on purpose: tests import helpers from ``conftest`` by name, and a second
conftest module would shadow ``tests/conftest.py``.

:func:`slurm_up` (the ``slurm`` fixture of ``test_slurm_cluster.py``) runs ``slurm-up.sh``
(installs slurm-wlm and munge when missing, starts munged, slurmctld and slurmd) and, at the end,
``slurm-down.sh`` if it started the daemons (``DP_SLURM_KEEP=1`` keeps them up). Where that
cannot work (not root, no apt, a daemon that does not start) every test using it is skipped
with the script's error as the reason. A lock file serializes concurrent test sessions:
they share the one SLURM, and a fault test must not preempt another session's workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask.config
import pytest
from slurm_tasks import CONTEXT, job_info

import dask_pervasive

HERE = Path(__file__).resolve().parent
#: What the jobs must import: the package this test process imports (this worktree/checkout).
PACKAGE_ROOT = Path(dask_pervasive.__file__).resolve().parent.parent
SCRATCH = Path(os.environ.get("DP_SLURM_DIR", "/tmp/dask-pervasive-slurm"))
#: apt-get may wait up to 300 s for another apt's lock, then download and install.
UP_TIMEOUT = 900


@dataclass(frozen=True)
class Slurm:
    """The running SLURM: its config file and the commands the tests need."""

    conf: str
    dir: Path

    def run(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(
            args, check=False, capture_output=True, text=True, timeout=30, env={**os.environ, "SLURM_CONF": self.conf}
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{shlex.join(args)} exited {out.returncode}: {out.stderr.strip()}")
        return out.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Reason``, ...); ``{}`` once SLURM forgot it."""
        text = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def queued(self) -> list[str]:
        """Ids of the jobs pending, running or completing."""
        return self.run("squeue", "-h", "-o", "%i").split()

    def listpids(self, job_id: str) -> list[int]:
        """Pids of the job's processes (``scontrol listpids``; first column, header skipped)."""
        lines = self.run("scontrol", "listpids", job_id).splitlines()
        return [int(line.split()[0]) for line in lines[1:] if line.split() and line.split()[0].isdigit()]

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job and wait until the queue is empty (all 4 slots free for the next test)."""
        jobs = self.queued()
        if jobs:
            self.run("scancel", *jobs, check=False)
        wait_until(lambda: not self.queued(), timeout, "an empty SLURM queue")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def slurm_up() -> Iterator[Slurm]:
    """The running SLURM, for as long as the block lasts; ``pytest.skip`` with the reason where it cannot run."""
    if os.geteuid() != 0:
        pytest.skip(f"SLURM tests need root to install and run slurmd (uid {os.geteuid()})")
    pytest.importorskip("dask_jobqueue")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    with open(SCRATCH / "tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session's tests finish first
        try:
            up = subprocess.run(
                [str(HERE / "slurm-up.sh"), str(SCRATCH)],
                check=False,
                capture_output=True,
                text=True,
                timeout=UP_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"SLURM did not come up: slurm-up.sh ran past {UP_TIMEOUT}s")
        if up.returncode != 0:
            pytest.skip(f"SLURM did not come up: {up.stderr.strip() or up.stdout.strip()}")
        started = "SLURM_STARTED=1" in up.stdout.split()
        slurm = Slurm(conf=str(SCRATCH / "slurm.conf"), dir=SCRATCH)
        # dask-jobqueue calls sbatch/scancel/squeue from this process.
        with _environ(SLURM_CONF=slurm.conf):
            try:
                yield slurm
            finally:
                slurm.cancel_all()
                if started and os.environ.get("DP_SLURM_KEEP") != "1":
                    subprocess.run(
                        [str(HERE / "slurm-down.sh"), str(SCRATCH)], check=False, capture_output=True, timeout=60
                    )


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def job_environment(source: str) -> list[str]:
    """``job_script_prologue`` lines: this checkout's package and tests/slurm on PYTHONPATH, the context in config."""
    pythonpath = f"{HERE}:{PACKAGE_ROOT}"
    contexts = [{"name": CONTEXT, "load": "slurm_tasks:load_files", "source": source, "device": "cpu"}]
    return [
        f"export PYTHONPATH={shlex.quote(pythonpath)}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"export DASK_PERVASIVE__CONTEXTS={shlex.quote(json.dumps(contexts))}",
    ]


def cluster_kwargs(source: str, log_directory: Path) -> dict:
    """The SLURMCluster of the docs' SLURM page: one 1-CPU worker per job, preload on both sides."""
    return {
        "queue": "debug",
        "cores": 1,
        "processes": 1,
        "memory": "1GiB",
        "walltime": "00:10:00",
        "log_directory": str(log_directory),
        "job_script_prologue": job_environment(source),
        "worker_extra_args": ["--preload", "dask_pervasive.preload"],
        "scheduler_options": {"preload": ["dask_pervasive.preload"], "dashboard_address": ":0"},
    }


@contextlib.contextmanager
def slurm_cluster(slurm: Slurm, source: str, log_directory: Path):
    """A SLURMCluster whose scheduler runs here and a Client on it; every job cancelled afterwards.

    ``lost-worker-timeout`` is 3 s (default 15 s): how long dask-jobqueue keeps a job that lost its
    worker before ``scale``/``adapt`` replace it.
    """
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "3s"}):
        try:
            with SLURMCluster(**cluster_kwargs(source, log_directory)) as cluster, Client(cluster) as client:
                yield cluster, client
        finally:
            slurm.cancel_all()


def jobs_of_workers(client) -> dict[str, str]:
    """``{worker address: SLURM job id}``, asked from the workers; asserts they import this checkout's package."""
    info = client.run(job_info)
    wrong = {a: i["package"] for a, i in info.items() if not i["package"].startswith(str(PACKAGE_ROOT))}
    assert not wrong, f"workers import dask_pervasive from elsewhere than {PACKAGE_ROOT}: {wrong}"
    assert all(i["job"] for i in info.values()), info
    return {a: i["job"] for a, i in info.items()}


def collect_once(futures, timeout: float = 120) -> dict[int, tuple[int, str]]:
    """``{input: (result, job id)}`` as results complete; each input's result must arrive once."""
    from distributed import as_completed

    out: dict[int, tuple[int, str]] = {}
    for fut in as_completed(list(futures), timeout=timeout):
        x, value, job = fut.result()
        assert x not in out, f"result for input {x} arrived twice"
        out[x] = (value, job)
    return out


def worker_addresses(client) -> set[str]:
    return set(client.scheduler_info(n_workers=-1)["workers"])
