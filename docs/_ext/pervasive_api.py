"""``.. pervasive-exceptions::``: autodoc every exception that ``dask_pervasive`` exports.

Errors are added as the package grows; generating this part of the API page from
``dask_pervasive.__all__`` keeps it complete. Classes come in the order they are
defined (the base class, :class:`PervasiveError`, first).
"""

from __future__ import annotations

import importlib
import inspect

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


def exported_exceptions(package: str = "dask_pervasive") -> list[str]:
    """Names in ``package.__all__`` that are exception classes, in definition order."""
    mod = importlib.import_module(package)
    found = []
    for name in mod.__all__:
        obj = getattr(mod, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            try:
                line = inspect.getsourcelines(obj)[1]
            except (OSError, TypeError):
                line = 10**9
            found.append((obj.__module__, line, name))
    return [name for _, _, name in sorted(found)]


class PervasiveExceptions(SphinxDirective):
    """Insert ``.. autoexception::`` for every exported exception."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        lines: list[str] = []
        for name in exported_exceptions():
            lines += [f".. autoexception:: {name}", "   :show-inheritance:", ""]
        container = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source="dask_pervasive.__all__"), container)
        return container.children


def setup(app):
    app.add_directive("pervasive-exceptions", PervasiveExceptions)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
