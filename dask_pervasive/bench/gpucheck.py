"""``python -m dask_pervasive.bench.gpucheck``: the GPU behaviour of dask_pervasive, checked for real in one go.

On a machine with a CUDA device, in a few minutes, on a one-worker
``LocalCluster`` (a separate process, as in production):

1. ``cuda-load``: a :class:`~dask_pervasive.TransformersContext` with
   ``device="auto"`` loads onto CUDA (context device and parameter device);
2. ``device-accounting``: the cache's ``device_bytes`` for it matches the
   growth of ``torch.cuda.memory_allocated`` on the worker;
3. ``evict-releases``: after :func:`~dask_pervasive.evict`, allocated and
   reserved CUDA memory are back to what they were before the load;
4. ``oom-evict-retry``: with an idle context holding 60% of the free device
   memory, loading another that needs 60% hits a real CUDA out-of-memory
   error; the cache evicts the idle one and the retry succeeds;
5. ``bench-steady-multi``: ``python -m dask_pervasive.bench --quick
   --scenario steady,multi`` exits 0 (its targets met), on the GPU;
6. ``local-cuda-cluster``: when ``dask_cuda`` imports, a ``LocalCUDACluster``
   starts and a context with ``device="auto"`` lands on each worker's own GPU.

It prints one table and exits 0 only when every check passed (or was
skipped for a missing optional package). Without a CUDA device it exits 2
saying so; with ``--allow-no-gpu`` it exits 0 and reports every check as
NOT RUN: nothing is ever reported as passed that did not run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

PASS, FAIL, NOT_RUN, SKIP = "PASS", "FAIL", "NOT RUN", "SKIP"
CHECKS = (
    "cuda-load",
    "device-accounting",
    "evict-releases",
    "oom-evict-retry",
    "bench-steady-multi",
    "local-cuda-cluster",
)
#: How far ``torch.cuda.memory_allocated`` may differ from the accounted bytes (allocator rounding).
ACCOUNTING_TOLERANCE = 0.05
ACCOUNTING_SLACK = 4 * 2**20
EXIT_NO_GPU = 2


@dataclass
class Result:
    check: str
    status: str
    detail: str = ""
    seconds: float = 0.0


# -- functions that run on the worker (module level: importable there) ------------------------
def cuda_memory(dask_worker: Any = None) -> dict[str, int]:
    """``memory_allocated`` and ``memory_reserved`` of the worker's ``cuda:0``."""
    import torch

    torch.cuda.synchronize()
    return {"allocated": int(torch.cuda.memory_allocated(0)), "reserved": int(torch.cuda.memory_reserved(0))}


def free_cuda_bytes(dask_worker: Any = None) -> int:
    import torch

    free, _ = torch.cuda.mem_get_info(0)
    return int(free)


_BALLAST_CALLS: dict[int, int] = {}


def load_ballast(path: str | None, device: str, *, nbytes: int) -> Any:
    """A context that is ``nbytes`` of device memory (``torch.empty``: allocated, not written)."""
    import torch

    _BALLAST_CALLS[nbytes] = _BALLAST_CALLS.get(nbytes, 0) + 1
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def ballast_calls(dask_worker: Any = None) -> dict[int, int]:
    return dict(_BALLAST_CALLS)


def use(client: Any, name: str, **kwargs: Any) -> dict[str, str]:
    """Run one :func:`where_is` task for context ``name`` (annotated, so the scheduler plugin places it)."""
    import dask

    with dask.annotate(context=name):
        return client.submit(where_is, name, pure=False, **kwargs).result()


def where_is(name: str) -> dict[str, str]:
    """A task using context ``name``: the device it reports and where its tensors are."""
    from dask_pervasive import get_context

    ctx = get_context(name)
    model = getattr(ctx, "model", ctx)
    tensor = next(model.parameters()) if hasattr(model, "parameters") else model
    return {"device": str(getattr(ctx, "device", tensor.device)), "tensor": str(tensor.device)}


# -- the checks --------------------------------------------------------------------------------
def _tiny_gpt2(directory: str) -> str:
    from dask_pervasive.testing import make_tiny_gpt2

    return make_tiny_gpt2(directory, n_layer=4, n_embd=512, n_head=8, vocab_size=512, n_positions=256)


def _row(client: Any, name: str) -> dict[str, Any]:
    import dask_pervasive as dp

    rows = [r for r in dp.stats(client) if r["context"] == name]
    if len(rows) != 1:
        raise AssertionError(f"expected one stats row for {name!r}, got {rows}")
    return rows[0]


def _on_worker(client: Any, fn: Callable[..., Any]) -> Any:
    (value,) = client.run(fn).values()
    return value


def check_cuda_load_accounting_evict(client: Any, tmp: str) -> list[Result]:
    """Checks 1–3 on one TransformersContext."""
    import dask_pervasive as dp

    results: list[Result] = []
    start = time.perf_counter()
    before = _on_worker(client, cuda_memory)
    dp.register(client, dp.TransformersContext("gpt", source=f"file://{_tiny_gpt2(os.path.join(tmp, 'gpt'))}"))
    got = use(client, "gpt")
    ok = got["device"].startswith("cuda") and got["tensor"].startswith("cuda")
    results.append(Result("cuda-load", PASS if ok else FAIL, f"context on {got['device']}, weights on {got['tensor']}"))
    results[-1].seconds = time.perf_counter() - start

    start = time.perf_counter()
    loaded = _on_worker(client, cuda_memory)
    accounted = int(_row(client, "gpt")["device_bytes"])
    grown = loaded["allocated"] - before["allocated"]
    ok = accounted > 0 and abs(grown - accounted) <= max(ACCOUNTING_SLACK, ACCOUNTING_TOLERANCE * accounted)
    results.append(
        Result(
            "device-accounting",
            PASS if ok else FAIL,
            f"accounted {accounted / 2**20:.1f} MiB, memory_allocated grew {grown / 2**20:.1f} MiB",
            time.perf_counter() - start,
        )
    )

    start = time.perf_counter()
    outcome = dp.evict(client, "gpt")
    after = _on_worker(client, cuda_memory)
    freed = after["allocated"] <= before["allocated"] + ACCOUNTING_SLACK
    returned = after["reserved"] <= before["reserved"] + ACCOUNTING_SLACK
    results.append(
        Result(
            "evict-releases",
            PASS if freed and returned and set(outcome.values()) == {"evicted"} else FAIL,
            f"evict: {sorted(set(outcome.values()))}; allocated {after['allocated'] / 2**20:.1f} MiB "
            f"(before load {before['allocated'] / 2**20:.1f}), reserved {after['reserved'] / 2**20:.1f} MiB "
            f"(before load {before['reserved'] / 2**20:.1f})",
            time.perf_counter() - start,
        )
    )
    return results


def check_oom_evict_retry(client: Any) -> Result:
    """Check 4: a real CUDA OOM while an idle context holds the memory, evicted and retried."""
    import functools

    import dask_pervasive as dp

    start = time.perf_counter()
    chunk = int(_on_worker(client, free_cuda_bytes) * 0.6)
    for name in ("ballast-a", "ballast-b"):
        # distinct sizes tell the two loaders' call counts apart on the worker
        load = functools.partial(load_ballast, nbytes=chunk + (name == "ballast-b"))
        dp.register(client, dp.Context(name, load=load, device="auto"))
    use(client, "ballast-a")
    got = use(client, "ballast-b")
    calls = _on_worker(client, ballast_calls)
    a, b = _row(client, "ballast-a"), _row(client, "ballast-b")
    retried = calls.get(chunk + 1) == 2  # the first load of b failed, the second succeeded
    ok = retried and b["state"] == "resident" and a["state"] != "resident" and a["evictions"] >= 1
    ok = ok and got["tensor"].startswith("cuda") and not b["failures"]
    detail = (
        f"2 × {chunk / 2**30:.1f} GiB on a device with {chunk / 0.6 / 2**30:.1f} GiB free; loads of b: "
        f"{calls.get(chunk + 1, 0)} (2 = OOM then retry), a: {a['state']} ({a['evictions']} eviction), "
        f"b: {b['state']}"
    )
    dp.evict(client, "ballast-b")
    return Result("oom-evict-retry", PASS if ok else FAIL, detail, time.perf_counter() - start)


def check_bench(out: str, timeout: float) -> Result:
    """Check 5: the steady and multi scenarios of the benchmark, quick preset, on the GPU."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "dask_pervasive.bench", "--quick", "--scenario", "steady,multi", "--out", out]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result("bench-steady-multi", FAIL, f"no result within {timeout:.0f}s", time.perf_counter() - start)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    status = PASS if proc.returncode == 0 else FAIL
    return Result("bench-steady-multi", status, f"exit {proc.returncode}; {tail[0][:120]}", time.perf_counter() - start)


def check_local_cuda_cluster() -> Result:
    """Check 6: LocalCUDACluster, one worker per GPU, each context on the worker's own GPU."""
    start = time.perf_counter()
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        return Result("local-cuda-cluster", SKIP, f"dask_cuda does not import ({exc})")
    from distributed import Client

    import dask_pervasive as dp

    with LocalCUDACluster(dashboard_address=":0") as cluster, Client(cluster) as client:
        n = len(client.scheduler_info()["workers"])
        dp.install(client, [dp.Context("ballast", load=_ballast_64mib, device="auto")])
        devices = [use(client, "ballast", workers=[w])["tensor"] for w in client.scheduler_info()["workers"]]
        visible = sorted(client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES", "")).values())
        loads = int(dp.stats(client).total("loads", "ballast"))
    firsts = {v.split(",")[0] for v in visible}
    ok = all(d == "cuda:0" for d in devices) and len(firsts) == n and loads == n
    detail = f"{n} workers, CUDA_VISIBLE_DEVICES {visible}, contexts on {sorted(set(devices))}, {loads} loads"
    return Result("local-cuda-cluster", PASS if ok else FAIL, detail, time.perf_counter() - start)


def _ballast_64mib(path: str | None, device: str) -> Any:
    return load_ballast(path, device, nbytes=64 * 2**20)


@contextlib.contextmanager
def one_worker_cluster() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    import dask_pervasive as dp

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        dp.install(client, [])
        yield client


def _guarded(name: str, fn: Callable[[], Any]) -> list[Result]:
    """``fn()``'s results, or one FAIL naming the exception."""
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row of the table
        traceback.print_exc()
        return [Result(name, FAIL, f"{type(exc).__name__}: {exc}"[:200], time.perf_counter() - start)]
    return out if isinstance(out, list) else [out]


def run_checks(args: argparse.Namespace) -> list[Result]:
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="gpucheck-") as tmp:
        try:
            with one_worker_cluster() as client:
                first = _guarded("cuda-load", lambda: check_cuda_load_accounting_evict(client, tmp))
                results += first
                if len(first) < 3:  # it failed before accounting and eviction could be checked
                    results += [Result(c, NOT_RUN, "cuda-load failed first") for c in CHECKS[1:3]]
                results += _guarded("oom-evict-retry", lambda: check_oom_evict_retry(client))
        except Exception as exc:  # noqa: BLE001 - the cluster itself did not start or close
            traceback.print_exc()
            done = {r.check for r in results}
            results += [
                Result(c, FAIL, f"cluster: {type(exc).__name__}: {exc}"[:200]) for c in CHECKS[:4] if c not in done
            ]
        if args.no_bench:
            results.append(Result("bench-steady-multi", NOT_RUN, "--no-bench"))
        else:
            out = args.out or os.path.join(tmp, "bench")
            results += _guarded("bench-steady-multi", lambda: check_bench(out, args.bench_timeout))
        results += _guarded("local-cuda-cluster", check_local_cuda_cluster)
    return results


# -- reporting ---------------------------------------------------------------------------------
def print_table(results: list[Result], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for r in results:
            print(f"  {r.check:<20} {r.status:<8} {r.seconds:6.1f}s  {r.detail}")
        return
    table = Table(title=title)
    for col in ("check", "result", "seconds", "detail"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    style = {PASS: "green", FAIL: "bold red", NOT_RUN: "yellow", SKIP: "cyan"}
    for r in results:
        table.add_row(r.check, f"[{style[r.status]}]{r.status}[/]", f"{r.seconds:.1f}", r.detail)
    Console().print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dask_pervasive.bench.gpucheck",
        description="Check dask_pervasive's GPU behaviour for real on this machine's CUDA device (a few minutes).",
    )
    parser.add_argument(
        "--allow-no-gpu",
        action="store_true",
        help="without a CUDA device, report every check as NOT RUN and exit 0 (default: exit 2)",
    )
    parser.add_argument("--no-bench", action="store_true", help="leave out the benchmark check (reported NOT RUN)")
    parser.add_argument("--bench-timeout", type=float, default=240.0, help="seconds for the benchmark (default 240)")
    parser.add_argument("--out", help="directory for the benchmark's results (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.bench_timeout <= 0:
        parser.error("--bench-timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dask_pervasive.devices import cuda_available

    if not cuda_available():
        reason = "no CUDA device: torch is not installed" if _no_torch() else "no CUDA device visible to torch"
        if not args.allow_no_gpu:
            print(f"gpucheck: {reason}; nothing was checked (--allow-no-gpu to report NOT RUN)", file=sys.stderr)
            return EXIT_NO_GPU
        print_table([Result(c, NOT_RUN, reason) for c in CHECKS], "dask_pervasive GPU check: NOT RUN")
        print(f"NOT RUN: {reason}; nothing was verified.")
        return 0
    name = device_name()
    start = time.perf_counter()
    results = run_checks(args)
    failed = [r.check for r in results if r.status == FAIL]
    print_table(results, f"dask_pervasive GPU check on {name} ({time.perf_counter() - start:.0f}s)")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    not_run = [r.check for r in results if r.status in (NOT_RUN, SKIP)]
    print("every check that ran passed" + (f"; not run: {', '.join(not_run)}" if not_run else ""))
    return 0


def device_name() -> str:
    import torch

    return str(torch.cuda.get_device_name(0))


def _no_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is None


if __name__ == "__main__":
    raise SystemExit(main())
