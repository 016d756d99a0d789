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
