"""``python -m dask_pervasive.bench``: every strategy, every scenario, one table, JSON and plots.

See ``--help`` and ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import Any

from dask.utils import format_bytes, parse_bytes

from dask_pervasive.bench.ray_strategies import RAY_STRATEGY_NAMES
from dask_pervasive.bench.scenarios import PRESETS, SCENARIOS, Env, Params, run_scenario, with_overrides
from dask_pervasive.bench.strategies import DEFAULT_STRATEGIES, STRATEGY_NAMES
from dask_pervasive.bench.workload import MODEL_SIZES

#: What --strategies accepts: the Dask strategies and Ray's (which skip with a line when Ray is absent).
CHOICES = STRATEGY_NAMES + RAY_STRATEGY_NAMES


def _csv(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return names

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dask_pervasive.bench",
        description=(
            "Run the same fact-verification workload with every strategy (naive, global-cache, actors, "
            "pervasive) on fresh LocalClusters of the same size, per scenario; print a table, write "
            "results.json and one PNG per scenario."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="the small preset (under 3 minutes on 2 idle cores)")
    parser.add_argument(
        "--scenario",
        type=_csv(SCENARIOS),
        default=list(SCENARIOS),
        metavar="NAMES",
        help=f"comma-separated subset of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--strategies",
        type=_csv(CHOICES),
        default=None,
        metavar="NAMES",
        help=f"comma-separated subset of {', '.join(CHOICES)} (default: {','.join(DEFAULT_STRATEGIES)} "
        "in every scenario; with --quick, the ones each scenario's targets compare; scale-out adds "
        "pervasive-origin, its origin-only reference, whenever pervasive runs; ray-data and ray-serve need "
        "the bench-ray extra and run steady and multi only)",
    )
    parser.add_argument("--workers", type=int, help="workers per cluster (default 2)")
    parser.add_argument("--out", default="bench-results", help="output directory (default: ./bench-results)")
    parser.add_argument(
        "--model",
        choices=sorted(MODEL_SIZES),
        help="model size: " + "; ".join(f"{s.name}: {s.description}" for s in MODEL_SIZES.values()),
    )
    parser.add_argument(
        "--bandwidth",
        help="origin bandwidth cap per second for all readers together, e.g. 10MB, in every scenario "
        "(default: per scenario, as the time one read of the model takes; see docs/benchmarks.md)",
    )
    parser.add_argument("--seed", type=int, help="seed of job orders and kill choices (default 0)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def choose_params(args: argparse.Namespace) -> Params:
    """The preset, with command-line overrides; a bigger model when CUDA is present."""
    params = PRESETS["quick" if args.quick else "full"]
    model = args.model
    if model is None and _cuda():
        model = "gpu"
    bandwidth = parse_bytes(args.bandwidth) if args.bandwidth else None
    return with_overrides(params, workers=args.workers, model=model, seed=args.seed, bandwidth=bandwidth)


def strategies_for(scenario: str, args: argparse.Namespace, params: Params) -> list[str]:
    """``--strategies``, or the preset's strategies for ``scenario``."""
    if args.strategies is not None:
        return list(args.strategies)
    return list(params.sizes[scenario].strategies)


def _cuda() -> bool:
    from dask_pervasive.devices import cuda_available

    return cuda_available()


def model_nbytes(model: Any) -> int:
    """Parameter bytes of the loaded model, measured as dask_pervasive measures contexts."""
    import transformers

    from dask_pervasive.devices import measure_nbytes

    host, device = measure_nbytes(transformers.AutoModelForCausalLM.from_pretrained(model.path))
    return host + device


def environment(params: Params) -> dict[str, Any]:
    """Versions and machine facts stored with the results."""
    import dask
    import distributed
    import torch
    import transformers

    import dask_pervasive

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": _cuda(),
        "versions": {
            "dask": dask.__version__,
            "distributed": distributed.__version__,
            "dask_pervasive": dask_pervasive.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_size": MODEL_SIZES[params.model].as_kwargs(),
    }


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the selected scenarios; 0 when every target of those that ran is met."""
    args = parse_args(argv)
    from dask_pervasive.bench import harness, report
    from dask_pervasive.bench.http_origin import HTTPOrigin

    harness.setup_process()
    params = choose_params(args)
    started = time.perf_counter()
    load_before = os.getloadavg()
    n_models = params.multi_contexts if "multi" in args.scenario else 1
    with tempfile.TemporaryDirectory(prefix="pervasive-bench-") as root:
        say(f"building {n_models} {params.model} model(s)")
        models = harness.build_models(root, n_models, MODEL_SIZES[params.model].as_kwargs())
        with harness.quiet(HTTPOrigin(root)) as origin:
            nbytes = model_nbytes(models[0])
            say(f"model: {format_bytes(models[0].file_bytes)} of files, {format_bytes(nbytes)} of parameters")
            env = Env(origin, models, nbytes)
            results = {}
            for scenario in args.scenario:
                results[scenario] = run_scenario(scenario, params, strategies_for(scenario, args, params), env, say)
    payload = {
        "command": " ".join(["python -m dask_pervasive.bench", *(argv if argv is not None else sys.argv[1:])]),
        "preset": "quick" if args.quick else "full",
        "params": params.as_dict(),
        "environment": environment(params),
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
    payload["checks"] = report.checks(payload)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report.markdown(payload))
    report.print_tables(payload)
    for path in report.plot_all(payload, args.out):
        say(f"wrote {path}")
    say(f"wrote {os.path.join(args.out, 'results.json')} ({payload['wall_seconds']}s)")
    return 0 if all(c["ok"] is not False for c in payload["checks"]) else 1


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy. Worker processes
    # fork from a forkserver that re-imports __main__ as __mp_main__: this guard
    # keeps that import side-effect free.
    from dask_pervasive.bench.__main__ import main as _main

    sys.exit(_main())
