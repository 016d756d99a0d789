"""Memory-budget accounting of the per-worker context cache (a mixin of :class:`~dask_pervasive.cache.ContextCache`).

A context is accounted once room for it is made under the host budget and its
device's budget: idle resident contexts are evicted least recently used
first; when contexts in use hold the room, the loading thread waits up to
``budget_wait`` seconds for them to be released, then fails with
:class:`~dask_pervasive.BudgetExhaustedError`. Every ``*_locked`` method runs
with the cache's lock held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._protocol import HOLDING_STATES, State
from .errors import BudgetExhaustedError, ContextTooLargeError

if TYPE_CHECKING:
    from .cache import ContextEntry

logger = logging.getLogger("dask_pervasive.cache")


class BudgetAccounting:
    """Budget checks, room-making and LRU eviction over ``self.entries``.

    The cache provides ``entries``, ``max_bytes``, ``_device_max_bytes``,
    ``budget_wait``, ``address``, ``_holders``, the lock and condition, and
    ``_evict_locked``/``_teardown``.
    """

    entries: dict[str, ContextEntry]
    max_bytes: int | None
    _device_max_bytes: int | None | Callable[[str], int | None]
    budget_wait: float
    address: str
    _holders: dict[Any, list[str]]
    _lock: threading.RLock
    _cond: threading.Condition

    # -- budgets ------------------------------------------------------------
    def device_budget(self, device: str) -> int | None:
        b = self._device_max_bytes
        return b(device) if callable(b) else b

    def _held(self) -> list[ContextEntry]:
        # Loading/fetching entries hold their declared size: room was made for it.
        return [e for e in self.entries.values() if e.state in HOLDING_STATES]

    def _overages_locked(self) -> set[str]:
        """Budgets currently exceeded: ``"host"`` and/or device names."""
        held = self._held()
        over = set()
        if self.max_bytes is not None and sum(e.host_bytes for e in held) > self.max_bytes:
            over.add("host")
        by_device: dict[str, int] = {}
        for e in held:
            if e.device_bytes:
                by_device[e.device] = by_device.get(e.device, 0) + e.device_bytes
        for device, used in by_device.items():
            budget = self.device_budget(device)
            if budget is not None and used > budget:
                over.add(device)
        return over

    def _check_fits(self, entry: ContextEntry, host: int, dev: int) -> None:
        if self.max_bytes is not None and host > self.max_bytes:
            raise ContextTooLargeError(entry.name, host, self.max_bytes, "host", self.address)
        if dev and entry.device:
            budget = self.device_budget(entry.device)
            if budget is not None and dev > budget:
                raise ContextTooLargeError(entry.name, dev, budget, "device", self.address)

    def _shortfall_locked(self, entry: ContextEntry, host: int, dev: int) -> set[str]:
        """Budgets (``"host"`` / a device) that adding ``host``/``dev`` bytes for ``entry`` would exceed."""
        held = [e for e in self._held() if e is not entry]
        over = set()
        if host and self.max_bytes is not None and sum(e.host_bytes for e in held) + host > self.max_bytes:
            over.add("host")
        if dev and entry.device:
            budget = self.device_budget(entry.device)
            used = sum(e.device_bytes for e in held if e.device == entry.device)
            if budget is not None and used + dev > budget:
                over.add(entry.device)
        return over

    def _reserve(self, entry: ContextEntry, host: int, dev: int, key: Any) -> None:
        """Account ``host``/``dev`` bytes for ``entry`` once they fit under the budgets.

        Evicts idle contexts (LRU first). When contexts in use take the room,
        waits up to ``budget_wait`` seconds for their tasks to release them,
        then raises :class:`BudgetExhaustedError`. Raises at once when the
        room is taken by contexts the requesting task ``key`` holds itself
        (it cannot release them while it waits).
        """
        deadline = time.monotonic() + self.budget_wait
        while True:
            with self._lock:
                entry.host_bytes = entry.device_bytes = 0  # not counted while waiting for room
                victims, over = self._evict_lru_locked(lambda: self._shortfall_locked(entry, host, dev))
                if not over:
                    entry.host_bytes, entry.device_bytes = host, dev
                    return_now = True
                else:
                    return_now = False
                    if not victims:
                        remaining = deadline - time.monotonic()
                        own = self._blocked_by_own_locked(entry, host, dev, key, over)
                        if remaining <= 0 or own:
                            raise self._exhausted_locked(entry, host, dev, over, self.budget_wait - max(0, remaining))
                        logger.info(
                            "pervasive: context %r on %s waits for room (%s budget taken by contexts in use)",
                            entry.name,
                            self.address,
                            " and ".join(sorted(over)),
                        )
                        self._cond.wait(min(remaining, 1.0))
            # Victims are torn down outside the lock, before waiting or loading.
            self._teardown(victims)
            if return_now:
                return

    def _blocked_by_own_locked(self, entry: ContextEntry, host: int, dev: int, key: Any, over: set[str]) -> bool:
        """Whether the contexts task ``key`` holds leave no room, so waiting cannot help."""
        if key is None or not self._holders.get(key):
            return False
        own = {n: self.entries[n] for n in self._holders[key] if n in self.entries and n != entry.name}
        if (
            "host" in over
            and self.max_bytes is not None
            and sum(e.host_bytes for e in own.values()) + host > self.max_bytes
        ):
            return True
        for device in over - {"host"}:
            budget = self.device_budget(device)
            if budget is not None and sum(e.device_bytes for e in own.values() if e.device == device) + dev > budget:
                return True
        return False

    def _exhausted_locked(
        self, entry: ContextEntry, host: int, dev: int, over: set[str], waited: float
    ) -> BudgetExhaustedError:
        kind = "host" if "host" in over else "device"
        device = None if kind == "host" else next(iter(sorted(over - {"host"})))
        in_use = [
            (e.name, e.host_bytes if kind == "host" else e.device_bytes, e.users or e.state.value)
            for e in self._held()
            if e is not entry and (e.host_bytes if kind == "host" else (e.device == device and e.device_bytes))
        ]
        budget = self.max_bytes if kind == "host" else self.device_budget(device)
        return BudgetExhaustedError(
            entry.name, host if kind == "host" else dev, budget or 0, kind, self.address, in_use, waited
        )

    def _evict_lru_locked(self, overage: Callable[[], set[str]]) -> tuple[list[ContextEntry], set[str]]:
        """Evict least-recently-used idle contexts while ``overage()`` names a budget.

        Only resident contexts no task holds, and only ones that count
        towards an exceeded budget, are evicted. Returns the victims (to tear
        down outside the lock) and the budgets still exceeded.
        """
        victims = []
        while over := overage():
            idle = [
                e
                for e in self.entries.values()
                if e.state is State.RESIDENT
                and e.users == 0
                and (("host" in over and e.host_bytes) or (e.device in over and e.device_bytes))
            ]
            if not idle:
                break
            victim = min(idle, key=lambda e: e.last_used)
            self._evict_locked(victim)
            victims.append(victim)
        return victims, over

    def _make_room_locked(self) -> list[ContextEntry]:
        """Evict least-recently-used idle contexts while a budget is exceeded."""
        victims, over = self._evict_lru_locked(self._overages_locked)
        if over:
            logger.warning(
                "Contexts in use on worker %s exceed the %s budget; idle contexts will be evicted as tasks finish",
                self.address,
                " and ".join(sorted(over)),
            )
        return victims
