from __future__ import annotations

import os

import pytest

# Keep worker logs readable: transformers' progress bars go to stderr per load.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import dask.config
import distributed.utils_test
from distributed.utils_test import (  # noqa: F401  (fixtures used by gen_cluster)
    cleanup,
    loop,
    loop_in_thread,
)

# Our own defaults need no such help (dask_pervasive.config.get falls back to them); dask-jobqueue's do.
try:
    import dask_jobqueue  # noqa: F401  (loads jobqueue.yaml into dask.config)
except ImportError:
    pass
else:
    # Once tests/slurm has imported it, a gen_cluster test's reset_config()
    # would drop its defaults and a later SLURMCluster fail with KeyError: 'jobqueue'.
    dask.config.update(
        distributed.utils_test.original_config, {"jobqueue": dask.config.get("jobqueue")}, priority="old"
    )


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A real GPT-2 (2 layers, 64-dim) and tokenizer saved with save_pretrained."""
    pytest.importorskip("transformers")
    from dask_pervasive.testing import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2", n_layer=2, n_embd=64)


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture
def http_origin(tmp_path):
    """A bandwidth-capped (20 MB/s) HTTP origin on 127.0.0.1 serving ``tmp_path / "origin"``.

    Read through fsspec's ``http`` filesystem: ``origin.url("model/")`` is a
    directory source (listed from its HTML index), ``origin.bytes_served``
    counts file bytes sent.
    """
    import fsspec.asyn

    from dask_pervasive.testing import HTTPOrigin

    # fsspec's IO thread (used by the http filesystem) lives for the whole
    # process: start it now, or gen_cluster's thread-leak check blames the test.
    fsspec.asyn.get_loop()
    root = tmp_path / "origin"
    root.mkdir()
    with HTTPOrigin(root, bandwidth=20e6) as origin:
        yield origin
