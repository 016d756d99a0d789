"""Bounded, retried blocking calls on the origin: :class:`RetryPolicy`, :func:`retrying`, :class:`StallGuard`.

Every blocking call (listing, open, each chunk) must answer within
``stall_timeout``; a failed, stalled, truncated or corrupt read is retried
``retries`` times with exponential backoff (``retry-backoff``, doubling up to
``retry-backoff-max``), then fails with a :class:`~dask_pervasive.TransferError`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigurationError, TransferError
from ._parts import LocalWriteError

if TYPE_CHECKING:
    from .._settings import TransferSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")


class OriginStalled(TransferError, TimeoutError):
    """An origin call (listing, open, read) did not answer within the stall timeout."""


class OriginMismatch(TransferError):
    """Bytes read from the origin do not match its listing or the reference manifest."""


@dataclass(frozen=True)
class RetryPolicy:
    """How origin reads are bounded and retried (``pervasive.transfer.*``).

    Attempt ``k`` (k ≥ 1) of a failed call waits ``min(backoff_max,
    backoff * 2**(k-1))`` seconds, times a random factor in [0.5, 1] so a
    cohort does not retry in lock step; at most ``retries`` retries.

    Raises
    ------
    ConfigurationError
        A negative count or duration, or a stall timeout that is not > 0.
    """

    retries: int = 3
    backoff: float = 1.0
    backoff_max: float = 30.0
    stall_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ConfigurationError(
                f"pervasive.transfer.retries must be an int >= 0, got {self.retries!r}", "pervasive.transfer.retries"
            )
        keys = {"backoff": "retry-backoff", "backoff_max": "retry-backoff-max", "stall_timeout": "stall-timeout"}
        for name, key in keys.items():
            key = f"pervasive.transfer.{key}"
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ConfigurationError(f"{key} must be a duration >= 0, got {value!r}", key)
        if self.stall_timeout <= 0:
            raise ConfigurationError(
                f"pervasive.transfer.stall-timeout must be > 0, got {self.stall_timeout!r}",
                "pervasive.transfer.stall-timeout",
            )

    @classmethod
    def from_settings(cls, settings: TransferSettings) -> RetryPolicy:
        """The policy a :class:`~dask_pervasive._settings.TransferSettings` describes."""
        return cls(settings.retries, settings.retry_backoff, settings.retry_backoff_max, settings.stall_timeout)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...)."""
        return min(self.backoff_max, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


#: Errors that say the request itself is wrong: retrying cannot help.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, TypeError, ValueError)


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` from an origin read may go away when the read is tried again."""
    if isinstance(exc, (OriginStalled, OriginMismatch)):
        return True
    if isinstance(exc, LocalWriteError):  # this worker's disk: reading the origin again cannot help
        return False
    if not isinstance(exc, Exception):
        return False
    if isinstance(exc, _PERMANENT):
        # fsspec's http says FileNotFoundError for any failed info(), a refused connection included
        cause = exc.__cause__
        return cause is not None and cause is not exc and transient(cause)
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError and friends
    # 4xx but timeouts and rate limits: the request is wrong, asking again will not help
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 425, 429))


def describe(exc: BaseException) -> str:
    """``Type: message``, with the direct cause when there is one (fsspec often wraps the real error)."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and cause is not exc:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text


def retrying(call: Callable[[int], T], policy: RetryPolicy, what: str) -> T:
    """``call(attempt)`` until it succeeds, at most ``policy.retries`` times again after a transient error.

    The last error is raised as a :class:`~dask_pervasive.TransferError`
    (chained); errors that retrying cannot fix (missing file, permission,
    bad request) are raised at once, unchanged.
    """
    attempt = 0
    while True:
        try:
            return call(attempt)
        except Exception as exc:
            if not transient(exc):
                raise
            if attempt >= policy.retries:
                raise TransferError(
                    f"{what} failed {attempt + 1} time(s) (pervasive.transfer.retries={policy.retries}); "
                    f"last error: {describe(exc)}"
                ) from exc
            attempt += 1
            wait = policy.delay(attempt)
            logger.warning(
                "pervasive: %s failed (%s); retry %d/%d in %.1fs",
                what,
                describe(exc),
                attempt,
                policy.retries,
                wait,
            )
            time.sleep(wait)


class StallGuard:
    """Run blocking calls on a helper thread; give up on one that takes longer than ``timeout``.

    A call that stalls raises :class:`OriginStalled` in the caller; the
    helper thread (a daemon) is abandoned and ends when the call finally
    returns. Calls submitted with :meth:`later` (a ``close``) run after it.
    Works for any fsspec file system, whatever its own timeouts.
    """

    def __init__(self, timeout: float, what: str) -> None:
        self.timeout = timeout
        self.what = what
        self.stalled = False
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="pervasive-origin-read", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)

    def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        if self.stalled:
            raise OriginStalled(f"{self.what}: an earlier call is still stalled")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            if future.done():
                raise  # the call itself timed out
            self.stalled = True
            raise OriginStalled(f"{self.what}: no answer for {self.timeout:g}s (pervasive.transfer.stall-timeout)")

    def later(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` when the helper is free, without waiting (errors ignored)."""
        self._jobs.put((concurrent.futures.Future(), fn, args))

    def close(self) -> None:
        self._jobs.put(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
