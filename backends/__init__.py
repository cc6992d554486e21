"""Platform backends, chosen once by name: `cpu`, `cuda`, `npu`, or `auto`.

Factories import lazily, so torch_npu is never imported unless the NPU is chosen.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator
from functools import cache

import torch

from .base import Backend
from .comm import SOLO, Communicator, Handle
from .errors import BackendUnavailable

_CLASSES = {
    "cpu": ("cpu", "CpuBackend"),
    "cuda": ("cuda", "CudaBackend"),
    "npu": ("npu", "NpuBackend"),
}
NAMES = ("auto", *_CLASSES)

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Communicator",
    "Handle",
    "NAMES",
    "SOLO",
    "backend_for",
    "get_backend",
    "npu_usable",
    "override_backend",
    "resolve_name",
]

# Test/dev hook: device type -> backend that backend_for() returns instead of the registry's.
_OVERRIDES: dict[str, Backend] = {}


def npu_usable() -> bool:
    """True when torch_npu imports and sees a card. Never imports it if it is not installed."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401
    except Exception:  # a broken install (no toolkit) counts as no NPU
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def resolve_name(name: str) -> str:
    """Resolve `auto` to npu if usable, else cuda if available, else cpu."""
    if name == "auto":
        if npu_usable():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in _CLASSES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(NAMES)}")
    return name


@cache
def get_backend(name: str = "auto") -> Backend:
    """The backend for `name` (one instance per process)."""
    name = resolve_name(name)
    module, cls = _CLASSES[name]
    backend_cls = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    if name == "cuda" and not backend_cls.is_available():
        raise BackendUnavailable(
            "CUDA was asked for but torch sees no CUDA device.",
            "Install a CUDA build of torch and check `nvidia-smi`, or use --device cpu.",
        )
    return backend_cls()


def backend_for(device: torch.device) -> Backend:
    """The backend that owns tensors on `device`."""
    override = _OVERRIDES.get(device.type)
    return override if override is not None else get_backend(device.type)


@contextlib.contextmanager
def override_backend(device_type: str, backend: Backend) -> Iterator[Backend]:
    """Test/dev hook, not for serving: inside the block, `backend_for` returns `backend` for
    tensors of `device_type`. Lets the tests run the NPU backend's code on CPU tensors (with
    a stand-in torch_npu) through the distributed strategies. Nests; restores on exit."""
    previous = _OVERRIDES.get(device_type)
    _OVERRIDES[device_type] = backend
    try:
        yield backend
    finally:
        if previous is None:
            del _OVERRIDES[device_type]
        else:
            _OVERRIDES[device_type] = previous
