"""The benchmark's target rows (unmeasurable is a miss), time-to-warm matching, and the --model minilm pieces."""

from __future__ import annotations

import importlib.util

import pytest

from dask_pervasive.bench import targets
from dask_pervasive.bench.factcheck import MINILM_DISTRIBUTION, MINILM_PACKAGE
from dask_pervasive.bench.scenarios import _time_to_warm

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec(MINILM_PACKAGE) is None,
    reason=f"the pretrained model needs the PyPI package {MINILM_DISTRIBUTION}",
)


def _scale_out(warm: dict[str, dict[str, float | None]]) -> dict:
    runs = {name: {"origin_reads": 1.0, "time_to_warm": ttw} for name, ttw in warm.items()}
    return {"contexts": ["m"], "runs": runs}


def _row(rows: list[dict], metric: str) -> dict:
    (row,) = [r for r in rows if r["metric"] == metric]
    return row


WARM = "time to warm pervasive / origin-only"


def test_unmeasurable_time_to_warm_is_a_miss():
    result = _scale_out({"pervasive": {"w1": 1.0, "w2": None}, "pervasive-origin": {"w1": 9.0, "w2": 9.0}})
    rows = targets.check_scale_out(result, {})
    row = _row(rows, WARM)
    assert row["value"] is None and row["ok"] is False
    assert targets.exit_status(rows) == 1


def test_origin_reference_is_read_over_the_joiners_it_warmed():
    # pervasive must warm every joiner; the origin-only planner may leave one cold (an origin
    # read costing more than the backlog left), and is then judged by the ones it did warm
    result = _scale_out({"pervasive": {"w1": 1.0, "w2": 2.0}, "pervasive-origin": {"w1": 6.0, "w2": None}})
    row = _row(targets.check_scale_out(result, {}), WARM)
    assert row["value"] == 0.25 and row["ok"] is True
    none_warmed = _scale_out({"pervasive": {"w1": 1.0}, "pervasive-origin": {"w1": None}})
    assert _row(targets.check_scale_out(none_warmed, {}), WARM)["ok"] is False


def test_no_joined_worker_is_a_miss_too():
    rows = targets.check_scale_out(_scale_out({"pervasive": {}, "pervasive-origin": {}}), {})
    assert _row(rows, WARM)["ok"] is False


def test_target_of_strategies_that_did_not_run_is_not_applicable():
    rows = targets.check_scale_out(_scale_out({"pervasive": {"w1": 1.0}}), {})
    assert _row(rows, WARM)["ok"] is None
    assert targets.exit_status(rows) == 0


def test_measured_time_to_warm_is_checked():
    result = _scale_out({"pervasive": {"w1": 1.0, "w2": 2.0}, "pervasive-origin": {"w1": 10.0, "w2": 10.0}})
    row = _row(targets.check_scale_out(result, {}), WARM)
    assert row["value"] == 0.15 and row["ok"] is True


def test_tighter_bounds_on_the_pretrained_model():
    result = {"runs": {"pervasive": {"makespan_s": 12.0, "ideal_s": 10.0}, "naive": {"makespan_s": 100.0}}}
    tiny = _row(targets.check_steady(result, {"params": {"model": "tiny"}}), "makespan pervasive / ideal bound")
    minilm = _row(targets.check_steady(result, {"params": {"model": "minilm"}}), "makespan pervasive / ideal bound")
    assert (tiny["target"], tiny["ok"]) == ("<= 1.25", True)
    assert (minilm["target"], minilm["ok"]) == ("<= 1.15", False)


def test_time_to_warm_matches_first_finished_load_per_joined_worker():
    timeline = [
        {"t": 10.0, "action": "add-worker", "worker": "a"},
        {"t": 11.0, "action": "add-worker", "worker": "b"},
        {"t": 12.0, "action": "remove-worker", "worker": "c"},
    ]
    loads = [{"worker": "a", "t": 15.0}, {"worker": "a", "t": 13.0}, {"worker": "c", "t": 1.0}]
    assert _time_to_warm(timeline, loads) == {"a": 3.0, "b": None}


@needs_minilm
def test_minilm_copies_load_as_encoders_and_score_by_cosine(tmp_path):
    from dask_pervasive.bench.harness import MINILM_FILES, build_minilm_models
    from dask_pervasive.bench.workload import fetch_and_load, model_class_for, score_batch

    models = build_minilm_models(str(tmp_path), 2)
    assert [m.name for m in models] == ["minilm-0", "minilm-1"]
    assert models[0].file_bytes == models[1].file_bytes > 90_000_000
    assert sorted(p.name for p in (tmp_path / "models" / "minilm-1").iterdir()) == sorted(MINILM_FILES)
    assert model_class_for(models[0].path) == "AutoModel"
    loaded = fetch_and_load(f"file://{models[0].path}")
    items = [
        ("Paris is the capital of France.", "The capital city of France is Paris."),
        ("Paris is the capital of France.", "Bees make honey from the nectar of flowers."),
    ]
    support, unrelated = score_batch(loaded.model, loaded.tokenizer, loaded.device, items)
    assert support > 0.8 and unrelated < 0.3
