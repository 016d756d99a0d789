"""The benchmark's per-task records: wall and CPU seconds of the forward passes, on both sides (Dask, Ray).

Runs without Ray: :func:`~dask_pervasive.bench.ray_strategies.ray_record` is
plain Python on a loaded model.
"""

from __future__ import annotations

import types

import pytest

# The records come from a real (tiny) transformers model: the `test-core` sets (no torch) skip.
pytest.importorskip("transformers")

from dask_pervasive.bench import ray_strategies, strategies
from dask_pervasive.bench.harness import Progress, Session, build_models
from dask_pervasive.bench.scenarios import summarize_run
from dask_pervasive.bench.workload import fetch_and_load, make_items

SIZE = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 512}


@pytest.fixture(scope="module")
def origin_and_model(tmp_path_factory):
    from dask_pervasive.testing import HTTPOrigin

    root = tmp_path_factory.mktemp("records")
    models = build_models(str(root), 1, SIZE)
    with HTTPOrigin(root) as origin:
        yield origin, models[0], fetch_and_load(origin.url(models[0].rel))


def test_records_carry_cpu_seconds_and_runs_sum_them(origin_and_model, monkeypatch):
    import distributed

    origin, model, loaded = origin_and_model
    monkeypatch.setattr(distributed, "get_worker", lambda: types.SimpleNamespace(address="tcp://w:1"))
    items = make_items(4, seed=3)
    dask_side = strategies._record(loaded.model, loaded.tokenizer, "cpu", items, None)
    ray_side = ray_strategies.ray_record("ray-actor-1", loaded, [list(i) for i in items], False, 0.0)

    for record in (dask_side, ray_side):
        # One thread's CPU time within the same interval: positive, never more than the wall time
        # (up to the microseconds between reading the two clocks).
        assert 0 < record["cpu_s"] <= record["compute_s"] + 1e-3
    assert dask_side["scores"] == pytest.approx(ray_side["scores"], abs=1e-6)

    session = Session(None, ray_strategies._NoDaskEvents(), origin, {model.name: model}, None, Progress(2))
    run = summarize_run("global-cache", [dask_side, ray_side], session, 2, 0.0, 1.0, 1.0)
    assert run["compute_cpu_seconds"] == round(dask_side["cpu_s"] + ray_side["cpu_s"], 3)
    assert run["compute_cpu_seconds"] <= run["compute_seconds"] + 2e-3
