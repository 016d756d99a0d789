"""What context work is queued where: an index of our tasks in ``processing``, per worker and context.

The planner needs each worker's committed work (tasks already sent to it,
queued or running) so a worker busy with one context's backlog does not look
free to another. Scanning every task per re-plan is what must be avoided, so
:class:`WorkerQueues` is kept incrementally from the scheduler plugin's
``transition`` hook (a task enters or leaves ``processing``) and from the
work-stealing extension's ``confirm`` events (a steal moves a task between
workers without a transition). Each update is ``O(1)``, and so is reading
the counts: :attr:`WorkerQueues.tasks` is the live ``worker -> context -> n``
index the planner reads beside its views (a view is rebuilt only when a worker
reports, not whenever one of its tasks starts or ends).

It also serves tail rebalancing: :meth:`WorkerQueues.queued_keys` gives the
keys of one context queued on one worker, newest last, so a member of an
affinity set that runs dry can take work from the member with the longest
queue (see :meth:`dask_pervasive._placement.PlacementPlanner._rebalance`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from ._protocol import State

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import WorkerState

    from ._measures import ContextPlan, WorkerContext

#: The ``stealing`` event of a confirmed steal: ``("confirm", key, state, victim, thief, stimulus_id)``.
STEAL_CONFIRM = "confirm"


class WorkerQueues:
    """Our context tasks in ``processing``, indexed by worker and context.

    Examples
    --------
    >>> q = WorkerQueues()
    >>> q.add("k1", "tcp://a:1", "llm")
    >>> q.add("k2", "tcp://a:1", "llm")
    >>> q.counts("tcp://a:1")
    {'llm': 2}
    >>> q.move("k2", "tcp://b:1")
    >>> q.counts("tcp://a:1"), q.counts("tcp://b:1")
    ({'llm': 1}, {'llm': 1})
    >>> q.total("tcp://a:1")
    1
    """

    def __init__(self) -> None:
        #: worker -> context -> keys (a dict as an insertion-ordered set: newest last)
        self._by_worker: dict[str, dict[str, dict[Hashable, None]]] = {}
        self._where: dict[Hashable, tuple[str, str]] = {}  #: key -> (worker, context)
        #: worker -> context -> len(keys), kept beside the keys so a plan reads it without building dicts
        self._counts: dict[str, dict[str, int]] = {}
        self._totals: dict[str, int] = {}  #: worker -> our tasks there

    def __len__(self) -> int:
        return len(self._where)

    def add(self, key: Hashable, worker: str, context: str) -> None:
        """``key`` of ``context`` went to ``worker`` (it entered ``processing``)."""
        if key in self._where:
            self.discard(key)
        self._by_worker.setdefault(worker, {}).setdefault(context, {})[key] = None
        self._where[key] = (worker, context)
        counts = self._counts.setdefault(worker, {})
        counts[context] = counts.get(context, 0) + 1
        self._totals[worker] = self._totals.get(worker, 0) + 1

    def discard(self, key: Hashable) -> str | None:
        """``key`` left ``processing``; the worker it was on (None if it was not indexed)."""
        where = self._where.pop(key, None)
        if where is None:
            return None
        worker, context = where
        per = self._by_worker.get(worker)
        if per is not None:
            keys = per.get(context)
            if keys is not None:
                keys.pop(key, None)
                if not keys:
                    del per[context]
            if not per:
                del self._by_worker[worker]
        counts = self._counts[worker]
        if counts[context] > 1:
            counts[context] -= 1
        else:
            del counts[context]
            if not counts:
                del self._counts[worker]
        if self._totals[worker] > 1:
            self._totals[worker] -= 1
        else:
            del self._totals[worker]
        return worker

    def move(self, key: Hashable, worker: str) -> None:
        """``key`` now runs on ``worker`` (a confirmed steal)."""
        where = self._where.get(key)
        if where is not None and where[0] != worker:
            self.discard(key)
            self.add(key, worker, where[1])

    def forget_worker(self, worker: str) -> None:
        """``worker`` left: its tasks are rescheduled (their transitions re-add them elsewhere)."""
        for keys in self._by_worker.pop(worker, {}).values():
            for key in keys:
                self._where.pop(key, None)
        self._counts.pop(worker, None)
        self._totals.pop(worker, None)

    @property
    def tasks(self) -> Mapping[str, Mapping[str, int]]:
        """``{worker: {context: tasks queued or running there}}``, live (read it, never change it); no empty entries."""
        return self._counts

    def counts(self, worker: str) -> dict[str, int]:
        """``{context: tasks queued or running on worker}`` (a copy)."""
        return dict(self._counts.get(worker, {}))

    def count(self, worker: str, context: str) -> int:
        return self._counts.get(worker, {}).get(context, 0)

    def total(self, worker: str) -> int:
        """Our tasks queued or running on ``worker``, all contexts."""
        return self._totals.get(worker, 0)

    def queued_keys(self, worker: str, context: str) -> Iterator[Hashable]:
        """Keys of ``context`` on ``worker``, newest first (the ones least likely to be running)."""
        return reversed(list(self._by_worker.get(worker, {}).get(context, {})))


def steal_within_set(
    scheduler: Scheduler,
    queues: WorkerQueues,
    thief: WorkerState,
    context: str,
    members: Iterable[str],
    free: int,
) -> int:
    """Move up to ``free`` queued tasks of ``context`` to ``thief`` from the members with the longest queues.

    Dask's work stealing balances restricted tasks only among idle workers
    and the ten most occupied ones cluster-wide, so a member of a small set
    that runs dry may wait while another member still has a queue (a tail
    of one task time or more). This asks the stealing extension to move
    tasks (its request/confirm protocol: a task that started meanwhile
    stays where it is). ``free`` is the thief's free threads (its steals in
    flight not yet counted in its ``processing``). A task moves only from a member with more tasks
    than threads (so not the one it runs). Returns the number of requests
    sent; without the stealing extension (``distributed.scheduler.work-stealing: false``)
    nothing moves.

    Cost: ``O(members)`` plus the keys looked at on the victims.
    """
    stealing = scheduler.extensions.get("stealing")
    if stealing is None:
        return 0
    if free <= 0:
        return 0
    excess = []
    for addr in members:
        if addr == thief.address:
            continue
        ws = scheduler.workers.get(addr)
        if ws is None:
            continue
        extra = queues.count(addr, context) - ws.nthreads
        if extra > 0:
            excess.append((extra, addr, ws))
    if not excess:
        return 0
    excess.sort(key=lambda e: (-e[0], e[1]))
    sent = 0
    for extra, addr, victim in excess:
        for key in queues.queued_keys(addr, context):
            if sent >= free or extra <= 0:
                break
            ts = scheduler.tasks.get(key)
            if (
                ts is None
                or ts.processing_on is not victim
                or ts in victim.executing
                or ts in stealing.in_flight
                or (ts.worker_restrictions and thief.address not in ts.worker_restrictions)
            ):
                continue
            if stealing.move_task_request(ts, victim, thief).startswith("steal-"):
                sent += 1
                extra -= 1
        if sent >= free:
            break
    return sent


def rebalance(
    scheduler: Scheduler,
    queues: WorkerQueues,
    plans: Mapping[str, ContextPlan],
    warm: Mapping[str, Mapping[str, WorkerContext]],
    workers: Iterable[str],
) -> None:
    """Each of ``workers`` with a free thread takes queued tasks of the sets it is in (see :func:`steal_within_set`).

    Only contexts resident on it count (a loading one cannot run them yet).
    Cost: ``O(contexts)`` per worker plus the steals' own.
    """
    for addr in workers:
        ws = scheduler.workers.get(addr)
        free = ws.nthreads - len(ws.processing) if ws is not None and ws in scheduler.running else 0
        if free <= 0:
            continue
        for name, plan in plans.items():
            if not plan.pending or addr not in plan.members or len(plan.members) < 2:
                continue
            wc = warm.get(name, {}).get(addr)
            if wc is None or wc.state is not State.RESIDENT:
                continue
            free -= steal_within_set(scheduler, queues, ws, name, plan.members, free)
            if free <= 0:
                break
