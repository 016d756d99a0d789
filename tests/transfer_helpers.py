"""Shared by the transfer tests: model files in an origin, their digests, a loader, probes, a fake scheduler.

A module of its own (not a test module) so that worker processes can import
the loader by reference.
"""

from __future__ import annotations

import hashlib
import os
import random
import types
from pathlib import Path

import dask_pervasive as dp
from dask_pervasive._settings import TransferSettings
from dask_pervasive.transfer import MANIFEST, PART, SourceCoordinator

CHUNK = 32 * 2**10  #: the fault tests' transfer chunk: files of a few hundred KB span several


def fast_transfer(stall_timeout: float) -> tuple[TransferSettings, dict[str, object]]:
    """The fault tests' transfer rules: ``CHUNK`` chunks, 2 retries, 50 ms backoff (at most 1 s), and
    ``stall_timeout``; as settings, and as the ``dask.config`` values a worker reads them from."""
    settings = TransferSettings(
        chunk_size=CHUNK, retries=2, retry_backoff=0.05, retry_backoff_max=1.0, stall_timeout=stall_timeout
    )
    config = {
        "pervasive.transfer.chunk-size": "32KiB",
        "pervasive.transfer.retries": 2,
        "pervasive.transfer.retry-backoff": "50ms",
        "pervasive.transfer.retry-backoff-max": "1s",
        "pervasive.transfer.stall-timeout": f"{stall_timeout:g}s",
    }
    return settings, config


def write_model(
    directory, name: str = "model", sizes=(200_000, 120_000), seed: int = 0, config: bool = True
) -> dict[str, bytes]:
    """Random ``w<i>.bin`` files (and ``sub/config.json``) under ``directory/name``; returns them."""
    rng = random.Random(seed)
    files = {f"w{i}.bin": rng.randbytes(n) for i, n in enumerate(sizes)}
    if config:
        files["sub/config.json"] = b'{"layers": 2}'
    for rel, data in files.items():
        p = Path(directory, name, rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def make_model(origin, name: str = "model", sizes=(200_000, 120_000), seed: int = 0) -> dict[str, bytes]:
    """:func:`write_model` into an ``HTTPOrigin``'s directory (served at ``origin.url(name + "/")``)."""
    return write_model(origin.directory, name, sizes, seed)


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def load_digests(path, device):
    """The loader: sha256 of every file it was given (what a model would read)."""
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            if n == MANIFEST or PART in n:
                continue
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path).replace(os.sep, "/")] = hashlib.sha256(f.read()).hexdigest()
    return out


def model_context(origin, name: str = "m") -> dp.Context:
    """Context ``name`` over the origin's ``model/`` directory, loaded as :func:`load_digests`."""
    return dp.Context(name, load=load_digests, source=origin.url("model/"), device="cpu")


def copy_dir(worker, name: str = "m") -> Path:
    """Where (in-process) ``worker`` keeps the files of context ``name``."""
    cache = worker.plugins["pervasive"].cache
    return Path(cache.files_dir(cache.entries[name].context))


def coordinator(s) -> SourceCoordinator:
    """The scheduler plugin's transfer coordinator."""
    return s.plugins["pervasive"].transfer


def caps(origin_max_concurrent: int, peer_max_uploads: int) -> TransferSettings:
    """Transfer settings with these coordinator caps (the rest: defaults)."""
    return TransferSettings(origin_max_concurrent=origin_max_concurrent, peer_max_uploads=peer_max_uploads)


def fake_scheduler(*workers: str) -> types.SimpleNamespace:
    """Just enough of a Scheduler for a SourceCoordinator."""
    return types.SimpleNamespace(
        workers=dict.fromkeys(workers),
        handlers={},
        task_metadata={},
        set_metadata=lambda keys, value: None,
        log_event=lambda topic, msg: None,
    )
