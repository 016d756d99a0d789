"""``python -m dask_pervasive.bench [strategies|placement|bootstrap] ...``: parse, run, report.

Three comparisons, one sub-command each; ``strategies`` is the default, so
``python -m dask_pervasive.bench --quick`` runs the strategy comparison:

``strategies``
    The same fact-verification workload with every strategy (naive,
    global-cache, actors, pervasive) per scenario
    (:mod:`~dask_pervasive.bench.scenarios`); writes ``results.json``,
    ``results.md`` and one PNG per scenario into ``--out``.
``placement``
    The scheduler plugin on vs off (:mod:`~dask_pervasive.bench.placement`);
    writes one JSON file.
``bootstrap``
    A cohort of cold workers, peer transfer on vs off
    (:mod:`~dask_pervasive.bench.bootstrap`); writes one JSON file.

Each evaluates its targets (:mod:`~dask_pervasive.bench.targets`), prints
them and stores them with the environment record
(:mod:`~dask_pervasive.bench.report`); the exit status is 0 when no target
of what ran was missed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from typing import Any

from dask.utils import format_bytes, parse_bytes

from dask_pervasive.bench import placement
from dask_pervasive.bench.presets import PRESETS, SCENARIOS, Params, with_overrides
from dask_pervasive.bench.ray_strategies import RAY_STRATEGY_NAMES
from dask_pervasive.bench.report import environment, say, write_json
from dask_pervasive.bench.strategies import DEFAULT_STRATEGIES, STRATEGY_NAMES
from dask_pervasive.bench.workload import MINILM, MODEL_CHOICES, MODEL_SIZES, model_class_for, model_description

PROG = "python -m dask_pervasive.bench"
COMMANDS = ("strategies", "placement", "bootstrap")
#: What --strategies accepts: the Dask strategies and Ray's (which skip with a line when Ray is absent).
STRATEGY_CHOICES = STRATEGY_NAMES + RAY_STRATEGY_NAMES


def _csv(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return names

    return parse


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, got {text!r}")
    return n


def _add_strategies(sub: Any) -> None:
    parser = sub.add_parser(
        "strategies",
        help="every strategy, every scenario (the default sub-command)",
        description=(
            "Run the same fact-verification workload with every strategy (naive, global-cache, actors, "
            "pervasive) on fresh LocalClusters of the same size, per scenario; print a table, write "
            "results.json and one PNG per scenario."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="the small preset (3 to 3.5 minutes on 2 idle cores)")
    parser.add_argument(
        "--scenario",
        type=_csv(SCENARIOS),
        default=list(SCENARIOS),
        metavar="NAMES",
        help=f"comma-separated subset of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--strategies",
        type=_csv(STRATEGY_CHOICES),
        default=None,
        metavar="NAMES",
        help=f"comma-separated subset of {', '.join(STRATEGY_CHOICES)} (default: {','.join(DEFAULT_STRATEGIES)} "
        "in every scenario; with --quick, the ones each scenario's targets compare; scale-out adds "
        "pervasive-origin, its origin-only reference, whenever pervasive runs; ray-data and ray-serve need "
        "the bench-ray extra and run steady and multi only)",
    )
    parser.add_argument("--workers", type=int, help="workers per cluster (default 2)")
    parser.add_argument("--out", default="bench-results", help="output directory (default: ./bench-results)")
    parser.add_argument(
        "--model",
        choices=MODEL_CHOICES,
        help="the model: " + "; ".join(f"{name}: {model_description(name)}" for name in MODEL_CHOICES),
    )
    parser.add_argument(
        "--bandwidth",
        help="origin bandwidth cap per second for all readers together, e.g. 10MB, in every scenario "
        "(default: per scenario, as the time one read of the model takes; see docs/benchmarks.md)",
    )
    parser.add_argument("--seed", type=int, help="seed of job orders and kill choices (default 0)")
    parser.set_defaults(func=run_strategies)


def _add_placement(sub: Any) -> None:
    parser = sub.add_parser(
        "placement",
        help="scheduler plugin on vs off: loads, makespan, preemption, overhead",
        description="Scheduler plugin on vs off: loads, makespan, preemption, overhead (see docs/placement.md).",
    )
    parser.add_argument(
        "--scenario",
        type=_csv((*placement.SCENARIOS, "scale")),
        default=list(placement.SCENARIOS),
        metavar="NAMES",
        help=f"comma-separated subset of {', '.join(placement.SCENARIOS)}, scale (default: all but scale)",
    )
    parser.add_argument("--out", default="docs/placement-results.json", help="JSON output path")
    parser.add_argument("--load-seconds", type=float, default=3.0, help="context load time (few, backlog, preempt)")
    parser.add_argument("--multi-load-seconds", type=float, default=1.0, help="load time of each multi context")
    parser.add_argument("--seed", type=int, default=0, help="seed of the multi task order")
    from dask_pervasive.bench import scale

    group = parser.add_argument_group("scale", "the scale scenario (dask_pervasive.bench.scale)")
    group.add_argument("--workers", type=int, default=scale.WORKERS, help="in-process workers")
    group.add_argument("--contexts", type=int, default=scale.CONTEXTS, help="contexts, tasks round-robin over them")
    group.add_argument("--scale-tasks", type=int, default=scale.TASKS, help="tasks per case")
    group.add_argument("--task-seconds", type=float, default=scale.TASK_SECONDS, help="seconds per task")
    group.add_argument("--scale-load-seconds", type=float, default=scale.LOAD_SECONDS, help="load seconds")
    group.add_argument(
        "--scale-cases",
        type=_csv((*scale.CASES, "none")),
        default=list(scale.CASES),
        metavar="NAMES",
        help=f"comma-separated subset of {', '.join(scale.CASES)} (default: all; none: only --scale-grid)",
    )
    group.add_argument("--scale-grid", default="", metavar="W:C,...", help="cost-only runs, e.g. 25:1,200:20")
    group.add_argument(
        "--scale-repeat",
        type=_at_least_one,
        default=1,
        metavar="N",
        help="run each grid point N times; its re-plan times are pooled over them (default 1)",
    )
    group.add_argument(
        "--churn", type=int, default=scale.CHURN, help="workers closed (then as many replaced and added)"
    )
    group.add_argument(
        "--scale-scheduler",
        choices=("process", "thread"),
        default="process",
        help="the scheduler in its own process (default, as deployed) or in this one with the workers",
    )
    parser.set_defaults(func=run_placement)


def _add_bootstrap(sub: Any) -> None:
    parser = sub.add_parser(
        "bootstrap",
        help="cold workers bootstrapping a context from a capped origin, peer transfer on vs off",
        description="Cold workers bootstrapping a context from a bandwidth-capped origin, peer transfer on vs off.",
    )
    parser.add_argument("--workers", type=int, default=6, help="cold workers in the cohort")
    parser.add_argument("--size", default="120MB", help="context size")
    parser.add_argument("--files", type=int, default=4, help="number of weight shards")
    parser.add_argument("--bandwidth", default="25MB", help="origin bandwidth per second, all readers together")
    parser.add_argument("--peer-max-uploads", type=int, default=2, help="pervasive.transfer.peer-max-uploads")
    parser.add_argument("--origin-max-concurrent", type=int, default=2, help="pervasive.transfer.origin-max-concurrent")
    parser.add_argument("--chunk-size", default=None, help="pervasive.transfer.chunk-size (default: config)")
    parser.add_argument("--out", default="docs/bootstrap-results.json", help="JSON output path")
    parser.set_defaults(func=run_bootstrap)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; without a sub-command first, ``strategies`` is meant."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "strategies")
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Benchmarks of dask_pervasive. Without a sub-command, 'strategies' runs. See docs/benchmarks.md.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{strategies,placement,bootstrap}")
    _add_strategies(sub)
    _add_placement(sub)
    _add_bootstrap(sub)
    args = parser.parse_args(argv)
    if getattr(args, "workers", None) is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the sub-command; 0 when every target of what ran is met."""
    args = parse_args(argv)
    command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
    return args.func(args, command)


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "func"}


# -- strategies -----------------------------------------------------------------------------------
def choose_params(args: argparse.Namespace) -> Params:
    """The preset, with command-line overrides; a bigger model when CUDA is present."""
    from dask_pervasive.devices import cuda_available

    params = PRESETS["quick" if args.quick else "full"]
    model = args.model
    if model is None and cuda_available():
        model = "gpu"
    bandwidth = parse_bytes(args.bandwidth) if args.bandwidth else None
    return with_overrides(params, workers=args.workers, model=model, seed=args.seed, bandwidth=bandwidth)


def strategies_for(scenario: str, args: argparse.Namespace, params: Params) -> list[str]:
    """``--strategies``, or the preset's strategies for ``scenario``."""
    if args.strategies is not None:
        return list(args.strategies)
    return list(params.sizes[scenario].strategies)


def model_nbytes(model: Any) -> int:
    """Parameter bytes of the loaded model, measured as dask_pervasive measures contexts."""
    import transformers

    from dask_pervasive.devices import measure_nbytes

    auto = getattr(transformers, model_class_for(model.path))
    host, device = measure_nbytes(auto.from_pretrained(model.path))
    return host + device


def build_models(root: str, n: int, params: Params) -> list[Any]:
    """``n`` models of ``params.model`` under ``root`` (tiny GPT-2s, or copies of the pretrained MiniLM)."""
    from dask_pervasive.bench import harness

    if params.model == MINILM:
        return harness.build_minilm_models(root, n)
    return harness.build_models(root, n, MODEL_SIZES[params.model].as_kwargs())


def model_record(params: Params) -> dict[str, Any]:
    """What the environment record says about the model."""
    if params.model == MINILM:
        from dask_pervasive.bench.factcheck import minilm_zip

        return {"model": MINILM, "pretrained": "sentence-transformers/all-MiniLM-L6-v2", "zip": minilm_zip()}
    return {"model_size": MODEL_SIZES[params.model].as_kwargs()}


def run_strategies(args: argparse.Namespace, command: str) -> int:
    """Every selected scenario with its strategies: tables, ``results.json``, ``results.md``, PNGs."""
    from dask_pervasive.bench import harness, plots, report, targets
    from dask_pervasive.bench.scenarios import Env, run_scenario
    from dask_pervasive.testing import HTTPOrigin

    harness.setup_process()
    params = choose_params(args)
    started = time.perf_counter()
    load_before = os.getloadavg()
    n_models = params.multi_contexts if "multi" in args.scenario else 1
    with tempfile.TemporaryDirectory(prefix="pervasive-bench-") as root:
        say(f"building {n_models} {params.model} model(s)")
        models = build_models(root, n_models, params)
        with HTTPOrigin(root, quiet=True) as origin:
            nbytes = model_nbytes(models[0])
            say(f"model: {format_bytes(models[0].file_bytes)} of files, {format_bytes(nbytes)} of parameters")
            env = Env(origin, models, nbytes)
            results = {}
            for scenario in args.scenario:
                results[scenario] = run_scenario(scenario, params, strategies_for(scenario, args, params), env, say)
    payload = {
        "command": command,
        "preset": "quick" if args.quick else "full",
        "params": params.as_dict(),
        "environment": environment(**model_record(params)),
        "origin": {
            "bandwidth_bytes_per_s": {k: params.origin_bandwidth(k, models[0].file_bytes) for k in params.sizes},
            "model_file_bytes": models[0].file_bytes,
            "model_param_bytes": nbytes,
            "note": "local HTTP server with one global bandwidth cap: a simulation of a contended shared filesystem",
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
        # Other processes share the CPUs: the 1/5/15-minute load averages before and after.
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "scenarios": results,
    }
    payload["checks"] = targets.strategy_checks(payload)
    write_json(os.path.join(args.out, "results.json"), payload)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report.markdown(payload))
    report.print_tables(payload)
    for path in plots.plot_all(payload, args.out):
        say(f"wrote {path}")
    say(f"wrote {os.path.join(args.out, 'results.json')} ({payload['wall_seconds']}s)")
    return targets.exit_status(payload["checks"])


# -- placement ------------------------------------------------------------------------------------
def run_placement(args: argparse.Namespace, command: str) -> int:
    """Each selected placement scenario with the plugin on and off: table and JSON."""
    from dask_pervasive.bench import report, targets

    started = time.perf_counter()
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for name in args.scenario:
        say(f"running {name} ...")
        t0 = time.perf_counter()
        try:
            if name == "scale":
                results[name] = _run_scale(args)
            else:
                results[name] = placement.run_scenario(name, args.load_seconds, args.multi_load_seconds, args.seed)
            rows.extend(targets.placement_checks(name, results[name]))
        except Exception as exc:  # noqa: BLE001 - report it and still measure the other scenarios
            results[name] = {"error": traceback.format_exc()}
            rows.append(targets.compare(name, "error", f"{type(exc).__name__}: {exc}", "", "runs", False))
        seconds[name] = round(time.perf_counter() - t0, 1)
    report.print_placement(rows)
    payload = {
        "command": command,
        "environment": environment(),
        "arguments": _arguments(args),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "scenario_seconds": seconds,
        "checks": rows,
        "scenarios": results,
    }
    write_json(args.out, payload)
    say(f"wrote {args.out}")
    if "scale" in results and "error" not in results["scale"]:
        from dask_pervasive.bench.plots import save_scale

        say(f"wrote {save_scale(results['scale'], os.path.splitext(args.out)[0] + '-scale.png')}")
    return targets.exit_status(rows)


def _run_scale(args: argparse.Namespace) -> dict[str, Any]:
    from dask_pervasive.bench import scale

    return scale.run_scale(
        workers=args.workers,
        contexts=args.contexts,
        tasks=args.scale_tasks,
        task_seconds=args.task_seconds,
        load_seconds=args.scale_load_seconds,
        cases=[c for c in args.scale_cases if c != "none"],
        grid=scale.parse_grid(args.scale_grid),
        repeat=args.scale_repeat,
        churn=args.churn,
        scheduler_process=args.scale_scheduler == "process",
    )


# -- bootstrap ------------------------------------------------------------------------------------
def run_bootstrap(args: argparse.Namespace, command: str) -> int:
    """Both bootstrap variants on fresh cold clusters: tables and JSON."""
    from dask_pervasive.bench import bootstrap, report, targets
    from dask_pervasive.testing import HTTPOrigin

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pervasive-origin-") as root:
        size = bootstrap.write_model(os.path.join(root, "model"), parse_bytes(args.size), args.files)
        with HTTPOrigin(root, bandwidth=parse_bytes(args.bandwidth)) as origin:
            results = {}
            for variant in bootstrap.VARIANTS:
                say(f"running {variant} ...")
                results[variant] = bootstrap.run_variant(variant, origin, size, args)
    rows = targets.bootstrap_checks(results, size)
    report.print_bootstrap(results, rows, size)
    payload = {
        "command": command,
        "environment": environment(),
        "arguments": _arguments(args),
        "context_bytes": size,
        "origin_bandwidth_bytes_per_second": parse_bytes(args.bandwidth),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "checks": rows,
        "variants": results,
    }
    write_json(args.out, payload)
    say(f"wrote {args.out}")
    return targets.exit_status(rows)
