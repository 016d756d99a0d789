"""A plain HTML page at ``/pervasive`` on the scheduler: the worker × context warm map.

No Bokeh needed: one tornado handler on the scheduler's HTTP server (the one
that serves the dashboard and ``/metrics``), rendering the state of
:class:`~dask_pervasive.ContextSchedulerPlugin` as two tables, refreshed
every few seconds by the browser:

* workers × contexts: state of each context on each worker (resident,
  loading, evicted, failed…), whether its files are cached there, and
  whether the worker is in the context's affinity set;
* per context: pending tasks, affinity set, resident workers, measured load
  and fetch time, measured size.

Install it at runtime with :func:`add_dashboard_page` (the scheduler preload
does), or before the scheduler starts by adding this module to the
``distributed.scheduler.http.routes`` config list.
"""

from __future__ import annotations

import html
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dask.utils import format_bytes
from distributed.http.utils import RequestHandler

from ._protocol import PLUGIN_NAME, State

if TYPE_CHECKING:
    from distributed import Scheduler

    from .scheduler import ContextSchedulerPlugin

#: Path of the page, below the scheduler's HTTP prefix.
PAGE_PATH = "pervasive"
REFRESH_SECONDS = 5

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; font-size: 0.9em; }
th { background: #f0f0f0; }
td.resident { background: #c8e6c9; }
td.loading, td.fetching { background: #fff9c4; }
td.failed { background: #ffcdd2; }
td.evicted { background: #eeeeee; }
.affinity { font-weight: bold; }
.muted { color: #888; }
"""


@dataclass
class _Page:
    """What one scheduler's page shows: a given plugin, or the registered one."""

    plugin: ContextSchedulerPlugin | None
    path: str


_pages: weakref.WeakKeyDictionary[Any, _Page] = weakref.WeakKeyDictionary()


class PervasivePage(RequestHandler):
    """``GET /pervasive``: the warm map as HTML."""

    def initialize(self, dask_server: Scheduler | None = None, extra: Any = None, page: _Page | None = None) -> None:
        super().initialize(dask_server=dask_server, extra=extra)
        self.page = page

    def get(self) -> None:
        plugin = self.page.plugin if self.page is not None else None
        if plugin is None:
            plugin = self.server.plugins.get(PLUGIN_NAME)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(render_page(self.server, plugin))


#: For the ``distributed.scheduler.http.routes`` config (``routes`` of each listed module).
routes: list[tuple] = [(PAGE_PATH, PervasivePage, {})]


def add_dashboard_page(scheduler: Scheduler, plugin: ContextSchedulerPlugin | None = None, prefix: str = "/") -> str:
    """Serve the warm-map page at ``<prefix>pervasive`` on ``scheduler``'s HTTP server. Idempotent.

    Parameters
    ----------
    scheduler
        A started or starting scheduler.
    plugin
        The plugin to show; ``None`` shows whichever is registered as
        ``"pervasive"`` at request time. A later call replaces it.
    prefix
        The scheduler's HTTP prefix (``dask scheduler --dashboard-prefix``);
        only the first call's counts.

    Returns
    -------
    The path of the page.

    Examples
    --------
    >>> add_dashboard_page(scheduler, scheduler.plugins[PLUGIN_NAME])  # doctest: +SKIP
    '/pervasive'
    """
    page = _pages.get(scheduler)
    if page is not None:
        page.plugin = plugin
        return page.path
    path = "/" + "/".join(p for p in (prefix.strip("/"), PAGE_PATH) if p)
    page = _pages[scheduler] = _Page(plugin, path)
    scheduler.http_application.add_handlers(r".*", [(path, PervasivePage, {"dask_server": scheduler, "page": page})])
    return path


# -- rendering ----------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: Iterable[str], rows: Iterable[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _cell(plugin: ContextSchedulerPlugin, name: str, addr: str) -> str:
    """One worker × context cell: state, files flag, affinity mark."""
    wc = plugin.warm.get(name, {}).get(addr)
    plan = plugin.plans.get(name)
    in_set = plan is not None and addr in plan.members
    state = State(wc.state).value if wc is not None else State.ABSENT.value
    parts = [state if wc is not None else '<span class="muted">–</span>']
    if wc is not None and wc.files and state != State.RESIDENT.value:
        parts.append("files")
    if in_set:
        parts.append('<span class="affinity" title="in the affinity set">★</span>')
    text = " ".join(p if p.startswith("<") else _e(p) for p in parts)
    return f'<td class="{_e(state)}">{text}</td>'


def _budget(budgets: tuple[int | None, int | None] | None) -> str:
    if budgets is None:
        return "?"
    host, device = budgets
    host_text = format_bytes(host) if host is not None else "unlimited"
    return host_text if device is None else f"{host_text} / GPU {format_bytes(device)}"


def render_warm_map(scheduler: Scheduler, plugin: ContextSchedulerPlugin) -> str:
    """HTML table: one row per worker, one column per context."""
    names = sorted(set(plugin.plans) | set(plugin.warm))
    addrs = sorted(set(scheduler.workers) | {a for states in plugin.warm.values() for a in states})
    rows = []
    for addr in addrs:
        ws = scheduler.workers.get(addr)
        label = _e(addr) if ws is None or ws.name == addr else f"{_e(addr)} <span class='muted'>({_e(ws.name)})</span>"
        cells = "".join(_cell(plugin, n, addr) for n in names)
        rows.append(f"<tr><td>{label}</td><td>{_e(_budget(plugin.budgets.get(addr)))}</td>{cells}</tr>")
    return _table(["worker", "context budget", *names], rows)


def _seconds(value: float | None) -> str:
    return f"{value:.2f} s" if value is not None else "–"


def render_plans(plugin: ContextSchedulerPlugin) -> str:
    """HTML table: placement state of each context."""
    where = plugin.where()
    rows = []
    for name, members in where.items():
        plan = plugin.plans.get(name)
        size = "–"
        if plan is not None and plan.size is not None:
            size = f"{format_bytes(plan.size[0])} host, {format_bytes(plan.size[1])} GPU"
        cells = [
            name,
            len(plan.pending) if plan is not None else 0,
            ", ".join(members["affinity"]) or "–",
            len(members["resident"]),
            len(members["loading"]),
            len(members["failed"]),
            _seconds(plan.load_seconds if plan is not None else None),
            _seconds(plan.fetch_seconds if plan is not None else None),
            size,
        ]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    header = ["context", "pending tasks", "affinity set", "resident", "loading", "failed", "load", "fetch", "size"]
    return _table(header, rows)


def render_page(scheduler: Scheduler, plugin: ContextSchedulerPlugin | None) -> str:
    """The whole page as an HTML string."""
    if plugin is None:
        body = (
            "<p>ContextSchedulerPlugin is not installed on this scheduler: use "
            "<code>dask_pervasive.install(client, ...)</code> or "
            "<code>dask scheduler --preload dask_pervasive.preload</code>.</p>"
        )
    else:
        body = (
            f"<h2>Warm map ({len(scheduler.workers)} workers)</h2>"
            "<p class='muted'>★ = in the context's affinity set (where its pending tasks go); "
            "files = context files cached on the worker.</p>"
            f"{render_warm_map(scheduler, plugin)}"
            f"<h2>Contexts</h2>{render_plans(plugin)}"
        )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<meta http-equiv='refresh' content='{REFRESH_SECONDS}'>"
        f"<title>dask_pervasive — {_e(scheduler.address)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>dask_pervasive on {_e(scheduler.address)}</h1>{body}</body></html>"
    )
