"""Targets, the ``rich`` tables and the matplotlib plots of a benchmark run."""

from __future__ import annotations

import os
import sys
from typing import Any

from dask_pervasive.bench.ray_strategies import ray_checks

MB = 1e6

#: Strategy colours in the plots.
COLOURS = {
    "naive": "tab:red",
    "global-cache": "tab:orange",
    "actors": "tab:purple",
    "pervasive": "tab:blue",
    "pervasive-origin": "tab:cyan",
    "ray-data": "tab:green",
    "ray-serve": "tab:olive",
}


# -- targets --------------------------------------------------------------------------------------
def _check(scenario: str, metric: str, value: Any, target: str, ok: bool | None) -> dict[str, Any]:
    if isinstance(value, float):
        value = round(value, 3)
    return {"scenario": scenario, "metric": metric, "value": value, "target": target, "ok": ok}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _le(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def checks(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on the scenarios and strategies that ran (``ok=None``: not measurable)."""
    out: list[dict[str, Any]] = []
    scenarios = payload["scenarios"]
    for name, result in scenarios.items():
        out.extend(CHECKS[name](result, payload))
        out.extend(ray_checks(name, result))
        eq = result["equality"]
        same = all(e["identical"] for e in eq.values()) if name == "batch-sweep" else eq["identical"]
        worst = max(e["max_abs_diff"] for e in eq.values()) if name == "batch-sweep" else eq["max_abs_diff"]
        out.append(_check(name, "same scores with every strategy (max abs diff)", worst, "<= 1e-4", same))
    return out


def _runs(result: dict[str, Any]) -> dict[str, Any]:
    return result["runs"]


def _makespan(result: dict[str, Any], strategy: str) -> float | None:
    run = _runs(result).get(strategy)
    return run["makespan_s"] if run else None


def check_steady(result: dict[str, Any], payload: dict[str, Any]) -> list[dict[str, Any]]:
    perv = _runs(result).get("pervasive")
    vs_naive = _ratio(_makespan(result, "pervasive"), _makespan(result, "naive"))
    vs_ideal = _ratio(perv["makespan_s"], perv["ideal_s"]) if perv else None
    return [
        _check("steady", "makespan pervasive / naive", vs_naive, "<= 0.30", _le(vs_naive, 0.30)),
        _check("steady", "makespan pervasive / ideal bound", vs_ideal, "<= 1.25", _le(vs_ideal, 1.25)),
    ]


def check_multi(result: dict[str, Any], payload: dict[str, Any]) -> list[dict[str, Any]]:
    runs = _runs(result)
    makespan = _ratio(_makespan(result, "pervasive"), _makespan(result, "global-cache"))
    perv, gc = runs.get("pervasive"), runs.get("global-cache")
    loads = _ratio(perv["loads"], gc["loads"]) if perv and gc else None
    return [
        _check("multi", "makespan pervasive / global-cache", makespan, "<= 0.7", _le(makespan, 0.7)),
        _check("multi", "loads pervasive / global-cache", loads, "<= 0.5", _le(loads, 0.5)),
    ]


def check_preempt(result: dict[str, Any], payload: dict[str, Any]) -> list[dict[str, Any]]:
    perv = _runs(result).get("pervasive")
    complete = perv["completed"] == perv["tasks"] and not perv["errors"] if perv else None
    ratio = _ratio(_makespan(result, "pervasive"), _makespan(result, "global-cache"))
    return [
        _check(
            "preempt",
            "pervasive tasks completed",
            f"{perv['completed']}/{perv['tasks']}" if perv else None,
            "all",
            complete,
        ),
        _check("preempt", "makespan pervasive / global-cache", ratio, "<= 0.8", _le(ratio, 0.8)),
    ]


def mean_time_to_warm(run: dict[str, Any] | None) -> float | None:
    """Mean over workers that joined of (first load finished - joined); ``None`` if one never loaded."""
    if not run or not run["time_to_warm"]:
        return None
    values = list(run["time_to_warm"].values())
    return None if any(v is None for v in values) else sum(values) / len(values)


def check_scale_out(result: dict[str, Any], payload: dict[str, Any]) -> list[dict[str, Any]]:
    runs = _runs(result)
    perv = runs.get("pervasive")
    reads = perv["origin_reads"] / len(result["contexts"]) if perv else None
    warm = _ratio(mean_time_to_warm(perv), mean_time_to_warm(runs.get("pervasive-origin")))
    return [
        _check("scale-out", "origin bytes / context size (pervasive)", reads, "<= 1.5", _le(reads, 1.5)),
        _check("scale-out", "time to warm pervasive / origin-only", warm, "<= 0.4", _le(warm, 0.4)),
    ]


def check_batch_sweep(result: dict[str, Any], payload: dict[str, Any]) -> list[dict[str, Any]]:
    runs = _runs(result)
    perv = runs["pervasive"]["throughput_max_over_min"] if "pervasive" in runs else None
    naive = runs["naive"]["throughput_max_over_min"] if "naive" in runs else None
    return [
        _check("batch-sweep", "throughput max/min (pervasive)", perv, "<= 1.5", _le(perv, 1.5)),
        _check(
            "batch-sweep",
            "throughput max/min pervasive vs naive",
            f"{perv} vs {naive}",
            "flatter",
            None if perv is None or naive is None else perv < naive,
        ),
    ]


CHECKS = {
    "steady": check_steady,
    "multi": check_multi,
    "preempt": check_preempt,
    "scale-out": check_scale_out,
    "batch-sweep": check_batch_sweep,
}


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
                _fmt(mean_time_to_warm(run)) if scenario == "scale-out" else "",
            )
        table.add_section()
    console.print(table)
    if "batch-sweep" in payload["scenarios"]:
        console.print(_sweep_table(payload["scenarios"]["batch-sweep"]))
    console.print(_targets_table(payload["checks"]))


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


def _targets_table(checks_: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="targets")
    for c in ("scenario", "metric", "value", "target", "result"):
        table.add_column(c)
    for c in checks_:
        verdict = {True: "[green]pass[/]", False: "[red]MISS[/]", None: "n/a"}[c["ok"]]
        table.add_row(c["scenario"], c["metric"], str(c["value"]), c["target"], verdict)
    return table


# -- plots ----------------------------------------------------------------------------------------
def plot_all(payload: dict[str, Any], out_dir: str) -> list[str]:
    """One PNG per scenario in ``out_dir``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    paths = []
    for scenario, result in payload["scenarios"].items():
        path = os.path.join(out_dir, f"bench-{scenario}.png")
        fig = plot_sweep(result) if scenario == "batch-sweep" else plot_timelines(scenario, result, payload)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        paths.append(path)
    return paths


def _lanes(run: dict[str, Any]) -> dict[str, int]:
    """Workers in order of first appearance (tasks, loads, joins)."""
    seen: dict[str, int] = {}
    events = [(row[1], row[0]) for row in run["task_rows"]] + [(e["t"], e["worker"]) for e in run["load_events"]]
    events += [(e["t"], e["worker"]) for e in run["timeline"] if e["action"] == "add-worker"]
    for _, worker in sorted(events, key=lambda e: e[0]):
        seen.setdefault(worker, len(seen))
    return seen


def _draw_timeline(ax: Any, name: str, run: dict[str, Any]) -> None:
    lanes = _lanes(run)
    compute = [(lanes[w], end - c, c) for w, _, end, c, _ in run["task_rows"]]
    loads = [
        (lanes[e["worker"]], e["t"] - e["load_s"], e["load_s"]) for e in run["load_events"] if e["worker"] in lanes
    ]
    for lane, start, width in compute:
        ax.broken_barh([(start, width)], (lane - 0.4, 0.8), color="tab:blue", alpha=0.7)
    for lane, start, width in loads:
        ax.broken_barh([(start, width)], (lane - 0.4, 0.8), color="tab:red", alpha=0.7)
    for d in run.get("disturbances", []):
        ax.axvline(d["t"], color="black", linestyle="--", linewidth=1)
    ax.axvline(run["makespan_s"], color="grey", linewidth=1)
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([f"w{i}" for i in range(len(lanes))], fontsize=7)
    ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    ax.text(
        1.0,
        0.5,
        f" {run['makespan_s']:.1f}s, {run['loads']} loads, {run['origin_bytes'] / MB:.0f} MB origin",
        transform=ax.transAxes,
        fontsize=8,
        va="center",
    )


def plot_timelines(scenario: str, result: dict[str, Any], payload: dict[str, Any]):
    """Per strategy, a worker-by-time chart: loads in red, compute in blue, disturbances dashed."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    runs = result["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1.2 + 1.1 * len(runs)), sharex=True, squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], runs.items()):
        _draw_timeline(ax, name, run)
    for ax, run in zip(axes[:, 0], runs.values()):
        if run.get("ideal_s"):
            ax.axvline(run["ideal_s"], color="green", linewidth=1, linestyle=":")
    axes[-1, 0].set_xlabel("seconds since the strategy started")
    handles = [
        Patch(color="tab:red", alpha=0.7, label="model load"),
        Patch(color="tab:blue", alpha=0.7, label="compute (forward passes)"),
    ]
    if any(run.get("ideal_s") for run in runs.values()):
        handles.append(plt.Line2D([], [], color="green", linestyle=":", label="ideal bound (of that run)"))
    if scenario in ("preempt", "scale-out"):
        handles.append(
            plt.Line2D(
                [],
                [],
                color="black",
                linestyle="--",
                label="worker killed" if scenario == "preempt" else "cluster.scale",
            )
        )
    axes[0, 0].legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.02), ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{scenario}: {result['jobs']} jobs x {result['items_per_job']} items", y=1.0 + 0.35 / len(runs))
    return fig


def plot_sweep(result: dict[str, Any]):
    """Warm throughput against batch size, one line per strategy."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = result["batch_sizes"]
    for name, run in result["runs"].items():
        tp = [run["phases"][str(b)]["throughput"] for b in sizes]
        ax.plot(
            sizes,
            tp,
            marker="o",
            label=f"{name} (max/min {run['throughput_max_over_min']:.2f})",
            color=COLOURS.get(name),
        )
    ideal = [max((r["phases"][str(b)]["ideal_throughput"] or 0) for r in result["runs"].values()) for b in sizes]
    ax.plot(sizes, ideal, linestyle=":", color="green", label="compute-only bound (best strategy)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes])
    ax.set_xlabel("items per task (batch size)")
    ax.set_ylabel("items / second (warm)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"batch-sweep: {result['items']} items at every batch size")
    ax.legend(fontsize=8)
    return fig


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
            warm = _fmt(mean_time_to_warm(run)) if scenario == "scale-out" else ""
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
