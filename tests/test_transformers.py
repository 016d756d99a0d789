"""TransformersContext end to end: fsspec copy → from_pretrained → inference."""

from __future__ import annotations

import sys
from typing import ClassVar

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


_CONCURRENT_FIRST_LOADS = """
import sys
import threading

from dask_pervasive.context import TransformersLoader

assert "transformers" not in sys.modules, "the first import must happen in the loads"
start = threading.Barrier(3)
errors = []


def load(model_class):
    start.wait()
    try:
        TransformersLoader(model_class=model_class, tokenizer=False)(sys.argv[1], "cpu")
    except Exception as exc:
        errors.append(f"{model_class}: {exc!r} (cause {exc.__cause__!r})")


threads = [threading.Thread(target=load, args=(c,)) for c in ("AutoModelForCausalLM", "GPT2LMHeadModel", "AutoModel")]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("\\n".join(errors))
sys.exit(1 if errors else 0)
"""


@pytest.mark.timeout(300)  # a fresh interpreter imports torch and transformers
def test_first_loads_in_threads_at_once_find_the_model_class(tiny_gpt2):
    # transformers' lazy module is not thread-safe on first import; a fresh interpreter, so
    # these loads are the first import.
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _CONCURRENT_FIRST_LOADS, tiny_gpt2],
        check=False,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unknown_model_class_keeps_the_cause(tiny_gpt2):
    from dask_pervasive.context import TransformersLoader

    with pytest.raises(ValueError, match="no model class 'NoSuchModel'") as info:
        TransformersLoader(model_class="NoSuchModel")(tiny_gpt2, "cpu")
    assert isinstance(info.value.__cause__, AttributeError)


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


class _HalfImported:
    """Stands in for transformers' lazy module while another thread's first import is still running:
    a class it exports fails to resolve ``failures`` times, then resolves."""

    def __init__(self, failures: int):
        self.failures = failures
        self.lookups = 0

    _class_to_module: ClassVar = {"AutoModelForCausalLM": "models.auto"}  # transformers' lazy module has one
    __spec__ = None

    def __dir__(self):
        return ["AutoModelForCausalLM"]

    def __getattr__(self, name):
        self.lookups += 1
        if name == "AutoModelForCausalLM" and self.lookups > self.failures:
            return "the class"
        raise AttributeError(name)


def test_an_exported_class_is_waited_for_and_an_unknown_one_fails_at_once(monkeypatch):
    from dask_pervasive.context import _model_class

    module = _HalfImported(failures=3)
    monkeypatch.setitem(sys.modules, "transformers", module)  # where each try reads it from
    assert _model_class(module, "AutoModelForCausalLM") == "the class"
    assert module.lookups == 4
    module = _HalfImported(failures=10**9)
    monkeypatch.setitem(sys.modules, "transformers", module)
    with pytest.raises(ValueError, match="not among the names it exports") as info:
        _model_class(module, "AutoModelForNothing")
    assert module.lookups == 1 and isinstance(info.value.__cause__, AttributeError)
