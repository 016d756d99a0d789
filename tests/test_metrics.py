"""``dask_pervasive_*`` Prometheus metrics and the ``/pervasive`` page on the scheduler's HTTP server."""

from __future__ import annotations

import sys

import dask
import pytest
from distributed.utils_test import async_poll_for, fetch_metrics, gen_cluster
from plugin_helpers import add_plugin
from tornado.httpclient import AsyncHTTPClient

import dask_pervasive as dp
from dask_pervasive._protocol import HEARTBEAT_KEY
from dask_pervasive.dashboard import _add_to_dashboard_menu, add_dashboard_page, render_page
from dask_pervasive.metrics import register_metrics, unregister_metrics
from dask_pervasive.scheduler import ContextSchedulerPlugin
from dask_pervasive.worker import worker_heartbeat_metrics

pytest.importorskip("prometheus_client")

VALUE = dp.Context("v", load=lambda path, device: {"value": 10}, device="cpu")


@dp.uses_context("v")
def add_value(model, x):
    return model["value"] + x


async def start_plugin(s) -> ContextSchedulerPlugin:
    """Install the plugin object itself (not a pickled copy) so tests can inspect it."""
    return await add_plugin(s, ContextSchedulerPlugin())


def samples(families: dict) -> dict[tuple, float]:
    """``{(sample name, (label, value), ...): value}`` of scraped families."""
    return {(s.name, *sorted(s.labels.items())): s.value for family in families.values() for s in family.samples}


async def warm_both(c, s, plugin, a, b) -> None:
    await dp.install(c, [VALUE], scheduler=False)
    for w in (a, b):
        assert await c.submit(add_value, 0, workers=[w.address], pure=False) == 10
    assert await c.gather(c.map(add_value, range(20))) == list(range(10, 30))
    await async_poll_for(lambda: len(plugin.where()["v"]["resident"]) == 2 and a.address in plugin.budgets, timeout=10)


@gen_cluster(client=True, nthreads=[("", 2)] * 2)
async def test_metrics_scrape(c, s, a, b):
    plugin = await start_plugin(s)
    collector = register_metrics(s, plugin)
    try:
        assert register_metrics(s, plugin) is collector  # idempotent
        await warm_both(c, s, plugin, a, b)
        found = samples(await fetch_metrics(s.http_server.port, "dask_pervasive_"))
        assert found[("dask_pervasive_workers", ("context", "v"), ("state", "resident"))] == 2
        assert found[("dask_pervasive_workers", ("context", "v"), ("state", "failed"))] == 0
        assert found[("dask_pervasive_pending_tasks", ("context", "v"))] == 0
        assert ("dask_pervasive_affinity_workers", ("context", "v")) in found
        assert found[("dask_pervasive_expected_load_seconds", ("context", "v"))] >= 0
        assert found[("dask_pervasive_context_bytes", ("context", "v"), ("memory", "host"))] > 0
        assert found[("dask_pervasive_worker_budget_bytes", ("memory", "host"), ("worker", a.address))] > 0
        for w in (a, b):  # known from the context-state events alone
            assert found[("dask_pervasive_loads_total", ("context", "v"), ("worker", w.address))] == 1

        # The worker plugin installs the heartbeat hook: after a heartbeat every counter is reported.
        for w in (a, b):
            assert w.metrics[HEARTBEAT_KEY] is worker_heartbeat_metrics
            await w.heartbeat()
        found = samples(await fetch_metrics(s.http_server.port, "dask_pervasive_"))
        hits = sum(v for k, v in found.items() if k[0] == "dask_pervasive_hits_total")
        loads = sum(v for k, v in found.items() if k[0] == "dask_pervasive_loads_total")
        assert loads == 2 and loads + hits == 22
        assert found[("dask_pervasive_load_seconds_total", ("context", "v"), ("worker", a.address))] >= 0
        assert found[("dask_pervasive_failures_total", ("context", "v"), ("worker", a.address))] == 0
        sources = {dict(k[1:])["source"] for k in found if k[0] == "dask_pervasive_fetched_bytes_total"}
        assert sources == {"origin", "peer"}
    finally:
        assert unregister_metrics(ContextSchedulerPlugin()) is False  # not the registered one
        assert unregister_metrics(plugin) is True
    assert not await fetch_metrics(s.http_server.port, "dask_pervasive_")


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_metrics_follow_the_latest_scheduler_plugin(c, s, a):
    first = register_metrics(s, ContextSchedulerPlugin())
    plugin = await start_plugin(s)
    try:
        assert register_metrics(s, plugin) is first and first.plugin is plugin
        await dp.install(c, [VALUE], scheduler=False)
        with dask.annotate(context="v"):
            assert await c.submit(lambda x: dp.get_context()["value"] + x, 1) == 11
        await async_poll_for(lambda: plugin.where()["v"]["resident"] == [a.address], timeout=10)
        found = samples(await fetch_metrics(s.http_server.port, "dask_pervasive_"))
        assert found[("dask_pervasive_workers", ("context", "v"), ("state", "resident"))] == 1
    finally:
        unregister_metrics()


def test_worker_heartbeat_metrics_without_plugin():
    class NoPlugin:
        def __init__(self):
            self.plugins = {}

    assert worker_heartbeat_metrics(NoPlugin()) == {}


# -- the /pervasive page ----------------------------------------------------------------
async def get_page(s, path: str = "/pervasive") -> str:
    response = await AsyncHTTPClient().fetch(f"http://localhost:{s.http_server.port}{path}")
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/html")
    return response.body.decode()


@gen_cluster(client=True, nthreads=[("", 2)] * 2)
async def test_dashboard_page(c, s, a, b):
    plugin = await start_plugin(s)
    path = add_dashboard_page(s, plugin)
    assert add_dashboard_page(s, plugin, prefix="/other") == path == "/pervasive"  # idempotent
    page = await get_page(s)
    assert a.address in page and b.address in page and "<td" in page
    await warm_both(c, s, plugin, a, b)
    page = await get_page(s)
    assert page.count('<td class="resident">') == 2
    assert "Contexts" in page and "<td>v</td>" in page


@gen_cluster(client=True, nthreads=[])
async def test_no_bokeh_dashboard_no_menu_and_no_bokeh_import(c, s, monkeypatch):
    """A scheduler without the Bokeh dashboard gets the page but no menu entry, and Bokeh is
    not imported for it (it would double the scheduler's heap, which every gc pass walks)."""
    monkeypatch.delitem(sys.modules, "distributed.dashboard.scheduler", raising=False)
    assert _add_to_dashboard_menu(s) is False
    assert "distributed.dashboard.scheduler" not in sys.modules
    assert add_dashboard_page(s) == "/pervasive"
    assert "dask_pervasive" in await get_page(s)


@gen_cluster(
    client=True,
    nthreads=[("", 1)],
    config={
        "distributed.scheduler.http.routes": [
            "distributed.http.scheduler.prometheus",
            "distributed.http.health",
            "dask_pervasive.dashboard",
        ]
    },
)
async def test_dashboard_page_from_config_routes(c, s, a):
    assert "not installed" in await get_page(s)  # no plugin yet: says how to get one
    await start_plugin(s)
    assert a.address in await get_page(s)


def test_render_page_escapes():
    class FakeScheduler:
        def __init__(self):
            self.address = "tcp://<host>:1"
            self.workers = {}

    html = render_page(FakeScheduler(), None)
    assert "&lt;host&gt;" in html and "<host>" not in html


def test_without_prometheus_client_warns_once(monkeypatch, caplog):
    import sys

    from dask_pervasive import metrics

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    monkeypatch.setattr(metrics, "_warned_missing", False)
    with caplog.at_level("WARNING", logger="dask_pervasive.metrics"):
        assert register_metrics(object(), ContextSchedulerPlugin()) is None
        assert register_metrics(object(), ContextSchedulerPlugin()) is None
    warnings = [r.getMessage() for r in caplog.records if "prometheus_client" in r.getMessage()]
    assert len(warnings) == 1 and "dask-pervasive[prometheus]" in warnings[0]
