"""Load ``pervasive.yaml`` into ``dask.config`` under the ``pervasive`` key.

:func:`get` is how the package reads a setting: it falls back to the packaged
defaults when ``dask.config`` no longer has them, e.g. after
``distributed.utils_test``'s ``reset_config()`` restored a snapshot taken
before this module was imported.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import dask.config
import yaml

fn = os.path.join(os.path.dirname(__file__), "pervasive.yaml")

with open(fn) as f:
    defaults = yaml.safe_load(f)

dask.config.update_defaults(defaults)
dask.config.ensure_file(source=fn, comment=True)

_MISSING = object()


def get(key: str) -> Any:
    """The value of ``pervasive.<key>``, or its packaged default when unset.

    Parameters
    ----------
    key
        A dotted key below ``pervasive``: ``"worker.max-bytes"``,
        ``"transfer"`` (a whole section: packaged defaults overlaid with what
        ``dask.config`` sets).

    Examples
    --------
    >>> from dask_pervasive import config
    >>> config.get("transfer.peers")
    True
    """
    packaged = dask.config.get(key, default=_MISSING, config=defaults["pervasive"])
    current = dask.config.get(f"pervasive.{key}", default=_MISSING)
    if current is _MISSING:
        if packaged is _MISSING:
            raise KeyError(f"pervasive.{key}")
        return copy.deepcopy(packaged)
    if isinstance(packaged, dict) and isinstance(current, dict):
        return dask.config.merge(copy.deepcopy(packaged), current)
    return current
