"""Joint placement planning: which workers each context's tasks may run on.

Pure and distributed-free: the scheduler plugin turns its warm map, budgets,
estimates and Dask's queues into :class:`WorkerView` / :class:`ContextView` /
:class:`QueuedWork` snapshots, calls :meth:`Planner.plan`, and applies the
returned affinity sets (restrictions) and prewarm requests. The
:class:`Planner` object keeps only the hysteresis memory between plans (and,
to allocate less, each worker's working state while its view is the same
object).

Model
-----
Work is measured in *median seconds* (how long it takes on a worker of speed
1). Worker ``w`` runs ``rate_w = nthreads / speed`` of it per second, so a 2×
slower worker gets half the work. Each worker has one timeline: work that is
not in any affinity set (plain tasks, tasks of a set it has left), then the
contexts it serves, one after the other. Its *ready time* for context ``c`` is
the time its earlier commitments end, plus what it must still pay for ``c``
(nothing when resident, the rest of a running load, the load without the fetch
when the files are cached, a full load otherwise; its own measured load time,
else the context's times its load factor, else ``default_load_seconds``), plus
the reload cost of contexts in demand it would have to evict to make room.

A context's backlog ``W`` finishes at the ``T`` solving
``sum(rate_i * max(0, T - r_i)) == W`` over its members (water-filling with
speeds); a member ready after ``T`` contributes nothing. Growth is greedy and
critical-first: the context that finishes last is offered its best candidate;
the addition is taken when it shortens ``T`` and *pays for itself*: the work
the set saves (``ΔT`` × the set's rate) exceeds the work the new worker gives
up while loading and evicting. Because a worker busy with context A is ready
for B only after A, busy workers look busy, and because the latest context
chooses first, one context cannot take the workers another one needs. A
context with ``pending <= prewarm_backlog * members`` (or no more pending
tasks than members) does not grow; a warm idle worker joins for free.
When no addition pays for itself any more, *idle capacity* is offered: a
worker with nothing queued and room for the context beside what it holds
joins while its set finishes sooner even if its load took
``1 + idle_load_margin`` times its estimate (its loading time would go unused
otherwise, and nothing is evicted; the margin keeps it from reading the files
for the last few tasks of a backlog, or for none when the estimate was short).

New backlogs settle before sets grow cold: every context in demand gets its
first worker at once (its tasks are restricted in the same plan), but while
any backlog is younger than ``settle_seconds`` (its first task arrived with
no set) and another known context has none yet (``quiet_contexts``),
contexts whose own backlog is younger than ``_SETTLE_CAP`` times that take
only warm workers, and the plan says when to look again
(:attr:`PlanResult.settles_in`). Several ``client.map`` calls, one per
context, arrive over a fraction of a second; planned one at a time, the first
map's context took every idle worker (each backlog alone paid for every cold
load) and each worker then loaded every context in turn.

Sets shrink with hysteresis: a member is surplus when it contributes nothing
(ready after ``T``), or when the set without it still has
``(1 + shrink_margin)`` times fewer pending tasks than the growth threshold
and finishes within ``shrink_margin`` of ``T`` (plus one task). A set must be
over-provisioned for ``shrink_plans`` consecutive plans and ``shrink_delay``
seconds (judged on the largest backlog seen meanwhile) before it releases
half of its surplus, the latest-ready members first; a context that releases does not grow in
the same plan, one that grows starts counting again, and a released worker is
not re-added to that context for ``shrink_plans`` plans, so no pair is added
and removed in consecutive plans.

Complexity
----------
With ``W`` workers, ``C`` contexts in demand, ``H`` (worker, context)
holdings reported, ``Q`` (worker, context) pairs with queued tasks, ``M``
memberships and ``k`` = ``candidates``, one plan costs
``O(W + H + Q + M log M + C log C)`` to set up and shrink, and each greedy step
``O(log C + k (log W + h))`` (``h``: contexts held by one candidate, for the
budget check): candidates are the ``k`` best workers by ready time from one
heap, plus the ``k`` first holders of the context; evaluating one is ``O(1)``
amortized (incremental water-filling). Steps are capped at ``W + C``
additions plus one failed step per context, so there is no
``workers × contexts × iterations`` loop. Only a context's first worker may
cost a scan of all workers (``O(W h)``), when none of the ``k`` best has room.
Which backlogs are still settling is one ``O(C)`` pass. Every plan walks
every worker and member (``O(W + M)``, a few µs per worker in CPython): what
depends on a view alone is derived once per view, and a view changes only when
its worker reports (queues come in :class:`QueuedWork`), so a plan mostly
resets working state it already has instead of allocating it again.
"""

from __future__ import annotations

import heapq
import math
from bisect import insort
from collections.abc import Iterable, Mapping

from ._plan_costs import LoadCosts
from ._plan_model import (
    _ABSENT,
    _EPS,
    _HOLDING,
    _NO_QUEUES,
    _RESIDENT,
    _WARMING,
    Addition,
    ContextDecision,
    ContextView,
    Holding,
    PlannerSettings,
    PlanResult,
    QueuedWork,
    WorkerView,
    _Context,
    _Worker,
)

_SETTLE_CAP = 4  #: a backlog waits for others to settle at most this many ``settle_seconds``

__all__ = [
    "Addition",
    "ContextDecision",
    "ContextView",
    "Holding",
    "PlanResult",
    "Planner",
    "PlannerSettings",
    "QueuedWork",
    "WorkerView",
]


class Planner(LoadCosts):
    """Plans affinity sets for all contexts at once; keeps the hysteresis memory between plans.

    Parameters
    ----------
    settings
        The planning rules (:meth:`PlannerSettings.from_scheduler` builds them from the plugin's settings).

    Examples
    --------
    >>> planner = Planner(PlannerSettings(prewarm_backlog=2))
    >>> workers = [WorkerView("w1", contexts={"llm": Holding(state="resident")}), WorkerView("w2")]
    >>> result = planner.plan(workers, [ContextView("llm", pending=100, task_seconds=1.0, load_seconds=5.0)], now=0.0)
    >>> sorted(result.contexts["llm"].members)
    ['w1', 'w2']
    """

    def __init__(self, settings: PlannerSettings | None = None) -> None:
        self.settings = settings or PlannerSettings()
        self._plans = 0
        self._over: dict[
            str, tuple[int, float, int]
        ] = {}  #: context -> (plan, time) it became over-provisioned, most pending since
        self._released: dict[tuple[str, str], int] = {}  #: (context, worker) -> plan it was released in
        self._workers: dict[str, _Worker] = {}  #: the last plan's working state, reused for unchanged views
        self._tasks_on: Mapping[str, Mapping[str, int]] = {}  #: this plan's :attr:`QueuedWork.tasks`

    def plan(
        self,
        workers: Iterable[WorkerView],
        contexts: Iterable[ContextView],
        now: float,
        quiet_contexts: int | None = None,
        queued: QueuedWork | None = None,
    ) -> PlanResult:
        """Decide every context's affinity set.

        Parameters
        ----------
        workers
            The running workers (members elsewhere are dropped).
        contexts
            Contexts with their current sets; those without pending tasks lose their set.
        now
            Monotonic seconds (for the shrink delay).
        quiet_contexts
            How many other known contexts have no backlog now (None: unknown). With none,
            no other backlog can be about to arrive, so new ones do not wait to settle.
        queued
            The tasks already on each worker (None: nothing is queued anywhere).

        Returns
        -------
        PlanResult
            One decision per context that has pending tasks or had members, and the loads to start.
        """
        s = self.settings
        self._now = now
        queued = queued or _NO_QUEUES
        self._tasks_on, plain = queued.tasks, queued.plain_seconds
        self._plans += 1
        plan_no = self._plans
        if self._released:
            self._released = {k: v for k, v in self._released.items() if plan_no - v < s.shrink_plans}
        ws = {}
        kept = self._workers
        for v in workers:
            w = kept.get(v.address)
            if w is not None and w.view is v:
                w.reset()
            else:
                w = _Worker(v)
            ws[v.address] = w
        self._workers = ws  # workers gone or with a new view are dropped
        decisions: dict[str, ContextDecision] = {}
        demand: dict[str, _Context] = {}
        for view in contexts:
            if view.pending > 0 and ws:
                demand[view.name] = _Context(view)
            else:
                self._over.pop(view.name, None)
                if view.members:  # no demand: forget the reservation
                    decisions[view.name] = ContextDecision(view.name, frozenset(), removed=tuple(sorted(view.members)))
        for name in [n for n in self._over if n not in demand]:
            del self._over[name]
        if not demand:
            return PlanResult(decisions)

        # Members: running ones, without those that just failed (unless it is the only one).
        failing = {a for a, w in ws.items() if w.view.failed}
        for c in demand.values():
            name = c.view.name
            members = c.view.members & ws.keys()
            if failing and len(members) > 1:
                failed = {a for a in members & failing if ws[a].view.contexts.get(name, _ABSENT).failed_recently}
                if failed and len(failed) < len(members):
                    members -= failed
            c.members = members
            if len(members) < len(c.view.members):
                c.removed.extend(sorted(c.view.members - members))
        # Worker timelines start with work outside the sets; pin what each worker serves.
        holders: dict[str, list[str]] = {n: [] for n in demand}
        tasks_on = self._tasks_on
        for addr, w in ws.items():
            v = w.view
            busy = plain.get(addr, 0.0) if plain else 0.0
            for name, h in v.contexts.items():
                c = demand.get(name)
                if c is None:
                    if h.state == _RESIDENT:
                        w.idle_add(w.used((h.host_bytes or 0, h.device_bytes or 0)))
                    continue  # no demand: the worker's LRU may evict it freely
                if addr in c.members:
                    continue  # pinned below
                if h.state in _HOLDING or h.files:
                    holders[name].append(addr)
                    if h.state in _WARMING:
                        w.pin(name, self._size(c, h))  # cannot be evicted mid-load
                    elif h.state == _RESIDENT:
                        w.evictable_add(name, w.used(self._size(c, h)), self._full_load(w, c, h))
            counts = tasks_on.get(addr)
            if counts:
                for name, n in counts.items():
                    c = demand.get(name)
                    if c is None or addr in c.members:
                        continue  # no demand (no task time), or part of the set's own backlog
                    seconds = n * c.task_seconds
                    busy += seconds
                    if name in v.contexts:
                        c.work = max(0.0, c.work - seconds)  # runs there, not on the set
            w.free = busy / w.rate

        # Current sets, heaviest context first on shared workers.
        order = sorted(demand.values(), key=lambda c: (-c.work, c.view.name))
        for c in order:
            if not c.members:
                continue
            name = c.view.name
            entries = []
            size = c.view.size
            for a in c.members:
                w = ws[a]
                h = w.view.contexts.get(name, _ABSENT)
                w.pin(name, size if size is not None else self._size(c, h))
                load = 0.0 if h.state == _RESIDENT else self._load_cost(w, c, h)
                entries.append((w.free + load, -self._queued(c, a), a, w.rate, w.free))
            entries.sort()
            c.rs = entries
            c.solve()
            for r, _, a, _, _ in c.rs[: c.active]:
                w = ws[a]
                w.free, w.last = c.finish, c.view.name

        released = self._shrink(demand, ws, plan_no, now)

        # Workers by ready time; entries carry the version so a worker the shrink just released is current.
        heap = [(w.free, w.view.load_factor, a, w.version) for a, w in ws.items()]
        heapq.heapify(heap)
        for name, addrs in holders.items():
            addrs.sort(key=lambda a: (ws[a].free, a), reverse=True)  # best last
        prewarm: list[tuple[str, str]] = []
        steps = 0

        # Every context in demand gets a worker: the one ready first (warm if possible).
        for c in order:
            if c.members:
                continue
            steps += 1
            best = None
            for w in self._candidates(c, ws, heap, holders[c.view.name]):
                if (
                    best is not None
                    and c.view.name not in w.view.contexts
                    and w.free + self._cold_load(w, c) > best[0][0]
                ):
                    continue  # cold and ready later than the best so far
                ev = self._evaluate(c, w, plan_no)
                if ev is not None and (best is None or (ev[2], ev[3], w.view.address) < best[0]):
                    best = ((ev[2], ev[3], w.view.address), w, ev)
            if best is None:  # none of the best has room: look at all, then share the least crowded
                for w in ws.values():
                    ev = self._evaluate(c, w, plan_no)
                    if ev is not None and (best is None or (ev[2], ev[3], w.view.address) < best[0]):
                        best = ((ev[2], ev[3], w.view.address), w, ev)
            if best is not None:
                _, w, (_, _, ready, _, cold, evicts) = best
                reason = "first worker" + ("" if cold else " (warm)")
            else:
                w = min(ws.values(), key=lambda w: (len(w.pinned), w.free, w.view.address))
                h = self._holding(w, c)
                ready = w.free + self._load_cost(w, c, h)
                cold, evicts = h.state not in _HOLDING, ()
                reason = f"no worker has room: shares {w.view.address} with {sorted(w.pinned)}"
            self._commit(c, w, ready, cold, evicts, reason, heap, prewarm)

        # Grow, the context that finishes last first: first with additions that pay for themselves,
        # then with the idle capacity that is left (see the module docstring).
        held, settles_in = self._held_back(demand) if quiet_contexts != 0 else (set(), None)
        limit = len(ws) + len(demand)
        additions = 0
        for idle in (False, True):
            added, taken = self._grow(
                demand, released, held, ws, heap, holders, prewarm, plan_no, limit - additions, idle
            )
            additions += added
            steps += taken

        for name, c in demand.items():
            decisions[name] = ContextDecision(
                name,
                frozenset(c.members),
                tuple(c.added),
                tuple(c.removed),
                c.finish,
                c.shares(),
            )
        return PlanResult(decisions, tuple(prewarm), steps, settles_in)

    def _queued(self, c: _Context, addr: str) -> float:
        """Median seconds of ``c``'s tasks already on worker ``addr``."""
        counts = self._tasks_on.get(addr)
        return counts.get(c.view.name, 0) * c.task_seconds if counts else 0.0

    def _held_back(self, demand: dict[str, _Context]) -> tuple[set[str], float | None]:
        """Contexts whose sets may not grow cold yet, and the seconds until the first of them may.

        While any backlog is younger than ``settle_seconds``, contexts whose
        own backlog is younger than ``_SETTLE_CAP`` times that wait: a burst
        of ``client.map`` calls, one per context, arrives over a fraction of
        a second, and planning on its first map alone gives that context
        every idle worker (each then loads every context in turn).
        """
        settle = self.settings.settle_seconds
        youngest = min(c.view.demand_seconds for c in demand.values())
        if youngest >= settle:
            return set(), None
        held: set[str] = set()
        settles_in = math.inf
        for name, c in demand.items():
            age = c.view.demand_seconds
            if age < _SETTLE_CAP * settle:
                held.add(name)
                settles_in = min(settles_in, settle - youngest, _SETTLE_CAP * settle - age)
        return held, (settles_in if held else None)

    def _grow(self, demand, released, held, ws, heap, holders, prewarm, plan_no: int, limit: int, idle: bool):
        """Add workers to sets, the context that finishes last first; ``(additions, steps)``.

        ``idle=False``: an addition must pay for itself. ``idle=True``: only workers
        with nothing to do and room to spare are offered, and shortening the
        backlog with ``idle_load_margin`` to spare is enough (their time would be
        lost anyway; nothing is evicted).
        Contexts in ``held`` take only warm workers (see :meth:`_held_back`).
        """
        idle_factor = 1 + self.settings.idle_load_margin
        grow = [(-c.finish, c.view.name) for c in demand.values() if c.view.name not in released]
        heapq.heapify(grow)
        additions = steps = 0
        while grow and additions < limit:
            _, name = heapq.heappop(grow)
            c = demand[name]
            if not self._may_grow(c):
                continue
            steps += 1
            best = None
            finish_now = c.finish
            for w in self._candidates(c, ws, heap, holders[name]):
                if idle and (w.free > _EPS or not w.spare(name, self._size(c, self._holding(w, c)))):
                    continue
                if name not in w.view.contexts:
                    # Cold: it pays only if the backlog outlasts its free time plus twice its load
                    # (the work the set saves is rate * (finish - ready), the work it gives up
                    # rate * overhead), or, idle, once its load; and it must beat the best so far.
                    lower = self._cold_load(w, c)
                    if finish_now <= w.free + (idle_factor if idle else 2) * lower or (
                        best is not None and w.rate <= best[1].rate and w.free + lower >= best[2][2]
                    ):
                        continue
                elif w.free >= finish_now and w.free > _EPS:
                    continue  # busy until after the backlog is done
                ev = self._evaluate(c, w, plan_no)
                if ev is None:
                    continue
                finish, rate_after, ready, overhead, cold, evicts = ev
                if cold and name in held:
                    continue
                gain = c.finish - finish
                if idle:
                    # Its load must end early enough to survive an estimate that is off by the margin
                    # (loads from a busy filesystem vary): a load that ends just before the backlog
                    # does would read the files for a few tasks, or for none.
                    ok = gain > _EPS and not evicts and w.free + idle_factor * overhead < finish_now
                elif overhead == 0 and w.free <= _EPS:
                    ok = gain >= -_EPS  # warm and idle: joins for free, even before durations are known
                else:
                    ok = gain > _EPS and gain * rate_after > overhead * w.rate  # pays for itself
                if ok:
                    key = (-gain, overhead, w.view.address)
                    if best is None or key < best[0]:
                        best = (key, w, ev)
            if best is None:
                continue  # this context is done growing
            _, w, (finish, _, ready, _, cold, evicts) = best
            spare = " (idle capacity)" if idle else ""
            reason = f"backlog finishes in {c.finish:.1f}s, {finish:.1f}s with {w.view.address}{spare}"
            self._commit(c, w, ready, cold, evicts, reason, heap, prewarm)
            self._over.pop(name, None)
            additions += 1
            heapq.heappush(grow, (-c.finish, name))
        return additions, steps

    def _evaluate(self, c: _Context, w: _Worker, plan_no: int):
        """``(finish, rate after, ready, overhead, cold, evicts)`` with ``w`` in ``c``'s set; None if it may not join."""
        name = c.view.name
        if w.free >= c.finish and w.free > _EPS:
            return None  # busy until after the backlog is done: cannot help
        h = w.view.contexts.get(name, _ABSENT)
        if h.failed_recently or w.view.address in c.members:
            return None
        if (
            self._released
            and plan_no - self._released.get((name, w.view.address), -(10**9)) < self.settings.shrink_plans
        ):
            return None
        load = self._load_cost(w, c, h)
        if load > 0:
            fit = w.fit(name, c.view.size)
            if fit is None:
                return None
            evict_cost, evicts = fit
        else:
            evict_cost, evicts = 0.0, ()
        overhead = load + evict_cost
        ready = w.free + overhead
        finish, _, rate_after, _ = c.with_member(ready, w.rate)
        cold = h.state not in _HOLDING or name in w.evicted
        return finish, rate_after, ready, overhead, cold, evicts

    def _candidates(self, c: _Context, ws: dict[str, _Worker], heap: list, holders: list[str]) -> list[_Worker]:
        """The first holders of ``c`` (``holders`` is sorted best last) and the workers free first (k of each)."""
        k = self.settings.candidates
        out: dict[str, _Worker] = {}
        members = c.members
        while holders and holders[-1] in members:
            holders.pop()  # members join best first: drop them from the end, once
        for i in range(len(holders) - 1, -1, -1):
            a = holders[i]
            if a not in members:
                out[a] = ws[a]
                if len(out) >= k:
                    break
        popped = []
        found = 0
        while heap and found < k and len(popped) < 4 * k:
            entry = heap[0]
            w = ws[entry[2]]
            if entry[3] != w.version:
                heapq.heappop(heap)  # stale
                continue
            if entry[0] >= c.finish and entry[0] > _EPS:
                break  # this one and all after it are busy until the backlog is done
            popped.append(heapq.heappop(heap))
            if entry[2] not in c.members and entry[2] not in out:
                out[entry[2]] = w
                found += 1
        for entry in popped:
            heapq.heappush(heap, entry)
        return list(out.values())

    def _may_grow(self, c: _Context) -> bool:
        n = len(c.members)
        return c.view.pending > self.settings.prewarm_backlog * n and c.view.pending > n

    def _commit(self, c, w, ready, cold, evicts, reason, heap, prewarm) -> None:
        name, addr = c.view.name, w.view.address
        finish, a, total, total_ready = c.with_member(ready, w.rate)
        joined = not c.rs or ready < c.finish
        if joined:
            c.active, c.rate, c.rate_ready, c.finish = a + 1, total, total_ready, finish
        insort(c.rs, (ready, -self._queued(c, addr), addr, w.rate, w.free))
        c.members.add(addr)
        if joined:
            w.free, w.last = max(w.free, c.finish), name
            w.version += 1
            heapq.heappush(heap, (w.free, w.view.load_factor, addr, w.version))
        w.pin(name, self._size(c, self._holding(w, c)))
        for e in evicts:
            w.evict(e)
        c.added.append(Addition(addr, cold, reason, evicts))
        if cold and self.settings.prewarm and len(c.members) > 1:
            prewarm.append((addr, name))

    # -- shrinking ----------------------------------------------------------------------------
    def _shrink(self, demand: dict[str, _Context], ws: dict[str, _Worker], plan_no: int, now: float) -> set[str]:
        """Release surplus members of sets over-provisioned long enough; the contexts that released."""
        s = self.settings
        released: set[str] = set()
        for name, c in demand.items():
            n = len(c.rs)
            since = self._over.get(name)
            # The most pending tasks seen while over-provisioned: a dip does not release workers.
            pending = max(c.view.pending, since[2] if since else 0)
            keep = self._surplus(c, pending) if n > 1 else n
            if keep == n:
                self._over.pop(name, None)
                continue
            if since is None:
                self._over[name] = (plan_no, now, pending)
                continue
            self._over[name] = (since[0], since[1], pending)
            if plan_no - since[0] < s.shrink_plans or now - since[1] < s.shrink_delay:
                continue
            del self._over[name]
            keep = n - (n - keep + 1) // 2  # half the surplus at a time: sets shrink gradually
            for _, _, addr, _, free_before in c.rs[keep:]:
                w = ws[addr]
                if w.last == name:
                    w.free, w.last = free_before, None
                    w.version += 1
                used = w.unpin(name)
                h = self._holding(w, c)
                if h.state == _RESIDENT and used is not None:
                    w.evictable_add(name, used, self._full_load(w, c, h))
                c.members.discard(addr)
                c.removed.append(addr)
                self._released[(name, addr)] = plan_no
            del c.rs[keep:]
            c.solve()
            released.add(name)
        return released

    def _surplus(self, c: _Context, pending: int) -> int:
        """How many of ``rs`` to keep: members are dropped from the latest-ready end while surplus."""
        s = self.settings
        rs, work = c.rs, c.work
        a, total, total_ready, finish = c.active, c.rate, c.rate_ready, c.finish
        limit = (1 + s.shrink_margin) * c.finish + c.view.task_seconds + _EPS
        keep = len(rs)
        while keep > 1:
            r, _, _, rate, _ = rs[keep - 1]
            if keep - 1 >= a:
                if r > _EPS:
                    keep -= 1  # contributes nothing: ready after the backlog is done
                    continue
                after = finish
            else:
                after = (work + total_ready - rate * r) / (total - rate) if total > rate else math.inf
            if pending * (1 + s.shrink_margin) > s.prewarm_backlog * (keep - 1) or after > limit:
                break
            if keep - 1 < a:
                a, total, total_ready, finish = keep - 1, total - rate, total_ready - rate * r, after
            keep -= 1
        return keep
