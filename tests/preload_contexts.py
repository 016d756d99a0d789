"""Contexts and tasks for the ``--preload dask_pervasive.preload`` tests.

Imported by worker processes started from the command line
(``--pervasive-contexts preload_contexts:CONTEXTS``), so it must stay
importable with only ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import os

import dask_pervasive as dp


def load_answer(path, device):
    """A cheap context: a dict built once per worker process."""
    return {"value": 42, "pid": os.getpid()}


ANSWER = dp.Context("answer", load=load_answer, device="cpu")
CONTEXTS = [ANSWER]
#: The same declaration as config entries (what DASK_PERVASIVE__CONTEXTS or a YAML file hold).
CONFIG_ENTRIES = [{"name": "answer", "load": "preload_contexts:load_answer", "device": "cpu"}]


def use_answer(x):
    return dp.get_context("answer")["value"] + x


@dp.uses_context("answer")
def add_answer(model, x):
    return model["value"] + x


def pid_of_answer(x):
    return dp.get_context("answer")["pid"]
