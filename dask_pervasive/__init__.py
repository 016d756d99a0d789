"""Pervasive context management for Dask: keep models resident, reuse them everywhere."""

from __future__ import annotations

from . import config  # noqa: F401  (loads pervasive.yaml into dask.config)
from .client import ContextStatsTable, evict, install, prewarm, register, scale_down, stats, where
from .context import Context, LoadedModel, TransformersContext
from .errors import (
    BudgetExhaustedError,
    ConfigurationError,
    ContextDefinitionError,
    ContextLoadError,
    ContextTooLargeError,
    ContextUsageError,
    DeviceUnavailableError,
    PervasiveError,
    PluginNotInstalledError,
    TransferError,
    UnknownContextError,
)
from .scheduler import ContextSchedulerPlugin
from .task import get_context, uses_context
from .transfer import PeerFileSystem
from .worker import ContextWorkerPlugin

__version__ = "0.1.0"

__all__ = [
    "BudgetExhaustedError",
    "ConfigurationError",
    "Context",
    "ContextDefinitionError",
    "ContextLoadError",
    "ContextSchedulerPlugin",
    "ContextStatsTable",
    "ContextTooLargeError",
    "ContextUsageError",
    "ContextWorkerPlugin",
    "DeviceUnavailableError",
    "LoadedModel",
    "PeerFileSystem",
    "PervasiveError",
    "PluginNotInstalledError",
    "TransferError",
    "TransformersContext",
    "UnknownContextError",
    "evict",
    "get_context",
    "install",
    "prewarm",
    "register",
    "scale_down",
    "stats",
    "uses_context",
    "where",
]
