"""The one output path of every benchmark: environment record, ``rich`` tables, JSON, Markdown.

Every sub-command of ``python -m dask_pervasive.bench`` stores its payload
with :func:`write_json` (``environment`` from :func:`environment`, target
rows from :mod:`~dask_pervasive.bench.targets`) and prints its targets with
:func:`targets_table`; the strategy comparison adds its results tables,
``results.md`` (:func:`markdown`) and the plots of
:mod:`~dask_pervasive.bench.plots`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from typing import Any

from dask_pervasive.bench.targets import mean_time_to_warm

MB = 1e6


# -- what every result file records ---------------------------------------------------------------
def environment(**extra: Any) -> dict[str, Any]:
    """Versions and machine facts stored with the results, plus ``extra`` (e.g. ``model_size``)."""
    import dask
    import distributed

    import dask_pervasive
    from dask_pervasive.devices import cuda_available

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": cuda_available(),
        "versions": {
            "dask": dask.__version__,
            "distributed": distributed.__version__,
            "dask_pervasive": dask_pervasive.__version__,
            "torch": _version("torch"),
            "transformers": _version("transformers"),
        },
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (directories created; values JSON lacks, as strings)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def say(text: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- tables ---------------------------------------------------------------------------------------
def _console():
    from rich.console import Console

    # Piped output (logs, CI) gets a wide table rather than rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 160)


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def print_tables(payload: dict[str, Any]) -> None:
    """The results table, the batch-sweep table and the targets."""
    from rich.table import Table

    console = _console()
    origin = payload["origin"]
    table = Table(
        title=(
            f"{payload['params']['workers']} workers, model files {origin['model_file_bytes'] / MB:.1f} MB, "
            "origin = HTTP server with a global bandwidth cap (simulated shared filesystem)"
        )
    )
    columns = (
        "scenario",
        "origin MB/s",
        "strategy",
        "makespan s",
        "ideal/makespan",
        "loads",
        "origin MB",
        "peer MB",
        "load share",
        "done",
        "warm s",
    )
    for c in columns:
        table.add_column(c, justify="left" if c in ("scenario", "strategy") else "right")
    for scenario, result in payload["scenarios"].items():
        if scenario == "batch-sweep":
            continue
        for name, run in result["runs"].items():
            table.add_row(
                scenario,
                f"{result['origin_bandwidth'] / MB:.1f}",
                name,
                f"{run['makespan_s']:.2f}",
                _fmt(run.get("efficiency")),
                str(run["loads"]),
                f"{run['origin_bytes'] / MB:.1f}",
                f"{run['peer_bytes'] / MB:.1f}",
                _fmt(run["load_share"], ".0%"),
                f"{run['completed']}/{run['tasks']}",
                _fmt(mean_time_to_warm(run, every_worker=False)) if scenario == "scale-out" else "",
            )
        table.add_section()
    console.print(table)
    if "batch-sweep" in payload["scenarios"]:
        console.print(_sweep_table(payload["scenarios"]["batch-sweep"]))
    console.print(targets_table(payload["checks"]))


def _sweep_table(result: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"batch-sweep: warm throughput, items/s ({result['items']} items at every batch size)")
    table.add_column("strategy")
    for b in result["batch_sizes"]:
        table.add_column(f"b={b}", justify="right")
    table.add_column("max/min", justify="right")
    table.add_column("loads", justify="right")
    for name, run in result["runs"].items():
        phases = run["phases"]
        table.add_row(
            name,
            *(f"{phases[str(b)]['throughput']:.1f}" for b in result["batch_sizes"]),
            f"{run['throughput_max_over_min']:.2f}",
            str(sum(p["loads"] for p in phases.values())),
        )
    return table


def targets_table(rows: list[dict[str, Any]], title: str = "targets"):
    """The target rows of :mod:`~dask_pervasive.bench.targets` as a ``rich`` table (one ``value`` or on/off columns)."""
    from rich.table import Table

    columns = list(dict.fromkeys(k for r in rows for k in r if k not in _ROW_KEYS))
    table = Table(title=title)
    for c in ("scenario", "metric", *(_COLUMN_TITLES.get(c, c) for c in columns), "target", "result"):
        table.add_column(c)
    for r in rows:
        verdict = {True: "[green]pass[/]", False: "[red]MISS[/]", None: "n/a" if r["target"] else ""}[r["ok"]]
        table.add_row(r["scenario"], r["metric"], *(str(r.get(c, "")) for c in columns), r["target"], verdict)
    return table


_ROW_KEYS = ("scenario", "metric", "target", "ok")
_COLUMN_TITLES = {"on": "plugin on", "off": "plugin off"}


def print_placement(rows: list[dict[str, Any]]) -> None:
    """The placement comparison: every metric, plugin on vs off, with its target."""
    _console().print(targets_table(rows, "dask_pervasive placement: scheduler plugin on vs off"))


def print_bootstrap(results: dict[str, dict[str, Any]], rows: list[dict[str, Any]], size: int) -> None:
    """The bootstrap comparison: one row per variant, then the targets."""
    from dask.utils import format_bytes
    from rich.table import Table

    console = _console()
    table = Table(title=f"Bootstrapping {format_bytes(size)} on cold workers: peer transfer on vs off")
    for column in ("variant", "seconds", "origin served", "origin reads", "from peers", "from origin", "resident"):
        table.add_column(column)
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['seconds']:.2f}",
            format_bytes(r["origin_bytes_served"]),
            f"{r['origin_reads_per_context']:.2f}x",
            format_bytes(r["bytes_from_peers"]),
            format_bytes(r["bytes_from_origin"]),
            str(r["workers_resident"]),
        )
    console.print(table)
    console.print(targets_table(rows))


# -- markdown (for docs/benchmarks.md) ------------------------------------------------------------------
def markdown(payload: dict[str, Any]) -> str:
    """The results and targets tables in Markdown (written as ``results.md``)."""
    header = (
        "scenario",
        "origin MB/s",
        "strategy",
        "makespan s",
        "ideal / makespan",
        "loads",
        "origin MB",
        "peer MB",
        "load share",
        "done",
        "time to warm s",
    )
    lines = ["| " + " | ".join(header) + " |", "|---|--:|---|" + "--:|" * (len(header) - 3)]
    for scenario, result in payload["scenarios"].items():
        if scenario == "batch-sweep":
            continue
        for name, run in result["runs"].items():
            warm = _fmt(mean_time_to_warm(run, every_worker=False)) if scenario == "scale-out" else ""
            lines.append(
                f"| {scenario} | {result['origin_bandwidth'] / MB:.1f} | {name} | {run['makespan_s']:.2f} "
                f"| {_fmt(run.get('efficiency'))} | {run['loads']} | {run['origin_bytes'] / MB:.1f} "
                f"| {run['peer_bytes'] / MB:.1f} | {_fmt(run['load_share'], '.0%')} "
                f"| {run['completed']}/{run['tasks']} | {warm} |"
            )
    if "batch-sweep" in payload["scenarios"]:
        sweep = payload["scenarios"]["batch-sweep"]
        sizes = sweep["batch_sizes"]
        lines += ["", "| batch-sweep, items/s | " + " | ".join(f"b={b}" for b in sizes) + " | max/min | loads |"]
        lines.append("|---|" + "--:|" * (len(sizes) + 2))
        for name, run in sweep["runs"].items():
            phases = run["phases"]
            tp = " | ".join(f"{phases[str(b)]['throughput']:.1f}" for b in sizes)
            loads = sum(p["loads"] for p in phases.values())
            lines.append(f"| {name} | {tp} | {run['throughput_max_over_min']:.2f} | {loads} |")
    lines += ["", "| scenario | target | value | result |", "|---|---|--:|---|"]
    for c in payload["checks"]:
        verdict = {True: "pass", False: "**miss**", None: "n/a"}[c["ok"]]
        lines.append(f"| {c['scenario']} | {c['metric']} {c['target']} | {c['value']} | {verdict} |")
    return "\n".join(lines) + "\n"
