"""Every ```python block of README.md and docs/*.md runs as written.

A page's blocks run in order as one script (later blocks build on earlier ones,
as a reader does), in a fresh Python process, against a fresh in-process
``LocalCluster`` this test starts for the page. What the test changes in the
text, and why, is all listed here:

``SUBSTITUTIONS``
    placeholder addresses and URLs a page uses for "your cluster" / "your
    bucket", replaced by the test cluster's address and local copies.
``<!-- snippet: given NAME[, NAME...] -->`` (a line before a block)
    the block continues a reader's session: it uses names (``client``,
    ``texts``, ...) that the page's prose says come from elsewhere. The test
    defines exactly those names (``GIVEN``) just before that block.
``<!-- snippet: skip REASON -->`` (a line before a block)
    the block cannot run here (it needs a SLURM cluster or a GPU); the test
    lists every such block with its reason (``test_skips_are_listed``).
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

_BLOCK = re.compile(
    r"(?:<!-- snippet: (?P<kind>skip|given) (?P<arg>[^\n]*?) -->\n+)?```python\n(?P<code>.*?)^```",
    re.DOTALL | re.MULTILINE,
)

#: Every skipped block: (page, first line of the block) -> the reason written in the page.
EXPECTED_SKIPS = {
    ("docs/deployment.md", "from dask_jobqueue import SLURMCluster"): "needs a SLURM cluster",
    ("docs/slurm.md", "import json, shlex"): "needs a SLURM cluster",
}

#: What a given name is bound to, in the snippet process (``ADDRESS`` is the test cluster's).
GIVEN = {
    "client": "from distributed import Client\nclient = Client(ADDRESS)",
    "texts": 'texts = ["The Eiffel Tower is in Paris.", "Light travels faster than sound."] * 4',
    "prompts": 'prompts = ["The Moon orbits", "Dask schedules"]',
}


def substitutions(address: str, gpt2: str, data: pathlib.Path) -> dict[str, str]:
    """Placeholder -> what the snippet process uses instead."""
    return {
        '"scheduler-address:8786"': repr(address),  # "your scheduler": the test's LocalCluster
        '"s3://models/gpt2/"': repr(pathlib.Path(gpt2).as_uri()),  # a real tiny GPT-2 (dask_pervasive.testing)
        '"s3://bucket/index/"': repr(data.as_uri()),  # a local directory (s3fs is not needed for file://)
    }


def blocks(page: str) -> list[tuple[str | None, str, str]]:
    """``(kind, arg, code)`` for each python block of ``page``; ``kind`` is ``None``, ``"skip"`` or ``"given"``."""
    text = (ROOT / page).read_text()
    return [(m["kind"], (m["arg"] or "").strip(), m["code"]) for m in _BLOCK.finditer(text)]


def script_for(page: str, subs: dict[str, str]) -> str | None:
    """The page's runnable blocks as one script, or ``None`` when it has none."""
    parts = []
    for kind, arg, code in blocks(page):
        if kind == "skip":
            continue
        if kind == "given":
            for name in (n.strip() for n in arg.split(",")):
                assert name in GIVEN, f"{page}: 'snippet: given {name}': the test does not define {name!r}"
                parts.append(GIVEN[name])
        for old, new in subs.items():
            code = code.replace(old, new)
        parts.append(code)
    return "\n".join(parts) if parts else None


RUNNABLE = [p for p in PAGES if any(kind != "skip" for kind, _, _ in blocks(p))]


def test_skips_are_listed():
    found = {(p, code.splitlines()[0]): arg for p in PAGES for kind, arg, code in blocks(p) if kind == "skip"}
    assert found == EXPECTED_SKIPS


def test_every_page_with_python_is_run():
    # A block the regex misses would silently escape the test: count fences independently.
    for page in PAGES:
        assert (ROOT / page).read_text().count("```python\n") == len(blocks(page)), page
    assert {"README.md", "docs/quickstart.md", "docs/usage.md", "docs/index.md"} <= set(RUNNABLE)


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE)
def test_snippets_run(page, tiny_gpt2, tmp_path):
    pytest.importorskip("transformers")
    from distributed import LocalCluster

    data = tmp_path / "index"
    data.mkdir()
    (data / "index.faiss").write_bytes(b"")
    with LocalCluster(
        n_workers=2, threads_per_worker=2, processes=False, protocol="tcp", dashboard_address=":0", scheduler_port=0
    ) as cluster:
        script = script_for(page, substitutions(cluster.scheduler_address, tiny_gpt2, data))
        script = f"ADDRESS = {cluster.scheduler_address!r}\n" + script
        path = tmp_path / "snippet.py"
        path.write_text(script)
        proc = subprocess.run(
            [sys.executable, str(path)], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=240
        )
    numbered = "\n".join(f"{i + 1:4} {line}" for i, line in enumerate(script.splitlines()))
    assert proc.returncode == 0, (
        f"{page}: its python blocks fail as one script\n{numbered}\n--- stderr ---\n"
        + textwrap.indent(proc.stderr[-6000:], "  ")
    )
