from __future__ import annotations

import threading

import pytest
from loaders import load_array

import dask_pervasive as dp


@pytest.mark.parametrize("name", ["", "has space", "../x", "a/b", "-lead", 3, None, "x" * 129])
def test_bad_names_rejected(name):
    with pytest.raises(ValueError, match="Context name"):
        dp.Context(name, load=load_array)


def test_load_must_be_callable():
    with pytest.raises(TypeError, match="load must be callable"):
        dp.Context("a", load="not a function")


def test_unpicklable_load_rejected():
    lock = threading.Lock()

    def load(path, device):
        return lock

    with pytest.raises(TypeError, match="cannot be pickled"):
        dp.Context("a", load=load)


def test_unpicklable_teardown_rejected():
    lock = threading.Lock()
    with pytest.raises(TypeError, match="teardown"):
        dp.Context("a", load=load_array, teardown=lambda obj: lock)


@pytest.mark.parametrize("source", ["", "   ", "nosuchproto://bucket/x", "memory://"])
def test_malformed_source_rejected(source):
    with pytest.raises(ValueError, match="source"):
        dp.Context("a", load=load_array, source=source)


def test_storage_options_without_source():
    with pytest.raises(ValueError, match="storage_options"):
        dp.Context("a", load=load_array, storage_options={"anon": True})


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", "", 0])
def test_bad_device_rejected(device):
    with pytest.raises(ValueError, match="device"):
        dp.Context("a", load=load_array, device=device)


@pytest.mark.parametrize("nbytes", ["lots", -1, 0])
def test_bad_nbytes_rejected(nbytes):
    with pytest.raises(ValueError, match="nbytes"):
        dp.Context("a", load=load_array, nbytes=nbytes)


def test_valid_context_and_token():
    a = dp.Context("model-1.v2", load=load_array, source="memory://models/x", nbytes="1 MiB", device="cuda:1")
    assert a.nbytes == 2**20
    assert a == dp.Context("model-1.v2", load=load_array, source="memory://models/x", nbytes=2**20, device="cuda:1")
    assert a != dp.Context("model-1.v2", load=load_array, source="memory://models/y", nbytes=2**20, device="cuda:1")
    assert "model-1.v2" in repr(a)


def test_chained_url_accepted():
    dp.Context("a", load=load_array, source="simplecache::memory://x/y")
    # an empty path in an outer link is the archive's root; the last link must name something
    dp.Context("a", load=load_array, source="zip://::file:///models/m.zip")
    dp.Context("a", load=load_array, source="zip://sub/dir::file:///models/m.zip")
    with pytest.raises(ValueError, match="no path"):
        dp.Context("a", load=load_array, source="zip://::file:///")


def test_transformers_context_validation():
    with pytest.raises(ValueError, match="needs a source"):
        dp.TransformersContext("gpt", source=None)
    with pytest.raises(ValueError, match="model_class"):
        dp.TransformersContext("gpt", source="file:///m", model_class="Auto Model")
    with pytest.raises(ValueError, match="torch_dtype"):
        dp.TransformersContext("gpt", source="file:///m", torch_dtype="int3")
    a = dp.TransformersContext("gpt", source="file:///m")
    assert a == dp.TransformersContext("gpt", source="file:///m")
    assert a != dp.TransformersContext("gpt", source="file:///m", torch_dtype="bfloat16")


def test_transformers_loader_real_model(tiny_gpt2):
    import torch

    loaded = dp.TransformersContext("gpt", source=f"file://{tiny_gpt2}").load(tiny_gpt2, "cpu")
    assert isinstance(loaded, dp.LoadedModel)
    assert not loaded.model.training
    assert loaded.tokenizer is not None
    assert all(not p.requires_grad for p in loaded.model.parameters())
    ids = loaded.tokenizer("The Eiffel Tower is in Paris.", return_tensors="pt")
    with torch.inference_mode():
        logits = loaded.model(**ids).logits
    assert logits.shape[-1] == loaded.model.config.vocab_size


def test_transformers_loader_without_tokenizer(tiny_gpt2, tmp_path):
    import shutil

    for f in ("config.json", "model.safetensors"):
        shutil.copy(f"{tiny_gpt2}/{f}", tmp_path / f)
    loaded = dp.TransformersContext("gpt", source=f"file://{tmp_path}").load(str(tmp_path), "cpu")
    assert loaded.tokenizer is None


def test_unknown_model_class(tiny_gpt2):
    ctx = dp.TransformersContext("gpt", source=f"file://{tiny_gpt2}", model_class="NoSuchModel")
    with pytest.raises(ValueError, match="NoSuchModel"):
        ctx.load(tiny_gpt2, "cpu")
