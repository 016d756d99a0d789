"""Module-level loaders used by tests (importable on worker processes)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

LOADS: list[str] = []
TEARDOWNS: list[object] = []
_lock = threading.Lock()


def load_array(path, device):
    """1 MiB array; records each load in LOADS."""
    with _lock:
        LOADS.append(device)
    time.sleep(0.05)
    return np.ones(2**17, dtype="f8")


def load_slow(path, device):
    time.sleep(0.5)
    return {"pid": os.getpid(), "device": device}


def load_file_text(path, device):
    with open(path) as f:
        return f.read()


def load_dir_listing(path, device):
    out = {}
    for root, _, files in os.walk(path):
        for n in files:
            if not n.startswith("."):
                p = os.path.join(root, n)
                with open(p) as f:
                    out[os.path.relpath(p, path)] = f.read()
    return out


def load_fails(path, device):
    raise RuntimeError("weights are corrupt")


def record_teardown(obj):
    TEARDOWNS.append(obj)


def add_one_with(model, x):
    return model["value"] + x


def load_sleep(path, device, seconds=0.5):
    """A context whose load costs ``seconds``."""
    time.sleep(seconds)
    return {"value": 1, "pid": os.getpid()}


def work(model, x, seconds=0.02):
    time.sleep(seconds)
    return model["value"] + x
