"""The Sphinx site under docs/ builds without warnings and documents the public API."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

import dask_pervasive

pytest.importorskip("sphinx")  # in the "docs" extra, which "test" includes: CI runs these

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs-html")
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",  # every warning is an error ...
        "--keep-going",  # ... but report all of them
        "-q",
        "-b",
        "html",
        "-d",
        str(out / ".doctrees"),
        str(DOCS),
        str(out),
    ]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"sphinx-build failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return out


def _inventory(path: Path) -> set[tuple[str, str]]:
    """``(name, domain:role)`` of every object in a Sphinx ``objects.inv``.

    Format version 2 (every Sphinx since 1.0): four header lines, then zlib-compressed
    lines ``name domain:role priority uri dispname``.
    """
    header = path.read_bytes().split(b"\n", 4)
    assert header[0].startswith(b"# Sphinx inventory version 2"), header[0]
    body = zlib.decompress(header[4]).decode()
    return {tuple(line.split(" ", 2)[:2]) for line in body.splitlines() if line.strip()}


@pytest.mark.timeout(300)
def test_docs_build_without_warnings(built_docs):
    for page in ("index", "why", "quickstart", "concepts", "faq", "api", "config-reference"):
        assert (built_docs / f"{page}.html").is_file(), page


@pytest.mark.timeout(300)
def test_every_public_name_is_documented(built_docs):
    documented = {name for name, role in _inventory(built_docs / "objects.inv") if role.startswith("py:")}
    missing = [name for name in dask_pervasive.__all__ if f"dask_pervasive.{name}" not in documented]
    assert not missing, f"not in docs/api.rst: {missing}"
    api = (built_docs / "api.html").read_text(encoding="utf-8")
    for name in dask_pervasive.__all__:
        assert f'id="dask_pervasive.{name}"' in api, name


def _dotted_keys(data, prefix=()):
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _dotted_keys(value, (*prefix, key))
    else:
        yield ".".join(prefix)


@pytest.mark.timeout(300)
def test_config_reference_covers_every_key(built_docs):
    defaults = yaml.safe_load((ROOT / "dask_pervasive" / "pervasive.yaml").read_text(encoding="utf-8"))
    keys = list(_dotted_keys(defaults))
    assert "pervasive.worker.max-bytes" in keys
    inventory = _inventory(built_docs / "objects.inv")
    page = (built_docs / "config-reference.html").read_text(encoding="utf-8")
    for key in keys:
        assert (key, "std:confval") in inventory, key
        assert f'id="confval-{key}"' in page, key


def test_every_reliability_row_names_an_existing_test():
    """docs/reliability.md: each row points at a test function that exists (in tests/faults/ or tests/)."""
    import re

    rows = [line for line in (DOCS / "reliability.md").read_text().splitlines() if line.startswith("| ")]
    refs = [m.groups() for line in rows if (m := re.search(r"`(test_\w+\.py)::(test_\w+)`", line))]
    assert len(refs) >= 60, f"only {len(refs)} rows reference a test"
    for module, name in refs:
        path = ROOT / "tests" / "faults" / module
        source = (path if path.exists() else ROOT / "tests" / module).read_text()
        assert re.search(rf"^(async )?def {name}\(", source, re.MULTILINE), (
            f"{module}::{name} named in reliability.md does not exist"
        )


def test_code_map_lists_exactly_the_modules_in_the_tree():
    """docs/codemap.md names every module of the package once, and nothing that is not there."""
    import re

    package = ROOT / "dask_pervasive"
    tree = {str(p.relative_to(ROOT)) for p in package.rglob("*.py")}
    listed = re.findall(r"^\| `(dask_pervasive/[^`]+\.py)` \|", (DOCS / "codemap.md").read_text(), flags=re.MULTILINE)
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert set(listed) == tree, f"missing: {sorted(tree - set(listed))}, not in the tree: {sorted(set(listed) - tree)}"
