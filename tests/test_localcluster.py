"""Real worker processes (spawned), the way users run it."""

from __future__ import annotations

import pytest
from distributed import Client, LocalCluster

import dask_pervasive as dp

pytest.importorskip("transformers")


@dp.uses_context("gpt")
def score(loaded, i):
    import torch

    ids = loaded.tokenizer(f"The claim {i} is supported", return_tensors="pt")
    with torch.inference_mode():
        logits = loaded.model(**ids).logits
    return i, round(float(logits.sum()), 3)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_200_tasks_four_workers_at_most_four_loads(tiny_gpt2):
    gpt = dp.TransformersContext("gpt", source=f"file://{tiny_gpt2}", device="cpu")
    with (
        LocalCluster(n_workers=4, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        dp.install(client, [gpt])
        results = client.gather(client.map(score, range(200)))
        stats = dp.stats(client)
        assert 1 <= stats.total("loads", "gpt") <= 4
        assert stats.total("loads") + stats.total("hits") == 200
        assert [i for i, _ in results] == list(range(200))
        # same model everywhere: a task's result does not depend on the worker
        reference = dict(client.gather(client.map(score, range(5), pure=False)))
        assert all(reference[i] == s for i, s in results[:5])
        assert stats.total("failures") == 0
