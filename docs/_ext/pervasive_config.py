"""``.. pervasive-config::``: the configuration reference, generated from pervasive.yaml.

Every key of ``dask_pervasive/pervasive.yaml`` becomes a ``confval`` entry named
by its dotted path (``pervasive.worker.max-bytes``), with its default, the
environment variable that sets it, and the comment written above it in the
YAML file. The YAML is the single source: nothing is copied by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

YAML_PATH = Path(__file__).resolve().parents[2] / "dask_pervasive" / "pervasive.yaml"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_][A-Za-z0-9_.-]*):(?:\s+(?P<value>.*))?$")
_COMMENT = re.compile(r"^\s*#\s?(?P<text>.*)$")
_UNDERLINES = "-~^\"'"


@dataclass
class Entry:
    """One key of the YAML file: a section (mapping) or a setting."""

    path: tuple[str, ...]
    comment: list[str] = field(default_factory=list)
    children: list[Entry] = field(default_factory=list)
    is_section: bool = False

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def parse(text: str) -> Entry:
    """Keys of a block-style YAML mapping, nested, with the comment lines right above each.

    Values come from ``yaml.safe_load``; this only recovers what YAML drops:
    the comments and the order. A blank line detaches a comment from the key below.
    """
    root = Entry(path=(), is_section=True)
    stack: list[tuple[int, Entry]] = [(-1, root)]
    pending: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            pending = []
            continue
        comment = _COMMENT.match(line)
        if comment:
            pending.append(comment.group("text").rstrip())
            continue
        key = _KEY.match(line)
        if not key:  # a continuation of a value (block list items and the like)
            pending = []
            continue
        indent = len(key.group("indent"))
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        value = (key.group("value") or "").split(" #", 1)[0].strip()
        entry = Entry(path=(*parent.path, key.group("key")), comment=pending, is_section=not value)
        parent.children.append(entry)
        stack.append((indent, entry))
        pending = []
    return root


def _lookup(data, path):
    for part in path:
        data = data[part]
    return data


def _leaves(data, path=()):
    if isinstance(data, dict) and data:
        for k, v in data.items():
            yield from _leaves(v, (*path, k))
    else:
        yield path


def _flow(value) -> str:
    """The default as it would be written in YAML, on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def _env_var(path: tuple[str, ...]) -> str:
    return "DASK_" + "__".join(p.upper().replace("-", "_") for p in path)


_LITERAL = re.compile(r"`([^`]+)`")
_RST_SPECIAL = re.compile(r"([\\`*_|\[\]<>:])")


def _inline(text: str) -> str:
    """A YAML comment as reST: `code` becomes a literal, markup characters are escaped."""
    out, pos = [], 0
    for m in _LITERAL.finditer(text):
        out.append(_RST_SPECIAL.sub(r"\\\1", text[pos : m.start()]))
        out.append(f"``{m.group(1)}``")
        pos = m.end()
    out.append(_RST_SPECIAL.sub(r"\\\1", text[pos:]))
    return "".join(out)


def _paragraphs(lines: list[str], indent: str) -> list[str]:
    return [indent + _inline(line) if line.strip() else "" for line in lines]


def render(entry: Entry, data, depth: int = 0) -> list[str]:
    """reST for the settings directly under ``entry``, then each subsection."""
    out: list[str] = []
    for child in entry.children:
        if child.is_section:
            continue
        default = _flow(_lookup(data, child.path))
        out += [f".. confval:: {child.dotted}", ""]
        out += [f"   :Default: ``{default}``", f"   :Environment: ``{_env_var(child.path)}``", ""]
        out += [*_paragraphs(child.comment, "   "), ""]
    for child in entry.children:
        if not child.is_section:
            continue
        if depth == 0:  # the top-level key ("pervasive") is the page itself
            out += render(child, data, depth + 1)
            continue
        title = f"``{child.dotted}``"
        out += [title, _UNDERLINES[min(depth - 1, len(_UNDERLINES) - 1)] * len(title), ""]
        out += [*_paragraphs(child.comment, ""), ""]
        out += render(child, data, depth + 1)
    return out


def _check_complete(root: Entry, data) -> None:
    """Every leaf YAML knows about must have been found by the comment parser."""
    found = set()

    def walk(e: Entry):
        if not e.is_section:
            found.add(e.path)
        for c in e.children:
            walk(c)

    walk(root)
    missing = [".".join(p) for p in _leaves(data) if p not in found]
    if missing:
        raise ExtensionError(f"pervasive-config: cannot place these keys of {YAML_PATH}: {missing}")


class PervasiveConfig(SphinxDirective):
    """Insert the generated configuration reference."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        text = YAML_PATH.read_text(encoding="utf-8")
        self.env.note_dependency(str(YAML_PATH))
        data = yaml.safe_load(text)
        root = parse(text)
        _check_complete(root, data)
        content = StringList(render(root, data), source=str(YAML_PATH))
        container = nodes.container()
        nested_parse_with_titles(self.state, content, container)
        return container.children


def setup(app):
    if not _has_builtin_confval():  # Sphinx < 7.4
        app.add_object_type(
            "confval", "confval", objname="configuration value", indextemplate="pair: %s; configuration value"
        )
    app.add_directive("pervasive-config", PervasiveConfig)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


def _has_builtin_confval() -> bool:
    from sphinx.domains.std import StandardDomain

    return "confval" in StandardDomain.directives
