"""Sphinx configuration for the dask_pervasive documentation.

Build with ``sphinx-build -W docs docs/_build/html`` (``pip install -e ".[docs]"``).
Nothing here reads the network: there is no intersphinx mapping to fetch.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The package from this checkout (also when it is not installed), and docs/_ext.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE / "_ext"))

import dask_pervasive

project = "dask_pervasive"
author = "dask_pervasive contributors"
copyright = "dask_pervasive contributors"
version = release = dask_pervasive.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "numpydoc",
    "sphinx.ext.intersphinx",
    "pervasive_config",  # docs/_ext: the configuration reference, generated from pervasive.yaml
    "pervasive_api",  # docs/_ext: the exceptions part of the API page, from dask_pervasive.__all__
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "**/.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# Broken cross-references are errors (with -W): pages, config keys ({confval})
# and dask_pervasive objects. Other Python names from signatures and docstrings
# (typing, distributed, fsspec, pandas...) cannot resolve without an intersphinx
# inventory, nor can the TypeVar in uses_context's signature.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!dask_pervasive\.).*"),
    (r"py:class", r"dask_pervasive\.task\.F"),
    # Private modules (_protocol, _settings, _placement, ...) are not documented; bases shown by
    # :show-inheritance: may name them.
    (r"py:.*", r"dask_pervasive\._.*"),
]
# Straight quotes: "module:function", "8GiB" and the like are values, not prose.
smartquotes = False

# -- MyST -------------------------------------------------------------------------
# Anchors for "page.md#a-heading" links between the Markdown pages.
myst_heading_anchors = 3

# -- autodoc / numpydoc -----------------------------------------------------------
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False  # fsspec / distributed base-class docstrings are not ours
# The API page lists the members worth documenting explicitly; numpydoc's own
# member tables would repeat (and re-declare) every inherited method.
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

# -- intersphinx ------------------------------------------------------------------
# No inventories: CI may build offline, and a fetch at build time would make -W
# depend on the network. Add mappings here only with a local inventory file.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

# -- HTML -------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"dask_pervasive {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Pervasive context management for Dask",
    "fixed_sidebar": True,
}


# -- pages other people add -------------------------------------------------------
_TOCTREE = re.compile(r"```\{toctree\}(.*?)```", re.DOTALL)


def _unlisted_pages(app, docname: str, source: list[str]) -> None:
    """Append to the root toctree every page that it does not list.

    Pages added to docs/ without touching index.md then appear in the navigation
    instead of failing ``-W`` with "document isn't included in any toctree".
    """
    if docname != app.config.root_doc:
        return
    listed = set()
    for block in _TOCTREE.findall(source[0]):
        for line in block.splitlines():
            entry = line.strip()
            if entry and not entry.startswith(":"):
                listed.add(entry.rsplit("<", 1)[-1].rstrip(">").strip())
    extra = sorted(d for d in app.env.found_docs if d != docname and d not in listed)
    if extra:
        source[0] += "\n\n```{toctree}\n:caption: More\n:maxdepth: 1\n\n" + "\n".join(extra) + "\n```\n"


def _reread_root_when_pages_change(app, env, added, changed, removed) -> list[str]:
    # Incremental builds: the root page's appended toctree depends on which pages exist.
    return [app.config.root_doc] if added or removed else []


def setup(app):
    app.connect("source-read", _unlisted_pages)
    app.connect("env-get-outdated", _reread_root_when_pages_change)
