"""The PNGs of the strategy comparison: per scenario a worker-by-time chart, and the batch-sweep curve."""

from __future__ import annotations

import os
from typing import Any

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
    if scenario in ("preempt", "scale-out", "opportunistic"):
        label = {"preempt": "worker killed", "scale-out": "cluster.scale"}.get(scenario, "join / preempt / leave")
        handles.append(plt.Line2D([], [], color="black", linestyle="--", label=label))
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


def save_scale(result: dict[str, Any], path: str) -> str:
    """The ``scale`` scenario's PNG at ``path``: loads per worker and makespan ratio per case, re-plan cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dask_pervasive.bench.targets import over_floor

    cases = result["cases"]
    names = [n for n in cases if not n.endswith("floor")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar(names, [cases[n]["loads_per_worker"] for n in names], color="tab:blue")
    axes[0].axhline(1.0, linestyle=":", color="green")
    axes[0].set_title("loads per worker")
    ratios = {n: over_floor(result, n) for n in names}
    measured = [n for n in names if ratios[n] is not None]
    if measured:
        axes[1].bar(measured, [ratios[n] for n in measured], color="tab:orange")
        axes[1].axhline(1.0, linestyle=":", color="green")
    axes[1].set_title("makespan / (its floor + one load)")
    runs = [r for r in [*cases.values(), *result["grid"]] if r.get("timings") and r["timings"].get("replans")]
    # Repeated grid runs get their index (a categorical axis puts equal labels on one point).
    labels = [
        f"{r['workers']}x{r['contexts']} {r['case']}" + (f" #{r['repeat']}" if r.get("repeat") else "") for r in runs
    ]
    for key, colour in (("replan_p50_ms", "tab:blue"), ("replan_p99_ms", "tab:orange"), ("hook_max_ms", "tab:red")):
        axes[2].plot(labels, [r["timings"].get(key) for r in runs], marker="o", label=key, color=colour)
    axes[2].set_yscale("log")
    axes[2].set_title("scheduler time in our hooks (ms)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    p = result["parameters"]
    fig.suptitle(
        f"scale: {p['workers']} workers x {p['contexts']} contexts, {p['tasks']} tasks of {p['task_seconds']} s"
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
