"""The ``/pervasive`` page on the scheduler: the warm map and what changed over time.

No Bokeh needed: two tornado handlers on the scheduler's HTTP server (the one
that serves the dashboard and ``/metrics``). ``/pervasive`` is a page that
polls ``/pervasive/data.json`` every :data:`POLL_SECONDS` and redraws, with
no reload: time series of loads and evictions per (context, worker) and of
bytes copied from peers vs the origin (sampled by the scheduler every
:data:`SAMPLE_SECONDS`, the last :data:`HISTORY_SAMPLES` kept), and the state
of :class:`~dask_pervasive.ContextSchedulerPlugin` as two tables:

* workers × contexts: state of each context on each worker (resident,
  loading, evicted, failed…), whether its files are cached there, and
  whether the worker is in the context's affinity set;
* per context: pending tasks, affinity set, resident workers, measured load
  and fetch time, measured size.

When the Bokeh dashboard runs, :func:`add_dashboard_page` also lists the page
in its "More..." menu. Install it at runtime with :func:`add_dashboard_page`
(the scheduler preload does), or before the scheduler starts by adding this module to the
``distributed.scheduler.http.routes`` config list.
"""

from __future__ import annotations

import html
import json
import sys
import time
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dask.utils import format_bytes
from distributed.http.utils import RequestHandler
from tornado.ioloop import PeriodicCallback

from ._protocol import PLUGIN_NAME, State
from .metrics import BYTES_BY_SOURCE, worker_counters

if TYPE_CHECKING:
    from distributed import Scheduler

    from .scheduler import ContextSchedulerPlugin

#: Path of the page, below the scheduler's HTTP prefix.
PAGE_PATH = "pervasive"
#: Path of the page's data, below the page.
DATA_PATH = "data.json"
#: How often the page polls its data.
POLL_SECONDS = 2
#: How often the scheduler samples the counters, and how many samples it keeps (30 minutes).
SAMPLE_SECONDS = 2.0
HISTORY_SAMPLES = 900
#: The per-(context, worker) counters plotted, in the order of each sample's values.
SERIES_FIELDS = ("loads", "evictions", BYTES_BY_SOURCE["peer"], BYTES_BY_SOURCE["origin"])

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
nav { margin-bottom: 1em; }
.panel { display: inline-block; vertical-align: top; margin: 0 1.5em 1.5em 0; }
.panel h3 { font-size: 1em; margin: 0 0 0.3em 0; }
.chart text { font-size: 11px; fill: #555; }
.legend { list-style: none; padding: 0; margin: 0.3em 0; font-size: 0.85em; max-width: 560px; }
"""


@dataclass
class _Page:
    """What one scheduler's page shows: a given plugin, or the registered one."""

    plugin: ContextSchedulerPlugin | None
    path: str


class History:
    """Samples of the cumulative per-(context, worker) counters, taken on the scheduler's loop."""

    def __init__(self, scheduler: Scheduler, page: _Page | None = None) -> None:
        self._scheduler = weakref.ref(scheduler)
        self.page = page
        self.samples: deque[tuple[float, dict[str, list[float]]]] = deque(maxlen=HISTORY_SAMPLES)
        self._callback = PeriodicCallback(self.sample, SAMPLE_SECONDS * 1000)

    def start(self) -> None:
        self.sample()
        self._callback.start()

    def stop(self) -> None:
        self._callback.stop()

    def sample(self) -> None:
        scheduler = self._scheduler()
        plugin = _plugin(scheduler, self.page) if scheduler is not None else None
        if plugin is None:
            if scheduler is None or scheduler.status.name in ("closing", "closed"):
                self.stop()
            return
        rows = worker_counters(scheduler, plugin)
        values = {
            f"{name} @ {addr}": [float(row.get(f, 0) or 0) for f in SERIES_FIELDS] for (name, addr), row in rows.items()
        }
        self.samples.append((time.time(), values))


_pages: weakref.WeakKeyDictionary[Any, _Page] = weakref.WeakKeyDictionary()
_histories: weakref.WeakKeyDictionary[Any, History] = weakref.WeakKeyDictionary()


def _plugin(scheduler: Scheduler, page: _Page | None) -> ContextSchedulerPlugin | None:
    plugin = page.plugin if page is not None else None
    return plugin if plugin is not None else scheduler.plugins.get(PLUGIN_NAME)


def history_of(scheduler: Scheduler, page: _Page | None = None) -> History:
    """The scheduler's sampler, started at the first call (from the scheduler's loop)."""
    history = _histories.get(scheduler)
    if history is None:
        history = _histories[scheduler] = History(scheduler, page)
        history.start()
    return history


def page_data(scheduler: Scheduler, plugin: ContextSchedulerPlugin | None, history: History) -> dict[str, Any]:
    """What ``data.json`` returns: the samples and the two tables, rendered."""
    return {
        "fields": list(SERIES_FIELDS),
        "samples": [[t, values] for t, values in history.samples],
        "workers": len(scheduler.workers),
        "installed": plugin is not None,
        "warm_map": render_warm_map(scheduler, plugin) if plugin is not None else "",
        "plans": render_plans(plugin) if plugin is not None else "",
    }


class PervasivePage(RequestHandler):
    """``GET /pervasive``: the warm map as HTML."""

    def initialize(self, dask_server: Scheduler | None = None, extra: Any = None, page: _Page | None = None) -> None:
        super().initialize(dask_server=dask_server, extra=extra)
        self.page = page

    def get(self) -> None:
        history_of(self.server, self.page)  # sampling starts with the first visit at the latest
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(render_page(self.server, _plugin(self.server, self.page)))


class PervasiveData(PervasivePage):
    """``GET /pervasive/data.json``: samples and tables for the page's live refresh."""

    def get(self) -> None:
        history = history_of(self.server, self.page)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(page_data(self.server, _plugin(self.server, self.page), history)))


#: For the ``distributed.scheduler.http.routes`` config (``routes`` of each listed module).
routes: list[tuple] = [(PAGE_PATH, PervasivePage, {}), (f"{PAGE_PATH}/{DATA_PATH}", PervasiveData, {})]


def _add_to_dashboard_menu(scheduler: Scheduler) -> bool:
    """List the page in the Bokeh dashboard's "More..." menu; ``False`` without one.

    A scheduler that serves the Bokeh dashboard has imported its module; one
    without (``dashboard=False``, no bokeh) has no menu, and importing Bokeh
    just for it would double that scheduler's heap (every full pass of the
    garbage collector walks it, inside whichever hook triggers it).
    """
    module = sys.modules.get("distributed.dashboard.scheduler")
    if module is None:
        return False
    template_variables = module.template_variables
    # Memoized per scheduler: the very dict every dashboard page renders its menu from.
    plots = template_variables(scheduler)["plots"]
    if not any(p["url"] == PAGE_PATH for p in plots):
        plots.append({"url": PAGE_PATH, "name": "Pervasive"})
        plots.sort(key=lambda p: p["name"])
    return True


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
    kwargs = {"dask_server": scheduler, "page": page}
    scheduler.http_application.add_handlers(
        r".*", [(path, PervasivePage, kwargs), (f"{path}/{DATA_PATH}", PervasiveData, kwargs)]
    )
    _add_to_dashboard_menu(scheduler)
    history_of(scheduler, page)
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


_SCRIPT = """
const FIELDS_SHOWN = [["loads", "Loads per context @ worker"], ["evictions", "Evictions per context @ worker"]];
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf"];
function chart(title, series, fmt) {
  // series: [[label, [[t, v], ...]], ...] -> an SVG line chart with a legend
  const W = 560, H = 180, L = 60, B = 24;
  let t0 = Infinity, t1 = -Infinity, vmax = 0;
  for (const [, pts] of series) for (const [t, v] of pts) { t0 = Math.min(t0, t); t1 = Math.max(t1, t); vmax = Math.max(vmax, v); }
  if (!isFinite(t0)) { t0 = 0; t1 = 1; }
  if (t1 <= t0) t1 = t0 + 1;
  vmax = Math.max(vmax, 1) * 1.15;  // headroom: a flat line at the maximum stays visible
  const x = t => L + (W - L - 8) * (t - t0) / (t1 - t0), y = v => H - B - (H - B - 8) * v / vmax;
  let svg = `<svg class="chart" width="${W}" height="${H}" role="img"><rect x="${L}" y="8" width="${W - L - 8}" height="${H - B - 8}" fill="#fafafa" stroke="#ccc"/>`;
  svg += `<text x="${L - 4}" y="14" text-anchor="end">${fmt(vmax)}</text><text x="${L - 4}" y="${H - B}" text-anchor="end">0</text>`;
  svg += `<text x="${L}" y="${H - 6}">-${Math.round(t1 - t0)} s</text><text x="${W - 8}" y="${H - 6}" text-anchor="end">now</text>`;
  let legend = "";
  series.forEach(([label, pts], i) => {
    const c = COLORS[i % COLORS.length];
    // cumulative counters: steps, not slopes
    let d = "";
    pts.forEach(([t, v], j) => { d += (j ? ` H${x(t).toFixed(1)} V${y(v).toFixed(1)}` : `M${x(t).toFixed(1)} ${y(v).toFixed(1)}`); });
    svg += `<path d="${d}" fill="none" stroke="${c}" stroke-width="2"/>`;
    const last = pts.length ? pts[pts.length - 1][1] : 0;
    legend += `<li><span style="color:${c}">&#9632;</span> ${label}: ${fmt(last)}</li>`;
  });
  return `<div class="panel"><h3>${title}</h3>${svg}</svg><ul class="legend">${legend}</ul></div>`;
}
function bytes(v) {
  const u = ["B", "kiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : Math.round(v)) + " " + u[i];
}
function count(v) { return String(Math.round(v)); }
async function refresh() {
  let data;
  try {
    const r = await fetch(DATA_URL, {cache: "no-store"});
    data = await r.json();
  } catch (e) {
    document.getElementById("status").textContent = "scheduler unreachable: " + e;
    return;
  }
  const keys = new Set();
  for (const [, values] of data.samples) for (const k in values) keys.add(k);
  const sorted = [...keys].sort();
  const col = name => data.fields.indexOf(name);
  let html = "";
  for (const [field, title] of FIELDS_SHOWN) {
    const i = col(field);
    html += chart(title, sorted.map(k => [k, data.samples.filter(([, v]) => k in v).map(([t, v]) => [t, v[k][i]])]), count);
  }
  const peer = col("bytes_from_peers"), origin = col("bytes_from_origin");
  const total = i => data.samples.map(([t, v]) => [t, Object.values(v).reduce((s, row) => s + row[i], 0)]);
  html += chart("Bytes of context files: from peers vs from the origin", [["from peers", total(peer)], ["from origin", total(origin)]], bytes);
  document.getElementById("charts").innerHTML = html;
  document.getElementById("warm").innerHTML = data.installed ? data.warm_map : "";
  document.getElementById("plans").innerHTML = data.plans;
  document.getElementById("nworkers").textContent = data.workers;
  document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
  document.body.dataset.samples = data.samples.length;
}
refresh();
setInterval(refresh, POLL_MS);
"""


def render_page(scheduler: Scheduler, plugin: ContextSchedulerPlugin | None) -> str:
    """The whole page as an HTML string (the tables as of now; the script keeps them and the charts live)."""
    if plugin is None:
        body = (
            "<p>ContextSchedulerPlugin is not installed on this scheduler: use "
            "<code>dask_pervasive.install(client, ...)</code> or "
            "<code>dask scheduler --preload dask_pervasive.preload</code>.</p>"
        )
    else:
        body = (
            "<div id='charts'></div>"
            f"<h2>Warm map (<span id='nworkers'>{len(scheduler.workers)}</span> workers)</h2>"
            "<p class='muted'>★ = in the context's affinity set (where its pending tasks go); "
            "files = context files cached on the worker.</p>"
            f"<div id='warm'>{render_warm_map(scheduler, plugin)}</div>"
            f"<h2>Contexts</h2><div id='plans'>{render_plans(plugin)}</div>"
        )
    # Relative URLs: the page is served below the dashboard's prefix, like the dashboard's own pages.
    script = f"const DATA_URL = {json.dumps(PAGE_PATH + '/' + DATA_PATH)};\nconst POLL_MS = {POLL_SECONDS * 1000};\n"
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>dask_pervasive — {_e(scheduler.address)}</title><style>{_STYLE}</style></head>"
        f"<body><nav><a href='status'>Dask dashboard</a> · <span class='muted' id='status'></span></nav>"
        f"<h1>dask_pervasive on {_e(scheduler.address)}</h1>{body}"
        + (f"<script>{script}{_SCRIPT}</script>" if plugin is not None else "")
        + "</body></html>"
    )
