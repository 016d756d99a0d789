"""Exceptions raised by dask_pervasive; all derive from :class:`PervasiveError`."""

from __future__ import annotations

from collections.abc import Iterable


class PervasiveError(Exception):
    """Base class of every error raised by dask_pervasive."""


class UnknownContextError(PervasiveError, KeyError):
    """A context name was used that has not been declared.

    Parameters
    ----------
    name
        The unknown name.
    known
        Names that are declared where the lookup happened.
    where
        Where the lookup happened (worker address or ``"client"``).
    """

    def __init__(self, name: str, known: Iterable[str], where: str = "") -> None:
        self.name = name
        self.known = sorted(known)
        self.where = where
        super().__init__(name)

    def __str__(self) -> str:
        known = ", ".join(repr(k) for k in self.known) or "none"
        at = f" on {self.where}" if self.where else ""
        return (
            f"Unknown context {self.name!r}{at}; known contexts: {known}. "
            "Declare it with dask_pervasive.install(client, [...]) or "
            "dask_pervasive.register(client, context)."
        )

    def __reduce__(self):
        return (type(self), (self.name, self.known, self.where))


class ContextLoadError(PervasiveError):
    """Fetching or loading a context failed on a worker.

    The original exception is chained as ``__cause__`` (and kept in
    ``.cause``, which survives pickling to the client).
    """

    def __init__(
        self,
        context: str,
        worker: str,
        source: str | None,
        cause: BaseException | str | None = None,
    ) -> None:
        self.context = context
        self.worker = worker
        self.source = source
        self.cause = cause
        super().__init__(context, worker, source, cause)

    def __str__(self) -> str:
        src = f" from {self.source}" if self.source else ""
        why = (
            f": {type(self.cause).__name__}: {self.cause}"
            if isinstance(self.cause, BaseException)
            else (f": {self.cause}" if self.cause else "")
        )
        return f"Loading context {self.context!r}{src} failed on worker {self.worker}{why}"

    def __reduce__(self):
        return (type(self), (self.context, self.worker, self.source, self.cause))


class ContextTooLargeError(PervasiveError, MemoryError):
    """A context can never fit in a worker's memory budget."""

    def __init__(self, context: str, nbytes: int, budget: int, kind: str = "host", worker: str = "") -> None:
        self.context = context
        self.nbytes = nbytes
        self.budget = budget
        self.kind = kind
        self.worker = worker
        super().__init__(context, nbytes, budget, kind, worker)

    def __str__(self) -> str:
        from dask.utils import format_bytes

        at = f" on worker {self.worker}" if self.worker else ""
        knob = "max_bytes" if self.kind == "host" else "device_max_bytes"
        return (
            f"Context {self.context!r} needs {format_bytes(self.nbytes)} but the "
            f"{self.kind} budget{at} is {format_bytes(self.budget)}; raise "
            f"{knob} (config pervasive.worker.{knob.replace('_', '-')}) or use "
            "workers with more memory."
        )

    def __reduce__(self):
        return (type(self), (self.context, self.nbytes, self.budget, self.kind, self.worker))


class TransferError(PervasiveError, OSError):
    """Copying context files from a peer or the origin failed."""


class ContextDefinitionError(PervasiveError, ValueError, TypeError):
    """A context declaration is invalid, or conflicts with one already declared.

    Raised on the client (by :class:`~dask_pervasive.Context`,
    :func:`~dask_pervasive.install`, :func:`~dask_pervasive.register` and the
    plugin constructors) before anything reaches a worker. It is both a
    ``ValueError`` and a ``TypeError`` so code written against the built-in
    errors keeps working.
    """

    def __init__(self, message: str, context: str | None = None) -> None:
        self.context = context
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.context))


class ConfigurationError(PervasiveError, ValueError):
    """A setting (``pervasive.*`` config key or plugin argument) has an invalid value."""

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.key))


class ContextUsageError(PervasiveError, TypeError, ValueError):
    """A context was asked for the wrong way.

    ``get_context`` outside a task, with a name that is not a string
    (``dask.annotate(context=123)``), or without a name in a task that has no
    ``context`` annotation; a client helper called with bad arguments (an
    unknown worker address, a negative ``n_workers``). Also a ``TypeError``
    and a ``ValueError``.
    """


class PluginNotInstalledError(PervasiveError):
    """A context was used on a worker where :class:`ContextWorkerPlugin` is not installed."""


class DeviceUnavailableError(PervasiveError, RuntimeError):
    """A context asks for a CUDA device this worker does not have.

    Raised on the worker and chained under :class:`ContextLoadError`.
    """

    def __init__(self, context: str, device: str, visible: int) -> None:
        self.context = context
        self.device = device
        self.visible = visible
        super().__init__(context, device, visible)

    def __str__(self) -> str:
        return (
            f"context {self.context!r} asks for device {self.device!r} but this worker sees "
            f"{self.visible} CUDA device(s); declare it with device='auto' (GPU when there is "
            "one, else CPU) or run it on GPU workers"
        )

    def __reduce__(self):
        return (type(self), (self.context, self.device, self.visible))


class BudgetExhaustedError(PervasiveError, MemoryError):
    """A context fits the budget, but contexts held by running tasks leave no room for it.

    The worker waited ``waited`` seconds (``pervasive.worker.budget-wait``)
    for those tasks to release their contexts. The task fails; the context
    is not marked failed, so the next task that needs it tries again.

    Attributes
    ----------
    context, nbytes, budget, kind, worker
        As for :class:`ContextTooLargeError`.
    in_use
        ``[(name, nbytes, holders)]`` of the contexts that took the room;
        ``holders`` is the number of running tasks, or ``"loading"``.
    waited
        Seconds waited before giving up.
    """

    def __init__(
        self,
        context: str,
        nbytes: int,
        budget: int,
        kind: str = "host",
        worker: str = "",
        in_use: list | None = None,
        waited: float = 0.0,
    ) -> None:
        self.context = context
        self.nbytes = nbytes
        self.budget = budget
        self.kind = kind
        self.worker = worker
        self.in_use = [tuple(x) for x in in_use or ()]
        self.waited = waited
        super().__init__(context, nbytes, budget, kind, worker)

    def __str__(self) -> str:
        from dask.utils import format_bytes

        at = f" on worker {self.worker}" if self.worker else ""
        knob = "max_bytes" if self.kind == "host" else "device_max_bytes"
        users = ", ".join(
            f"{n!r} ({format_bytes(b)}, {h if isinstance(h, str) else f'{h} task(s)'})" for n, b, h in self.in_use
        )
        return (
            f"Context {self.context!r} needs {format_bytes(self.nbytes)} of the {self.kind} budget{at} "
            f"({format_bytes(self.budget)}), but that budget is exhausted by contexts in use: "
            f"{users or 'none'}; waited {self.waited:.1f}s for them to be released "
            "(pervasive.worker.budget-wait). Raise "
            f"{knob} (config pervasive.worker.{knob.replace('_', '-')}), raise budget-wait, or run "
            "fewer different contexts at once per worker (fewer threads, or separate workers)."
        )

    def __reduce__(self):
        return (
            type(self),
            (self.context, self.nbytes, self.budget, self.kind, self.worker, self.in_use, self.waited),
        )
