"""Load ``pervasive.yaml`` into ``dask.config`` under the ``pervasive`` key."""

from __future__ import annotations

import os

import dask.config
import yaml

fn = os.path.join(os.path.dirname(__file__), "pervasive.yaml")

with open(fn) as f:
    defaults = yaml.safe_load(f)

dask.config.update_defaults(defaults)
dask.config.ensure_file(source=fn, comment=True)
