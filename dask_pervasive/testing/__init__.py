"""Helpers for testing code that uses dask_pervasive, as :mod:`distributed.utils_test` is for Dask.

:class:`HTTPOrigin`
    A local HTTP server with one global bandwidth cap (a stand-in for a
    contended shared filesystem), byte counters and fault injection; its
    ``url("model/")`` works as a context ``source``.
:func:`make_tiny_gpt2`
    A small but real ``transformers`` GPT-2 and tokenizer written with
    ``save_pretrained``, built locally (no hub access).

Nothing here is imported by ``import dask_pervasive``; importing this package
loads only the standard library (``make_tiny_gpt2`` imports ``torch``,
``tokenizers`` and ``transformers`` when called).
"""

from __future__ import annotations

from dask_pervasive.testing.http_origin import FAULTS, Fault, HTTPOrigin, TokenBucket
from dask_pervasive.testing.models import CORPUS, make_tiny_gpt2

__all__ = ["CORPUS", "FAULTS", "Fault", "HTTPOrigin", "TokenBucket", "make_tiny_gpt2"]
