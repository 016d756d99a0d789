"""Prometheus metrics of dask_pervasive on the scheduler's ``/metrics`` (``dask_pervasive_*``).

:class:`PervasiveMetricCollector` reads the state of
:class:`~dask_pervasive.ContextSchedulerPlugin` at scrape time; nothing is
recorded twice. Gauges (per context): workers by state, affinity set size,
pending tasks, expected load/fetch seconds, measured size; per worker: memory
budgets. Counters (per context and worker, as each worker counts them, so a
worker leaving only ends its series): loads, load seconds, fetch seconds,
hits, evictions, failures, bytes fetched by source (``peer``/``origin``);
per context: placements on warm and cold workers.

Workers report their counters with their heartbeats: a worker that runs
:func:`dask_pervasive.worker.worker_heartbeat_metrics` under
``worker.metrics[HEARTBEAT_KEY]`` (the worker plugin puts it there) sends
them in every heartbeat and the scheduler keeps the latest in
``WorkerState.metrics``. Without it only ``loads`` is known (from the
context-state events the scheduler plugin receives).

``prometheus_client`` is optional: without it :func:`register_metrics` does
nothing, as distributed's own ``/metrics`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from distributed.http.prometheus import PrometheusCollector

from ._protocol import HEARTBEAT_KEY

if TYPE_CHECKING:
    from distributed import Scheduler
    from prometheus_client.core import Metric

    from .scheduler import ContextSchedulerPlugin

logger = logging.getLogger(__name__)


#: Counters every worker keeps per context, with the help text of their metric.
COUNTERS: dict[str, str] = {
    "loads": "Context loads (fetch + load) per worker",
    "load_seconds": "Seconds spent fetching and loading contexts per worker",
    "fetch_seconds": "Seconds spent copying context files per worker",
    "hits": "get_context calls served by a resident context per worker",
    "evictions": "Contexts evicted to make room per worker",
    "failures": "Failed context loads per worker",
}
#: Byte counters, exposed as one metric with a ``source`` label.
BYTES_BY_SOURCE = {"peer": "bytes_from_peers", "origin": "bytes_from_origin"}
#: Optional ``ContextPlan`` counters, read when the scheduler plugin keeps them.
PLACEMENTS_BY_KIND = {"warm": "warm_placements", "cold": "cold_placements"}
#: Lists of the warm map (:func:`dask_pervasive._protocol.warm_map_entry`) exported as gauges.
_WARM_STATES = ("resident", "loading", "files", "failed")

_warned_missing = False
_registered: PervasiveMetricCollector | None = None


class PervasiveMetricCollector(PrometheusCollector):
    """Prometheus collector of one :class:`~dask_pervasive.ContextSchedulerPlugin`.

    Parameters
    ----------
    server
        The scheduler.
    plugin
        Its context scheduler plugin.
    """

    server: Scheduler

    def __init__(self, server: Scheduler, plugin: ContextSchedulerPlugin) -> None:
        super().__init__(server)
        self.subsystem = "pervasive"
        self.plugin = plugin

    def collect(self) -> Iterator[Metric]:
        yield from self._context_gauges()
        yield self._budget_gauge()
        yield from self._worker_counters()
        yield self._placements()

    # -- gauges ---------------------------------------------------------------------
    def _context_gauges(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        plugin = self.plugin
        workers = GaugeMetricFamily(
            self.build_name("workers"),
            "Workers per context and state (resident, loading, files: context files cached, failed)",
            labels=["context", "state"],
        )
        affinity = GaugeMetricFamily(
            self.build_name("affinity_workers"),
            "Workers the context's pending tasks are steered to",
            labels=["context"],
        )
        pending = GaugeMetricFamily(
            self.build_name("pending_tasks"), "Unfinished tasks that need the context", labels=["context"]
        )
        load = GaugeMetricFamily(
            self.build_name("expected_load_seconds"),
            "Moving average of measured fetch + load time",
            labels=["context"],
        )
        fetch = GaugeMetricFamily(
            self.build_name("expected_fetch_seconds"),
            "Moving average of measured fetch time",
            labels=["context"],
        )
        size = GaugeMetricFamily(
            self.build_name("context_bytes"), "Measured size of a loaded context", labels=["context", "memory"]
        )
        for name, members in plugin.where().items():
            for state in _WARM_STATES:
                workers.add_metric([name, state], len(members[state]))
            affinity.add_metric([name], len(members["affinity"]))
            plan = plugin.plans.get(name)
            if plan is None:
                continue
            pending.add_metric([name], len(plan.pending))
            if plan.load_seconds is not None:
                load.add_metric([name], plan.load_seconds)
            if plan.fetch_seconds is not None:
                fetch.add_metric([name], plan.fetch_seconds)
            if plan.size is not None:
                size.add_metric([name, "host"], plan.size[0])
                size.add_metric([name, "device"], plan.size[1])
        yield from (workers, affinity, pending, load, fetch, size)

    def _budget_gauge(self) -> Metric:
        from prometheus_client.core import GaugeMetricFamily

        budget = GaugeMetricFamily(
            self.build_name("worker_budget_bytes"),
            "Memory budget for contexts announced by each worker (absent: unlimited or unknown)",
            labels=["worker", "memory"],
        )
        for worker, (host, device) in sorted(self.plugin.budgets.items()):
            if host is not None:
                budget.add_metric([worker, "host"], host)
            if device is not None:
                budget.add_metric([worker, "device"], device)
        return budget

    # -- counters ---------------------------------------------------------------------
    def worker_counters(self) -> dict[tuple[str, str], dict[str, float]]:
        """``{(context, worker): counters}``: see :func:`worker_counters`."""
        return worker_counters(self.server, self.plugin)

    def _worker_counters(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        families = {
            field: CounterMetricFamily(self.build_name(field), text, labels=["context", "worker"])
            for field, text in COUNTERS.items()
        }
        fetched = CounterMetricFamily(
            self.build_name("fetched_bytes"),
            "Bytes of context files copied per worker, by source (peer or origin)",
            labels=["context", "worker", "source"],
        )
        for (name, addr), row in sorted(self.worker_counters().items()):
            for field, family in families.items():
                if field in row:
                    family.add_metric([name, addr], row[field])
            for source, field in BYTES_BY_SOURCE.items():
                if field in row:
                    fetched.add_metric([name, addr, source], row[field])
        yield from families.values()
        yield fetched

    def _placements(self) -> Metric:
        from prometheus_client.core import CounterMetricFamily

        placements = CounterMetricFamily(
            self.build_name("placements"),
            "Workers added to a context's affinity set, by whether the context was warm there",
            labels=["context", "kind"],
        )
        for name, plan in sorted(self.plugin.plans.items()):
            for kind, attr in PLACEMENTS_BY_KIND.items():
                value = getattr(plan, attr, None)
                if value is not None:
                    placements.add_metric([name, kind], value)
        return placements


def worker_counters(scheduler: Scheduler, plugin: ContextSchedulerPlugin) -> dict[tuple[str, str], dict[str, float]]:
    """``{(context, worker): counters}`` from heartbeats and the plugin's warm map.

    Where both know a counter, the larger value wins: both are the same
    cumulative worker counter, one of them older. Needs no ``prometheus_client``
    (the dashboard page reads it too).
    """
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for addr, ws in scheduler.workers.items():
        reported = (ws.metrics or {}).get(HEARTBEAT_KEY) or {}
        for name, counters in reported.items():
            rows[(name, addr)] = dict(counters)
    fields = [*COUNTERS, *BYTES_BY_SOURCE.values()]
    for name, states in plugin.warm.items():
        for addr, wc in states.items():
            row = rows.setdefault((name, addr), {})
            for field in fields:
                value = getattr(wc, field, None)
                if value is not None:
                    row[field] = max(row.get(field, value), value)
    return rows


def register_metrics(scheduler: Scheduler, plugin: ContextSchedulerPlugin) -> PervasiveMetricCollector | None:
    """Expose ``plugin``'s state on ``scheduler``'s ``/metrics``. Idempotent.

    The collector is registered once per process on
    ``prometheus_client.REGISTRY`` (which distributed's ``/metrics`` serves);
    later calls point it at the given scheduler and plugin, as distributed
    does with its own collectors when schedulers are started one after
    another in one process.

    Returns
    -------
    The collector, or ``None`` when ``prometheus_client`` is not installed.

    Examples
    --------
    >>> register_metrics(scheduler, scheduler.plugins[PLUGIN_NAME])  # doctest: +SKIP
    """
    global _registered
    try:
        import prometheus_client
    except ImportError:
        global _warned_missing
        if not _warned_missing:  # once per process: every scheduler start would repeat it
            _warned_missing = True
            logger.warning(
                "pervasive: prometheus_client is not installed, so /metrics has no dask_pervasive_* series "
                "(pip install dask-pervasive[prometheus])"
            )
        return None
    if _registered is not None:
        _registered.server = scheduler
        _registered.plugin = plugin
        return _registered
    collector = PervasiveMetricCollector(scheduler, plugin)
    prometheus_client.REGISTRY.register(collector)
    _registered = collector
    return collector


def unregister_metrics(plugin: ContextSchedulerPlugin | None = None) -> bool:
    """Remove the collector (only if it reads ``plugin``, when given); ``True`` if removed."""
    global _registered
    if _registered is None or (plugin is not None and _registered.plugin is not plugin):
        return False
    import prometheus_client

    prometheus_client.REGISTRY.unregister(_registered)
    _registered = None
    return True
