"""Which workers to give back when the cluster scales down, knowing where contexts are warm.

Dask chooses workers to close in ``Scheduler.workers_to_close`` (called by
``retire_workers(n=...)``, ``retire_workers()`` and ``Adaptive``). It asks every
scheduler plugin's documented ``valid_workers_downscaling(scheduler, workers)``
which candidates may go, then closes idle workers before busy ones and, among
those, the ones holding the fewest result bytes; remaining ties go by the order
of the candidate list (a stable sort, last closed first).

:func:`retirement_candidates` is what :class:`~dask_pervasive.ContextSchedulerPlugin`
returns there:

- it removes one *keeper* per context in demand (pending tasks, or used within
  ``pervasive.scheduler.keep-warm``) that would otherwise have no holder left:
  the last warm worker of that context is never given back;
- it orders the rest so that, among workers Dask ranks equal, those holding no
  context go first, then those holding only contexts without demand, then
  those whose contexts in demand are also warm elsewhere.

Dask's own criteria (busy workers last, least data first, ``minimum``, long
running tasks, other plugins' filters) still apply on top.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._protocol import HOLDING_STATES, LEAVING_STATUSES, State

if TYPE_CHECKING:
    from distributed.scheduler import WorkerState


def is_leaving(ws: WorkerState | None) -> bool:
    """Whether the scheduler sees the worker on its way out (retiring, closing)."""
    return ws is not None and ws.status.name in LEAVING_STATUSES


def holders_by_context(warm: Mapping[str, Mapping[str, Any]], staying: Collection[str]) -> dict[str, set[str]]:
    """``{context: workers among staying that hold it (resident, fetching or loading)}``."""
    out: dict[str, set[str]] = {}
    for name, states in warm.items():
        found = {addr for addr, wc in states.items() if addr in staying and wc.state in HOLDING_STATES}
        if found:
            out[name] = found
    return out


def retirement_candidates(
    candidates: list[WorkerState],
    staying: Collection[str],
    warm: Mapping[str, Mapping[str, Any]],
    demand: Iterable[str],
    members: Mapping[str, Collection[str]] | None = None,
) -> list[WorkerState]:
    """Filter and order Dask's candidates for closing (see the module docstring).

    Parameters
    ----------
    candidates
        The workers Dask may close (``valid_workers_downscaling``'s input).
    staying
        Addresses of every worker that is not leaving (candidates included).
    warm
        ``{context: {worker: record with .state and .files}}``, the warm map.
    demand
        Contexts whose last warm worker must stay.
    members
        ``{context: affinity set}``: among holders, a member is the preferred keeper.

    Returns
    -------
    list
        ``candidates`` minus the keepers, most valuable first (Dask closes from
        the end of the list among workers it ranks equal).
    """
    members = members or {}
    demand = set(demand)
    holders = holders_by_context(warm, staying)
    if not holders:
        return list(candidates)  # nothing warm anywhere: Dask's choice, untouched
    by_addr = {ws.address: ws for ws in candidates}

    def resident(addr: str, name: str) -> bool:
        wc = warm[name].get(addr)
        return wc is not None and wc.state is State.RESIDENT

    # Keepers: for each context in demand whose holders are all candidates, keep one.
    # Contexts with fewest holders first, so a worker holding several counts for all.
    keep: set[str] = set()
    for name in sorted(demand & holders.keys(), key=lambda n: (len(holders[n]), n)):
        held = holders[name]
        if held - by_addr.keys() or held & keep:
            continue  # a non-candidate or an already kept worker holds it
        keep.add(
            min(
                held,
                key=lambda a: (
                    not resident(a, name),
                    a not in members.get(name, ()),
                    -sum(1 for n in demand if a in holders.get(n, ())),
                    -by_addr[a].nthreads,
                    a,
                ),
            )
        )

    def value(ws: WorkerState) -> tuple[int, int, int]:
        addr = ws.address
        held = [n for n, h in holders.items() if addr in h]
        wanted = sum(1 for n in held if n in demand)
        files = sum(1 for states in warm.values() if (wc := states.get(addr)) is not None and wc.files)
        return (wanted, len(held), files)

    rest = [ws for ws in candidates if ws.address not in keep]
    # Most valuable first; address breaks ties so the choice does not vary from run to run.
    rest.sort(key=lambda ws: ws.address)
    rest.sort(key=value, reverse=True)
    return rest
