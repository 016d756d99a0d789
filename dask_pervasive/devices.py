"""Device resolution and memory measurement, without importing torch eagerly.

``import torch`` costs about a second per process, so these helpers only
touch torch when it is installed and a CUDA device is actually involved, or
when the object being measured is already a torch object.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import re
import sys
import types
from typing import Any

from dask.sizeof import sizeof

logger = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def validate_device(device: str) -> str:
    """Return ``device`` if it is a valid device spec, else raise ``ValueError``."""
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def cuda_available() -> bool:
    """Whether torch is installed and sees at least one CUDA device."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def cuda_device_count() -> int:
    """Number of CUDA devices this process sees (0 without torch or CUDA)."""
    if not cuda_available():
        return 0
    import torch

    return int(torch.cuda.device_count())


def _device_index(device: str) -> int:
    return int(device.partition(":")[2] or 0)


def check_device_available(device: str, context: str = "") -> None:
    """Raise :class:`~dask_pervasive.errors.DeviceUnavailableError` for a CUDA device this worker lacks.

    ``device`` is a resolved device (``"cpu"`` or ``"cuda:N"``); only CUDA
    devices are checked (which imports torch, as loading onto them will).
    """
    if not device.startswith("cuda"):
        return
    visible = cuda_device_count()
    if _device_index(device) >= visible:
        from .errors import DeviceUnavailableError

        raise DeviceUnavailableError(context, device, visible)


def is_device_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's out-of-memory error for an accelerator."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)


def resolve_device(device: str) -> str:
    """Turn a device spec into the concrete device this worker should use.

    ``"auto"`` is this worker's first visible GPU (dask-cuda's
    ``LocalCUDACluster`` gives every worker its own ``CUDA_VISIBLE_DEVICES``
    with that worker's GPU first, so ``cuda:0`` is the right one) or
    ``"cpu"`` without CUDA. ``"cuda"`` means ``"cuda:0"``.
    """
    validate_device(device)
    if device == "auto":
        return "cuda:0" if cuda_available() else "cpu"
    if device == "cuda":
        return "cuda:0"
    return device


def device_total_memory(device: str) -> int | None:
    """Total memory in bytes of a CUDA device; ``None`` for the CPU or a device this worker lacks."""
    if not device.startswith("cuda") or _device_index(device) >= cuda_device_count():
        return None
    import torch

    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)


#: Objects visited by :func:`measure_nbytes` before the rest is estimated shallowly
#: with ``dask.sizeof`` (bounds the cost of measuring, e.g., a list of a million floats).
MEASURE_MAX_OBJECTS = 200_000

_SCALARS = (int, float, complex, bool, str, bytes, bytearray, type(None))
_OPAQUE = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.CodeType)


def measure_nbytes(obj: Any) -> tuple[int, int]:
    """Measure ``(host_bytes, device_bytes)`` held by a loaded context, deeply.

    Walks the object graph reachable from ``obj``: containers (dicts, lists,
    tuples, sets), objects' attributes (``__dict__`` and ``__slots__``),
    torch modules (their parameters and buffers) and tensors (by storage and
    device), numpy arrays (by the buffer they own, so views are not counted
    twice); every object is counted once. Objects for which
    :func:`dask.sizeof.sizeof` has a specific handler (pandas, pyarrow, ...)
    are measured with it, objects defining their own ``__sizeof__`` by it;
    modules, classes and functions are not walked into.
    After :data:`MEASURE_MAX_OBJECTS` objects the rest is estimated from a
    sample with :func:`dask.sizeof.sizeof`, as are large containers of plain
    values.
    """
    np = sys.modules.get("numpy")
    torch = sys.modules.get("torch")
    default_sizeof = sizeof.dispatch(object)
    seen: set[int] = set()
    storages: set[tuple[str, int]] = set()
    host = dev = 0
    stack = [obj]
    visited = 0
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        visited += 1
        if visited > MEASURE_MAX_OBJECTS:
            # Estimate what is left from a sample, as dask.sizeof does for large collections.
            rest = [o, *stack]
            sample = rest[:: max(1, len(rest) // 100)]
            host += int(sum(sizeof(x) for x in sample) * len(rest) / len(sample))
            break
        if isinstance(o, _SCALARS):
            host += sys.getsizeof(o)
        elif isinstance(o, _OPAQUE):
            continue
        elif torch is not None and isinstance(o, torch.Tensor):
            h, d = _tensor_bytes(o, storages)
            host, dev = host + h, dev + d
        elif torch is not None and isinstance(o, torch.nn.Module):
            stack.extend(o.parameters())
            stack.extend(o.buffers())
            # Plus tensors/arrays/objects kept as plain attributes (not registered as buffers);
            # the module's own bookkeeping (hooks, flags, sizes) is not counted.
            stack.extend(v for k, v in vars(o).items() if not k.startswith("_") and not isinstance(v, _SCALARS))
        elif np is not None and isinstance(o, np.ndarray):
            root = o
            while isinstance(root.base, np.ndarray):
                root = root.base
            if id(root) not in seen or root is o:
                seen.add(id(root))
                host += root.nbytes if root.base is None else o.nbytes
        elif isinstance(o, (dict, list, tuple, set, frozenset)):
            items = list(o.values()) if isinstance(o, dict) else o
            if len(o) > 1024 and all(isinstance(x, _SCALARS) for x in itertools.islice(items, 64)):
                host += int(sizeof(o))  # a large container of plain values: dask samples it
                continue
            host += sys.getsizeof(o)
            if isinstance(o, dict):
                stack.extend(o.keys())
            stack.extend(items)
        elif sizeof.dispatch(type(o)) is not default_sizeof:
            host += int(sizeof(o))
        elif type(o).__sizeof__ is not object.__sizeof__:
            host += int(o.__sizeof__())  # the object says how big it is: trusted, not walked
        else:
            host += sys.getsizeof(o)
            attrs = getattr(o, "__dict__", None)
            if isinstance(attrs, dict):
                stack.append(attrs)
            for cls in type(o).__mro__:
                for slot in cls.__dict__.get("__slots__", ()):
                    if isinstance(slot, str) and hasattr(o, slot):
                        stack.append(getattr(o, slot))
    return host, dev


def _tensor_bytes(t: Any, storages: set[tuple[str, int]]) -> tuple[int, int]:
    """Bytes of ``t``'s storage (once per storage: views and tied weights share one)."""
    try:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        n = storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a storage (meta, sparse, ...)
        key, n = (str(t.device), id(t)), t.numel() * t.element_size()
    if key[1] and key in storages:
        return 0, 0
    storages.add(key)
    return (n, 0) if t.device.type in ("cpu", "meta") else (0, n)


def release_device_memory() -> None:
    """Return cached CUDA blocks to the driver after a context is dropped."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # a broken CUDA runtime must not turn a clean-up into a failure
        logger.debug("could not release CUDA memory", exc_info=True)
