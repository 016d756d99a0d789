"""TransformersContext end to end: fsspec copy → from_pretrained → inference."""

from __future__ import annotations

import pytest
from distributed.utils_test import gen_cluster

import dask_pervasive as dp

pytest.importorskip("transformers")


@dp.uses_context("gpt")
def next_token_logprob(loaded, text):
    import torch

    ids = loaded.tokenizer(text, return_tensors="pt").to(loaded.device)
    with torch.inference_mode():
        logits = loaded.model(**ids).logits
    return float(torch.log_softmax(logits[0, -1], -1).max())


def describe(loaded):
    return {
        "class": type(loaded.model).__name__,
        "training": loaded.model.training,
        "device": str(next(loaded.model.parameters()).device),
        "tokenizer": loaded.tokenizer is not None,
    }


def test_transformers_context_on_cluster(tiny_gpt2):
    gpt = dp.TransformersContext("gpt", source=f"file://{tiny_gpt2}", device="cpu")

    @gen_cluster(client=True, nthreads=[("", 2)] * 2)
    async def run(c, s, a, b):
        await dp.install(c, [gpt], scheduler=False)
        texts = [f"claim number {i} is true" for i in range(20)]
        out = await c.gather(c.map(next_token_logprob, texts))
        assert all(x < 0 for x in out)
        info = await c.submit(lambda: describe(dp.get_context("gpt")))
        assert info == {"class": "GPT2LMHeadModel", "training": False, "device": "cpu", "tokenizer": True}
        rows = await dp.stats(c)
        assert rows.total("loads") <= 2
        # files came through fsspec from the origin, once per worker that loaded
        assert rows.total("bytes_from_origin") >= rows.total("loads") * 100_000
        where = await dp.where(c)
        assert set(where["gpt"]["resident"]) <= {a.address, b.address}
        assert set(where["gpt"]["files"]) == set(where["gpt"]["resident"])

    run()


def test_make_tiny_gpt2_prints_no_progress_bar(tmp_path):
    # In a clean process: conftest's HF_HUB_DISABLE_PROGRESS_BARS would hide the bar here.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["HF_HUB_OFFLINE"] = "1"
    code = (
        "import sys\n"
        "from transformers.utils import logging\n"
        "from dask_pervasive.testing import make_tiny_gpt2\n"
        "assert logging.is_progress_bar_enabled()\n"
        "make_tiny_gpt2(sys.argv[1])\n"
        "assert logging.is_progress_bar_enabled(), 'the caller setting was not restored'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m")], check=False, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "Writing model shards" not in proc.stderr + proc.stdout
    assert "%|" not in proc.stderr  # no tqdm bar of any kind
