"""The package's layout: every module imports on its own, and no two modules import each other."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import dask_pervasive

PACKAGE = Path(dask_pervasive.__file__).parent


def _modules() -> list[str]:
    # __main__ modules run a program when imported: not modules to import.
    names = pkgutil.walk_packages([str(PACKAGE)], prefix="dask_pervasive.")
    return sorted(info.name for info in names if not info.name.endswith(".__main__"))


def _node(module: str) -> str:
    """A node of the import graph: a top-level module, or a whole sub-package (``transfer``, ``bench``).

    ``dask_pervasive.transfer.coordinator`` → ``transfer``; ``dask_pervasive.worker`` → ``worker``.
    """
    parts = module.split(".")[1:] or ["__init__"]
    return parts[0]


def _runtime_imports(path: Path, module: str) -> set[str]:
    """Package modules ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks excluded)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(base[: len(base) - node.level + 1] + (node.module.split(".") if node.module else []))
                if node.module:
                    found.add(prefix)
                else:  # from . import config
                    found.update(f"{prefix}.{alias.name}" for alias in node.names)
            elif node.module and node.module.split(".")[0] == "dask_pervasive":
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dask_pervasive")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        module = ".".join(parts)
        src = _node(module)
        edges = graph.setdefault(src, set())
        for target in _runtime_imports(path, module):
            dst = _node(target)
            # A module's own package __init__ is imported first anyway; not an edge of the design.
            if dst != src and dst != "__init__":
                edges.add(dst)
    return graph


@pytest.mark.parametrize("module", _modules())
def test_module_imports_alone(module):
    """Each module imports in a fresh interpreter, without anything imported before it."""
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PACKAGE.parent,
    )
    assert proc.returncode == 0, proc.stderr


def test_no_import_cycle():
    """The graph of package-internal imports (``transfer`` as one node) is acyclic."""
    graph = _graph()
    assert {"worker", "scheduler", "_protocol", "transfer"} <= graph.keys()
    assert graph["_protocol"] == set(), "the shared vocabulary imports nothing of the package"
    done: set[str] = set()
    path: list[str] = []

    def walk(node: str) -> None:
        if node in path:
            cycle = path[path.index(node) :] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            walk(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        walk(node)


def test_cycle_check_sees_imports():
    """The walk itself finds relative, absolute, nested and ``from . import`` imports, not TYPE_CHECKING ones."""
    graph = _graph()
    assert "_protocol" in graph["worker"] and "_settings" in graph["worker"]
    assert "config" in graph["_settings"]  # from . import config
    assert "worker" in graph["task"]
    assert "cache" not in graph["_budget"]  # only under TYPE_CHECKING
