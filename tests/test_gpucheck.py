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


@pytest.mark.parametrize(
    ("statuses", "rc", "verdict"),
    [
        ([gpucheck.PASS, gpucheck.SKIP], 0, "every check that ran passed; not run: b"),
        ([gpucheck.PASS, gpucheck.FAIL], 1, "FAILED: b"),
        ([gpucheck.NOT_RUN, gpucheck.PASS], 0, "not run: a"),
    ],
)
def test_exit_status_follows_the_results(monkeypatch, capsys, statuses, rc, verdict):
    """The verdict logic, without a GPU: any FAIL exits 1, and what did not run is named."""
    import dask_pervasive.devices

    monkeypatch.setattr(dask_pervasive.devices, "cuda_available", lambda: True)
    monkeypatch.setattr(gpucheck, "device_name", lambda: "a test double")
    results = [gpucheck.Result(name, status) for name, status in zip("ab", statuses)]
    monkeypatch.setattr(gpucheck, "run_checks", lambda args: results)
    assert gpucheck.main(["--no-bench"]) == rc
    out = capsys.readouterr().out
    assert verdict in out.splitlines()[-1]


def test_a_check_that_raises_is_a_failure():
    def boom():
        raise RuntimeError("CUDA error: an illegal memory access")

    (result,) = gpucheck._guarded("cuda-load", boom)
    assert result.status == gpucheck.FAIL and "illegal memory access" in result.detail


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_gpucheck_passes_on_a_gpu():
    proc = _run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
