"""What a worker must pay before it can run a context's tasks: the planner's load costs.

Pure, like :mod:`dask_pervasive._planner` (whose :class:`~dask_pervasive._planner.Planner`
inherits them): from the context's measured figures (:class:`ContextView`), the
worker's own (:class:`WorkerView`, :class:`Holding`) and the planner's settings.
A cold load is priced by where its files come from: a copy from a peer while
one holds a complete copy and the worker may copy from peers, else a read of
the origin; cached files pay only the setup; each scaled by the worker's load
factor.
"""

from __future__ import annotations

from ._plan_model import _ABSENT, _RESIDENT, _WARMING, Holding, PlannerSettings, _Context, _Worker


class LoadCosts:
    """Load prices for :class:`~dask_pervasive._planner.Planner` (needs ``self.settings``)."""

    settings: PlannerSettings
    _now: float = 0.0  #: the current plan's ``now`` (how long running loads have been going)

    @staticmethod
    def _holding(w: _Worker, c: _Context) -> Holding:
        return w.view.contexts.get(c.view.name, _ABSENT)

    def _cold_load(self, w: _Worker, c: _Context) -> float:
        """Seconds a load of ``c`` takes on ``w`` by the context's figures: from a peer when it can copy
        from one, else from the origin (``default_load_seconds`` before any load), times its load factor."""
        v = c.view
        if v.peer_load_seconds is not None and w.view.peers:
            return v.peer_load_seconds * w.view.load_factor
        base = v.load_seconds if v.load_seconds is not None else self.settings.default_load_seconds
        return base * w.view.load_factor

    def _full_load(self, w: _Worker, c: _Context, h: Holding) -> float:
        if h.load_seconds is None:
            return self._cold_load(w, c)
        if c.view.peer_load_seconds is not None and w.view.peers:
            return min(h.load_seconds, self._cold_load(w, c))  # its own loads may have read the origin
        return h.load_seconds

    def _load_cost(self, w: _Worker, c: _Context, h: Holding) -> float:
        """Seconds ``w`` still needs before it can run tasks of ``c``."""
        full = self._full_load(w, c, h)
        if c.view.name in w.evicted:
            return full
        if h.state == _RESIDENT:
            return 0.0
        if h.state in _WARMING:
            loading_for = self._now - h.loading_since if h.loading_since is not None else 0.0
            return max(0.0, full - max(loading_for, 0.0))
        if h.files:
            if c.view.setup_seconds is not None:
                return min(full, c.view.setup_seconds * w.view.load_factor)
            return max(0.0, full - (c.view.fetch_seconds or 0.0) * w.view.load_factor)
        return full

    @staticmethod
    def _size(c: _Context, h: Holding) -> tuple[int, int] | None:
        if c.view.size is not None:
            return c.view.size
        if h.host_bytes is not None or h.device_bytes is not None:
            return (h.host_bytes or 0, h.device_bytes or 0)
        return None
