"""The GPU check script: argument handling and its refusal to claim anything without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dask_pervasive.bench import gpucheck
from dask_pervasive.devices import cuda_available


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dask_pervasive.bench.gpucheck", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


NO_GPU = {"CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"}


def test_without_a_gpu_it_fails_and_says_why():
    proc = _run(env=NO_GPU)
    assert proc.returncode == gpucheck.EXIT_NO_GPU
    assert "no CUDA device" in proc.stderr and "nothing was checked" in proc.stderr
    assert "PASS" not in proc.stdout + proc.stderr


def test_allow_no_gpu_reports_every_check_not_run():
    proc = _run("--allow-no-gpu", env=NO_GPU)
    assert proc.returncode == 0, proc.stderr
    for check in gpucheck.CHECKS:
        line = next(ln for ln in proc.stdout.splitlines() if check in ln)
        assert "NOT RUN" in line, line
    assert "PASS" not in proc.stdout and "passed" not in proc.stdout
    assert "nothing was verified" in proc.stdout


@pytest.mark.parametrize("argv", [["--bench-timeout", "0"], ["--bench-timeout", "x"], ["--no-such-flag"]])
def test_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gpucheck.parse_args(argv)
    assert exc.value.code == 2


def test_arguments():
    args = gpucheck.parse_args(["--allow-no-gpu", "--no-bench", "--bench-timeout", "30", "--out", "o"])
    assert (args.allow_no_gpu, args.no_bench, args.bench_timeout, args.out) == (True, True, 30.0, "o")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_gpucheck_passes_on_a_gpu():
    proc = _run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
