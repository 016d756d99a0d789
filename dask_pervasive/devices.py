"""Device resolution and memory measurement, without importing torch eagerly.

``import torch`` costs about a second per process, so these helpers only
touch torch when it is installed and a CUDA device is actually involved, or
when the object being measured is already a torch object.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
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


def _tensor_bytes(tensors) -> tuple[int, int]:
    host = dev = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if t.device.type == "cpu" or t.device.type == "meta":
            host += n
        else:
            dev += n
    return host, dev


def measure_nbytes(obj: Any) -> tuple[int, int]:
    """Estimate ``(host_bytes, device_bytes)`` held by a loaded context.

    torch modules and tensors are measured from their parameters, buffers
    and storage device; an object with a ``.model`` attribute (as returned by
    :class:`~dask_pervasive.TransformersContext`) is measured through it;
    anything else through :func:`dask.sizeof.sizeof`.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        target = getattr(obj, "model", obj)
        if isinstance(target, torch.nn.Module):
            seen = {id(p): p for p in target.parameters()}
            seen.update({id(b): b for b in target.buffers()})
            return _tensor_bytes(seen.values())
        if isinstance(obj, torch.Tensor):
            return _tensor_bytes([obj])
    return int(sizeof(obj)), 0


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
