"""Device resolution and GPU accounting: mocked without CUDA, real with it."""

from __future__ import annotations

import pytest
from conftest import has_cuda

import dask_pervasive as dp
from dask_pervasive import devices
from dask_pervasive.worker import resolve_budget


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    assert devices.resolve_device("auto") == "cpu"
    assert devices.resolve_device("cpu") == "cpu"
    assert devices.resolve_device("cuda") == "cuda:0"
    assert devices.resolve_device("cuda:3") == "cuda:3"


def test_resolve_device_with_cuda(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    # LocalCUDACluster puts each worker's own GPU first in CUDA_VISIBLE_DEVICES
    assert devices.resolve_device("auto") == "cuda:0"


def test_cuda_hidden_by_env(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.cuda_available() is False


def test_budget_resolution():
    assert resolve_budget(None, 100) is None
    assert resolve_budget("unlimited", 100) is None
    assert resolve_budget(0.5, 1000) == 500
    assert resolve_budget(0.5, None) is None
    assert resolve_budget("1 KiB", None) == 1024
    assert resolve_budget(2048, None) == 2048
    with pytest.raises(ValueError):
        resolve_budget(-3, 100)


def test_measure_torch_module():
    torch = pytest.importorskip("torch")
    m = torch.nn.Linear(10, 10)
    assert devices.measure_nbytes(m) == ((100 + 10) * 4, 0)
    # The wrapper is walked too: its parameters plus the wrapper's own few hundred bytes.
    host, dev = devices.measure_nbytes(dp.LoadedModel(m, None, "cpu"))
    assert 440 < host < 440 + 2048 and dev == 0
    tied = torch.nn.Sequential(m, m)  # one module twice, a view of a weight: counted once
    host, dev = devices.measure_nbytes({"a": tied, "b": m.weight[:5]})
    assert 440 < host < 440 + 2048 and dev == 0


def test_device_budget_applies(tmp_path):
    from dask_pervasive.cache import ContextCache

    cache = ContextCache("w", str(tmp_path), device_max_bytes=lambda d: 100)
    cache.declare(dp.Context("g", load=lambda p, d: d, nbytes=1000, device="cuda:0"))
    with pytest.raises(dp.ContextTooLargeError, match="device_max_bytes"):
        cache.acquire("g")


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device")
def test_gpu_load_and_release(tiny_gpt2, tmp_path):
    import torch

    from dask_pervasive.cache import ContextCache

    cache = ContextCache("w", str(tmp_path), device_max_bytes=lambda d: devices.device_total_memory(d))
    cache.declare(dp.TransformersContext("gpt", source=f"file://{tiny_gpt2}", device="auto"))
    before = torch.cuda.memory_allocated()
    loaded = cache.acquire("gpt")
    assert loaded.device == "cuda:0"
    assert next(loaded.model.parameters()).is_cuda
    (row,) = cache.snapshot()
    assert row["device_bytes"] > 0 and row["host_bytes"] == 0
    del loaded
    cache.evict("gpt")
    assert torch.cuda.memory_allocated() <= before
