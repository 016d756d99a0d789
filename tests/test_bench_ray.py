"""The Ray peer strategies of the benchmark (``ray-data``, ``ray-serve``) on a tiny workload.

Ray is an optional extra (``bench-ray``): the tests that run Ray skip when it
is absent; the skip path itself is tested everywhere.
"""

from __future__ import annotations

import os

import pytest

from dask_pervasive.bench import ray_strategies
from dask_pervasive.bench.harness import ENVIRONMENT, Job, build_models
from dask_pervasive.bench.scenarios import Env, _runnable, summarize_run
from dask_pervasive.bench.workload import fetch_and_load, score_batch

SIZE = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 512}


def test_missing_ray_is_a_skip_line(monkeypatch):
    monkeypatch.setattr(ray_strategies, "ray_installed", lambda: False)
    said: list[str] = []
    assert _runnable("steady", ["pervasive", "ray-data", "ray-serve"], said.append) == ["pervasive"]
    assert len(said) == 2 and all("Ray is not installed" in s and "bench-ray" in s for s in said)


def test_ray_skips_scenarios_it_does_not_run(monkeypatch):
    monkeypatch.setattr(ray_strategies, "ray_installed", lambda: True)
    said: list[str] = []
    assert _runnable("preempt", ["ray-serve", "actors"], said.append) == ["actors"]
    assert "steady, multi only" in said[0]
    assert _runnable("multi", ["ray-serve"], said.append) == ["ray-serve"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    pytest.importorskip("ray.serve")
    from dask_pervasive.devices import measure_nbytes
    from dask_pervasive.testing import HTTPOrigin

    saved = {k: os.environ.get(k) for k in ENVIRONMENT}
    os.environ.update(ENVIRONMENT)  # Ray's workers inherit it: one torch thread each
    root = tmp_path_factory.mktemp("ray-bench")
    models = build_models(str(root), 2, SIZE)
    try:
        with HTTPOrigin(root) as origin:
            loaded = fetch_and_load(origin.url(models[0].rel))
            yield Env(origin, models, sum(measure_nbytes(loaded.model)))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _jobs(env: Env, n_contexts: int, n: int = 8) -> list[Job]:
    from dask_pervasive.bench.workload import make_items

    items = make_items(n, seed=1)
    return [Job(i, env.models[i % n_contexts].name, (items[i],)) for i in range(n)]


def _expected(env: Env, jobs: list[Job]) -> list[list[float]]:
    by_name = {m.name: fetch_and_load(env.origin.url(m.rel)) for m in env.models}
    return [score_batch(by_name[j.context].model, by_name[j.context].tokenizer, "cpu", list(j.items)) for j in jobs]


@pytest.mark.slow
@pytest.mark.timeout(600)  # Ray's start-up alone takes 3.5 s idle, minutes on a crowded machine
@pytest.mark.parametrize("name", ray_strategies.RAY_STRATEGY_NAMES)
@pytest.mark.parametrize("n_contexts", [1, 2])
def test_ray_strategy_scores_and_counts_loads(env, name, n_contexts):
    jobs = _jobs(env, n_contexts)
    # multi: room for one model per slot (1.5 models of budget), two contexts
    capacity = None if n_contexts == 1 else int(1.5 * env.model_nbytes)
    run = ray_strategies.run_strategy(name, jobs, env, 2, capacity, summarize_run)

    assert run["errors"] == [] and run["completed"] == len(jobs)
    for got, want in zip(run["scores"], _expected(env, jobs)):
        assert got == pytest.approx(want, abs=1e-4)
    # Every load is one full read of the origin, and every read is a counted load.
    assert run["origin_bytes"] == run["loads"] * env.models[0].file_bytes
    if name == "ray-data" and n_contexts == 1:
        assert run["loads"] == 2  # once per actor, in __init__
    elif n_contexts == 1:
        assert 1 <= run["loads"] <= 2  # at most once per replica
    else:
        assert run["loads"] >= 2  # each context at least once
    assert len(run["load_events"]) == run["loads"]
    assert run["ray_init_s"] > 0 and run["setup_s"] > 0 and run["actor_start_s"] >= 0
    assert len(run["tasks_per_worker"]) <= 2
    # The forward passes' CPU seconds (one thread each) are counted and never exceed their wall time.
    assert 0 < run["compute_cpu_seconds"] <= run["compute_seconds"] + 0.01
