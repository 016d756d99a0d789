"""The demo's workload (FEVER-style evidence retrieval) and its pipeline on the real pretrained model."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest

from dask_pervasive.bench import factcheck as fc

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec(fc.MINILM_PACKAGE) is None,
    reason=f"the pretrained model needs the PyPI package {fc.MINILM_DISTRIBUTION} (in the [test] and [demo] extras)",
)


def test_workload_is_deterministic_and_well_formed():
    w = fc.make_workload(120, refuted_share=0.25, seed=3)
    assert w == fc.make_workload(120, refuted_share=0.25, seed=3)
    assert w != fc.make_workload(120, refuted_share=0.25, seed=4)
    assert len(w.claims) == 120
    assert sum(c.label == fc.REFUTES for c in w.claims) == 30
    n_facts = sum(len(rel.facts) for rel in fc.RELATIONS)
    assert len(w.passages) == len(set(w.passages)) == n_facts + len(fc.DECOYS)
    for c in w.claims:
        assert 0 <= c.evidence < len(w.passages)
        assert w.passages[c.evidence] not in fc.DECOYS  # every claim has its own fact's passage
    assert [len(b) for b in w.batches(50)] == [50, 50, 20]
    assert [t for b in w.batches(7) for t in b] == [c.text for c in w.claims]


def test_refuted_claims_substitute_an_entity_no_passage_mentions():
    corpus = " ".join(fc.make_workload(10).passages)
    for rel in fc.RELATIONS:
        assert len(rel.wrong) == len(rel.facts), rel.name
        for (_, obj), wrong in zip(rel.facts, rel.wrong):
            if "{w}" in "".join(rel.refuted):  # substitution, not negation
                assert wrong != obj and f" {wrong}." not in corpus and f"{wrong} " not in corpus, (rel.name, wrong)


def test_accuracy_counts_top_passages():
    w = fc.make_workload(4)
    right = [c.evidence for c in w.claims]
    assert w.accuracy(right) == 1.0
    assert w.accuracy([(right[0] + 1) % len(w.passages)] + right[1:]) == 0.75
    with pytest.raises(ValueError, match="3 results for 4 claims"):
        w.accuracy(right[:3])


@pytest.mark.parametrize(("n_claims", "share"), [(0, 0.5), (10, 1.5)])
def test_bad_workload_arguments(n_claims, share):
    with pytest.raises(ValueError):
        fc.make_workload(n_claims, refuted_share=share)


@needs_minilm
def test_model_zip_found_without_importing_the_package():
    # in a fresh interpreter: the package's __init__ prints, and must not run
    code = (
        "import sys; from dask_pervasive.bench import factcheck as fc; print(fc.minilm_source()); "
        f"assert {fc.MINILM_PACKAGE!r} not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("zip://::file:///") and out.strip().endswith("all_minilm_l6_v2/model.zip")


@needs_minilm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_pipeline_on_the_pretrained_model(caplog, tmp_path):
    """The demo's two strategies, small: high and identical accuracy, at most one load per worker, quiet close."""
    from distributed import Client, LocalCluster

    import dask_pervasive as dp

    workload = fc.make_workload(40)
    source = fc.minilm_source()
    with (
        caplog.at_level(logging.WARNING, logger="distributed"),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", local_directory=str(tmp_path)
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(fc.prepare_worker)
        naive = fc.run_naive(client, workload, source, batch_size=10)
        pervasive = fc.run_pervasive(client, workload, source, batch_size=10)
        dp.evict(client, fc.CONTEXT_NAME)
        fc.close_workers(cluster)
    assert naive.loads == naive.tasks == pervasive.tasks == 4
    assert naive.accuracy(workload) >= 0.9
    assert naive.hits == pervasive.hits  # same model, same batches: the same retrievals and scores
    assert 1 <= pervasive.loads <= 2 and all(n <= 1 for n in pervasive.loads_per_worker.values())
    assert not [r.getMessage() for r in caplog.records if "still alive" in r.getMessage()]
