"""Task-side API: :func:`get_context` and the :func:`uses_context` decorator."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from distributed import get_worker

from ._protocol import CONTEXT_ATTR
from .context import context_of
from .errors import ContextUsageError, PluginNotInstalledError
from .worker import plugin_on

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["CONTEXT_ATTR", "context_of", "get_context", "uses_context"]


def get_context(name: str | None = None) -> Any:
    """Return the resident object of context ``name`` on this worker.

    Loads it on a miss (exactly once per worker, however many threads ask)
    and pins it until the calling task finishes, so it is not evicted while
    in use.

    Parameters
    ----------
    name
        Context name. ``None`` uses the running task's ``context``
        annotation (``with dask.annotate(context="llm"): ...``).

    Raises
    ------
    UnknownContextError
        ``name`` was never declared.
    ContextLoadError
        Fetching or loading failed on this worker (cause chained).
    ContextTooLargeError
        The context can never fit in this worker's budget.
    ContextUsageError
        Called outside a worker task, with a name that is not a string, or
        without a name in a task that has no ``context`` annotation.
    PluginNotInstalledError
        The worker plugin is not installed on this worker.
    BudgetExhaustedError
        Contexts held by other running tasks left no room for this one
        within ``pervasive.worker.budget-wait``.

    Examples
    --------
    >>> def verify(batch):  # doctest: +SKIP
    ...     model = get_context("llm")
    ...     return model(batch)
    """
    try:
        worker = get_worker()
    except ValueError:
        raise ContextUsageError(
            "dask_pervasive.get_context() only works inside a task running on a Dask "
            "worker. (dask.array.map_blocks without meta= and xarray.map_blocks without "
            "template= call the function once on the client to infer its output: pass "
            "meta= / template=.)"
        ) from None
    plugin = plugin_on(worker)
    if plugin is None:
        what = f"context {name!r}" if name is not None else "the task's context"
        raise PluginNotInstalledError(
            f"ContextWorkerPlugin is not installed on worker {worker.address}, so {what} cannot "
            "be loaded there (ContextSchedulerPlugin alone only places tasks): call "
            "dask_pervasive.install(client, contexts) or "
            "client.register_plugin(dask_pervasive.ContextWorkerPlugin(contexts))"
        )
    key = worker.active_threads.get(threading.get_ident())
    if name is None:
        ts = worker.state.tasks.get(key) if key is not None else None
        name = (ts.annotations or {}).get("context") if ts is not None else None
        if name is None:
            raise ContextUsageError(
                "get_context() without a name needs the task to be annotated: "
                "wrap submission in dask.annotate(context='<name>') or pass the name"
            )
    if not isinstance(name, str):
        raise ContextUsageError(
            f"context name must be a string, got {type(name).__name__}: {name!r} "
            "(from get_context(name) or the task's dask.annotate(context=...)); "
            "use the name given to dask_pervasive.Context"
        )
    assert plugin.cache is not None
    return plugin.cache.acquire(name, key)


def uses_context(name: str) -> Callable[[F], F]:
    """Decorate a task function that needs context ``name``.

    The resident object is passed as the first positional argument, and the
    scheduler plugin recognizes the function, so placement favours warm
    workers without any annotation.

    Examples
    --------
    >>> @uses_context("llm")  # doctest: +SKIP
    ... def verify(model, batch):
    ...     return model(batch)
    >>> futures = client.map(verify, batches)  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name:
        raise ContextUsageError(f"uses_context() takes a context name, got {name!r}")

    def decorator(func: F) -> F:
        if not callable(func):
            raise ContextUsageError(f"uses_context({name!r}) decorates a function, got {func!r}")

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return func(get_context(name), *args, **kwargs)

        setattr(wrapper, CONTEXT_ATTR, name)
        return wrapper  # type: ignore[return-value]

    return decorator
