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


@dp.uses_context("gpt")
def n_tokens(ctx, text):
    """A task of the ``gpt`` (TransformersContext) context."""
    return len(ctx.tokenizer(text)["input_ids"])


def loop_probe(dask_worker) -> dict:
    """Reset the worker's longest event-loop tick (so startup does not count); say what is imported already."""
    import sys

    dask_worker.digests_max["tick-duration"] = 0
    return {m: m in sys.modules for m in ("torch", "transformers")}


def longest_tick(dask_worker) -> float:
    """The worker's longest event-loop tick since :func:`loop_probe`."""
    return dask_worker.digests_max["tick-duration"]
