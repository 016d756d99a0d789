"""Validated settings, read once where a plugin is built and passed whole.

Every ``pervasive.*`` value is read by :func:`dask_pervasive.config.get` in one
of the ``from_config`` constructors below, validated, and frozen into a small
dataclass. The worker plugin and the scheduler plugin are built on the client
(``dp.install``, ``client.register_plugin``), so a client's
``dask.config.set`` travels with them, as in dask-jobqueue; a plugin built on
a server (``--preload``) reads that server's config the same way. A bad value
raises :class:`~dask_pervasive.ConfigurationError` naming the key, where the
settings are built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dask.utils import parse_bytes, parse_timedelta

from . import config
from .errors import ConfigurationError

_UNLIMITED = ("", "none", "null", "unlimited")


def resolve_budget(value: Any, total: int | None) -> int | None:
    """Turn a budget setting into bytes.

    ``None``/``"none"``/``"unlimited"`` → no limit; a float in (0, 1] → that
    fraction of ``total`` (no limit when ``total`` is unknown); ``"8GiB"``, a
    positive int or a whole float (``8e9``) → bytes. A numeric string is read
    as the number.

    Raises
    ------
    ConfigurationError
        Anything else: negative or zero sizes, fractions above 1 that are not
        whole byte counts (``1.5``), ``nan``/``inf``, booleans, other types.
    """
    try:
        return _resolve_budget(value, total)
    except ConfigurationError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigurationError(f"invalid memory budget {value!r}: {exc}") from exc


def _resolve_budget(value: Any, total: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _UNLIMITED:
            return None
        try:
            value = float(text)  # "0.5", "8e9": a number given as text (environment variables)
        except ValueError:
            nbytes = parse_bytes(text)
            if nbytes <= 0:
                raise ConfigurationError(f"invalid memory budget {value!r}: must be positive") from None
            return int(nbytes)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"invalid memory budget {value!r}: expected bytes, a fraction or None")
    if isinstance(value, float):
        if not math.isfinite(value) or value <= 0:
            raise ConfigurationError(f"invalid memory budget {value!r}: must be a positive finite number")
        if value <= 1:
            return int(value * total) if total else None
        if not value.is_integer():
            raise ConfigurationError(
                f"invalid memory budget {value!r}: a fraction must be in (0, 1]; give bytes as a whole number"
            )
        return int(value)
    if value <= 0:
        raise ConfigurationError(f"invalid memory budget {value!r}: must be positive")
    return int(value)


def budget_setting(value: Any, key: str) -> Any:
    """``value`` unchanged if it is a valid budget (fractions resolve later, per worker)."""
    try:
        resolve_budget(value, 1)
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"{key} must be bytes ('8GiB' or a positive int), a fraction in (0, 1] or None/'unlimited', got {value!r}",
            key,
        ) from exc
    return value


def seconds_setting(value: Any, key: str, *, positive: bool = False) -> float:
    """A duration setting (``"30s"``, ``2``) in seconds: ≥ 0, or > 0 with ``positive``."""
    try:
        if isinstance(value, bool):
            raise TypeError("a bool is not a duration")
        seconds = parse_timedelta(value)
        if seconds is None or not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
            raise ValueError("must be a positive duration" if positive else "must be a non-negative duration")
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise ConfigurationError(
            f"{key} must be a duration such as '30s' or a number of seconds, got {value!r} ({exc})", key
        ) from exc
    return float(seconds)


def count_setting(value: Any, key: str, *, minimum: int = 0) -> int:
    """An integer setting ≥ ``minimum`` (a whole number given as text is accepted)."""
    try:
        if isinstance(value, bool):
            raise TypeError("a bool is not a count")
        if isinstance(value, str):
            value = float(value.strip())
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError("must be a whole number")
            value = int(value)
        if not isinstance(value, int):
            raise TypeError(f"expected an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"must be >= {minimum}")
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigurationError(f"{key} must be an integer >= {minimum}, got {value!r} ({exc})", key) from exc
    return value


def bytes_setting(value: Any, key: str) -> int:
    """A positive size setting (``"4MiB"``, ``4194304``) in bytes."""
    try:
        if isinstance(value, bool):
            raise TypeError("a bool is not a size")
        nbytes = parse_bytes(value) if isinstance(value, str) else value
        if not isinstance(nbytes, (int, float)) or not math.isfinite(nbytes) or nbytes < 1:
            raise ValueError("must be a positive number of bytes")
        if isinstance(nbytes, float) and not nbytes.is_integer():
            raise ValueError("must be a whole number of bytes")
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigurationError(
            f"{key} must be a size such as '4MiB' or a positive int, got {value!r} ({exc})", key
        ) from exc
    return int(nbytes)


def bool_setting(value: Any, key: str) -> bool:
    """A boolean setting; ``"true"``/``"false"`` (environment variables) are accepted."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ConfigurationError(f"{key} must be true or false, got {value!r}", key)


@dataclass(frozen=True)
class TransferSettings:
    """``pervasive.transfer.*``: how context files are copied (see ``pervasive.yaml``)."""

    peers: bool = True
    chunk_size: int = 4 * 2**20
    origin_max_concurrent: int = 2
    peer_max_uploads: int = 2
    stall_timeout: float = 30.0
    retries: int = 3
    retry_backoff: float = 1.0
    retry_backoff_max: float = 30.0
    verify: bool = True

    @classmethod
    def from_config(cls) -> TransferSettings:
        """Read and validate ``pervasive.transfer``.

        Raises
        ------
        ConfigurationError
            A value is invalid; the message names the key.
        """
        cfg = config.get("transfer")
        key = "pervasive.transfer."
        return cls(
            peers=bool_setting(cfg["peers"], key + "peers"),
            chunk_size=bytes_setting(cfg["chunk-size"], key + "chunk-size"),
            origin_max_concurrent=count_setting(cfg["origin-max-concurrent"], key + "origin-max-concurrent", minimum=1),
            peer_max_uploads=count_setting(cfg["peer-max-uploads"], key + "peer-max-uploads", minimum=1),
            stall_timeout=seconds_setting(cfg["stall-timeout"], key + "stall-timeout", positive=True),
            retries=count_setting(cfg["retries"], key + "retries"),
            retry_backoff=seconds_setting(cfg["retry-backoff"], key + "retry-backoff"),
            retry_backoff_max=seconds_setting(cfg["retry-backoff-max"], key + "retry-backoff-max"),
            verify=bool_setting(cfg["verify"], key + "verify"),
        )


@dataclass(frozen=True)
class WorkerSettings:
    """``pervasive.worker.*`` plus the transfer settings a worker copies files with.

    Budgets stay as given (bytes or a fraction): fractions are resolved on each
    worker against its own memory limit / device memory.
    """

    max_bytes: Any = 0.5
    device_max_bytes: Any = 0.9
    cache_dir: str | None = None
    retry_failed_after: float = 30.0
    budget_wait: float = 60.0
    transfer: TransferSettings = field(default_factory=TransferSettings)

    @classmethod
    def from_config(
        cls, *, max_bytes: Any = None, device_max_bytes: Any = None, cache_dir: str | None = None
    ) -> WorkerSettings:
        """Read and validate ``pervasive.worker`` and ``pervasive.transfer``; arguments win over config.

        Raises
        ------
        ConfigurationError
            A value is invalid; the message names the key or argument.
        """
        cfg = config.get("worker")
        cache_dir = cfg["cache-dir"] if cache_dir is None else cache_dir
        if cache_dir is not None and not isinstance(cache_dir, str):
            raise ConfigurationError(f"cache_dir must be a path (str) or None, got {cache_dir!r}", "cache_dir")
        return cls(
            max_bytes=budget_setting(cfg["max-bytes"] if max_bytes is None else max_bytes, "max_bytes"),
            device_max_bytes=budget_setting(
                cfg["device-max-bytes"] if device_max_bytes is None else device_max_bytes, "device_max_bytes"
            ),
            cache_dir=cache_dir,
            retry_failed_after=seconds_setting(cfg["retry-failed-after"], "pervasive.worker.retry-failed-after"),
            budget_wait=seconds_setting(cfg["budget-wait"], "pervasive.worker.budget-wait"),
            transfer=TransferSettings.from_config(),
        )


@dataclass(frozen=True)
class SchedulerSettings:
    """``pervasive.scheduler.*`` plus what the scheduler needs of the other sections."""

    prewarm: bool = True
    prewarm_backlog: int = 8
    default_load_seconds: float = 5.0
    interval: float = 0.5
    keep_warm: float = 300.0
    retry_failed_after: float = 30.0
    transfer: TransferSettings = field(default_factory=TransferSettings)

    @classmethod
    def from_config(
        cls,
        *,
        prewarm: bool | None = None,
        prewarm_backlog: int | None = None,
        default_load_seconds: float | None = None,
        interval: str | float | None = None,
    ) -> SchedulerSettings:
        """Read and validate ``pervasive.scheduler`` (and the keys it shares); arguments win over config.

        Raises
        ------
        ConfigurationError
            A value is invalid; the message names the key or argument.
        """
        cfg = config.get("scheduler")
        key = "pervasive.scheduler."
        return cls(
            prewarm=bool_setting(cfg["prewarm"] if prewarm is None else prewarm, key + "prewarm"),
            prewarm_backlog=count_setting(
                cfg["prewarm-backlog"] if prewarm_backlog is None else prewarm_backlog, key + "prewarm-backlog"
            ),
            default_load_seconds=seconds_setting(
                cfg["default-load-seconds"] if default_load_seconds is None else default_load_seconds,
                key + "default-load-seconds",
            ),
            interval=seconds_setting(
                cfg["interval"] if interval is None else interval, key + "interval", positive=True
            ),
            keep_warm=seconds_setting(cfg["keep-warm"], key + "keep-warm"),
            retry_failed_after=seconds_setting(
                config.get("worker.retry-failed-after"), "pervasive.worker.retry-failed-after"
            ),
            transfer=TransferSettings.from_config(),
        )
