"""The vocabulary both plugin halves share: names, topics, actions, handlers, states.

Imported by the worker half, the scheduler half, the client helpers and the
transfer package; it imports none of them (the role ``distributed/shuffle/_core.py``
plays for the P2P shuffle). A string that travels between processes is spelled
once, here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

#: Name of both plugins (``worker.plugins[PLUGIN_NAME]``, ``scheduler.plugins[PLUGIN_NAME]``).
PLUGIN_NAME = "pervasive"
#: Prefix of the small per-context declaration plugins :func:`dask_pervasive.register` adds.
DECLARATION_PREFIX = "pervasive-context-"
#: Topic of every event our plugins log (``worker.log_event`` / ``scheduler.log_event``).
EVENT_TOPIC = "pervasive"
#: Key of our counters in ``worker.metrics`` (sent with every heartbeat).
HEARTBEAT_KEY = "pervasive"
#: ``"action"`` of the event Dask's scheduler logs (under the worker's address) when a worker's status changes.
DASK_STATUS_CHANGE = "worker-status-change"
#: Names of the worker statuses (``distributed.core.Status``) of a worker on its way out.
LEAVING_STATUSES = frozenset({"closing_gracefully", "closing", "closed"})
#: Attribute :func:`dask_pervasive.uses_context` sets on the functions it decorates.
CONTEXT_ATTR = "__pervasive_context__"
#: ``startstops`` action that holds the time a task spent loading its context.
LOAD_STARTSTOP = "pervasive-load"


class Action(str, enum.Enum):
    """The ``"action"`` field of :data:`EVENT_TOPIC` events."""

    #: worker → scheduler: the worker's host/device budgets.
    WORKER_BUDGET = "worker-budget"
    #: worker → scheduler: one context changed state on the worker.
    CONTEXT_STATE = "context-state"
    #: worker: a copy of context files finished (sources and bytes per source).
    TRANSFER = "transfer"
    #: scheduler: a worker joined a context's affinity set (with the reason).
    PLACEMENT = "placement"
    #: scheduler: a worker left while holding contexts.
    WORKER_LOST = "worker-lost"
    #: scheduler: a worker started leaving (retired, lifetime, closing): it takes no new
    #: context tasks and serves its files to peers until it is gone.
    WORKER_LEAVING = "worker-leaving"
    #: scheduler: the coordinator handed a copy source to a worker.
    TRANSFER_SOURCE = "transfer-source"


class State(str, enum.Enum):
    """Where one context stands on one worker (the cache's state machine)."""

    ABSENT = "absent"
    FETCHING = "fetching"
    LOADING = "loading"
    RESIDENT = "resident"
    EVICTED = "evicted"
    FAILED = "failed"


#: States in which a worker holds, or is about to hold, a context.
WARMING_STATES = frozenset({State.FETCHING, State.LOADING})
HOLDING_STATES = frozenset({State.RESIDENT, State.FETCHING, State.LOADING})


class WorkerHandler(str, enum.Enum):
    """RPC handlers our worker plugin adds to ``worker.handlers``."""

    STATE = "pervasive_state"
    PREWARM = "pervasive_prewarm"
    MANIFEST = "pervasive_manifest"
    READ = "pervasive_read"


class SchedulerHandler(str, enum.Enum):
    """RPC handlers the scheduler plugin's source coordinator adds to ``scheduler.handlers``."""

    ACQUIRE_SOURCE = "pervasive_acquire_source"
    RELEASE_SOURCE = "pervasive_release_source"
    HOLDERS = "pervasive_holders"


#: ``client.set_metadata`` keys: context name → token, and → human-readable definition.
METADATA_CONTEXTS = ("pervasive", "contexts")
METADATA_DEFINITIONS = ("pervasive", "definitions")
#: The coordinator's published transfer state.
METADATA_TRANSFER = ("pervasive", "transfer")


def warm_map_entry(
    states: Iterable[tuple[str, str, bool]], affinity: Iterable[str] | None = None
) -> dict[str, list[str]]:
    """One context's row of the warm map :func:`dask_pervasive.where` returns.

    Parameters
    ----------
    states
        ``(worker, state, has_files)`` for each worker that reported the context.
    affinity
        The scheduler plugin's affinity set; ``None`` (no scheduler plugin)
        leaves the ``"affinity"`` list out.
    """
    row: dict[str, list[str]] = {"resident": [], "files": [], "loading": [], "failed": []}
    for worker, value, files in sorted(states, key=lambda s: s[0]):
        state = State(value)  # set membership of plain strings depends on the Python version's Enum hash
        if state is State.RESIDENT:
            row["resident"].append(worker)
        elif state in WARMING_STATES:
            row["loading"].append(worker)
        elif state is State.FAILED:
            row["failed"].append(worker)
        if files:
            row["files"].append(worker)
    if affinity is not None:
        row["affinity"] = sorted(affinity)
    return row
