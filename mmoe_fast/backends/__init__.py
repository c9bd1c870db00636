"""The backend table: which implementation of the fused ops runs for a given device and dtype.

A backend is a module ``mmoe_fast.backends.<name>`` that exposes

- ``unavailable_reason() -> str | None``: why it cannot run on this machine (None: it can);
- ``supports(device: torch.device, dtype: torch.dtype) -> bool``;
- the kernels, on validated tensors (see ``reference.py`` for the exact signatures):
  ``gate_softmax``, ``gate_softmax_backward``, ``expert_mixture``, ``expert_mixture_backward``,
  ``grouped_linear``, ``grouped_linear_backward``.

A new backend registers by adding its module and its name to ``BACKENDS``; ``ops.py`` needs no change.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

# Every known name; the order of ``_AUTO_ORDER`` is auto's preference per device type.
BACKENDS = ("reference", "triton", "cpp", "numba")
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpp", "numba", "reference")}
ENV_VAR = "MMOE_FAST_BACKEND"

_loaded: dict[str, ModuleType | str] = {}
_resolved: dict[tuple, ModuleType] = {}


def _load(name: str) -> ModuleType | str:
    """The backend module, or a string saying why it cannot be used."""
    if name not in _loaded:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                _loaded[name] = f"backend {name!r} is not part of this build of mmoe_fast"
            else:
                _loaded[name] = f"backend {name!r} needs {exc.name!r}, which is not installed"
        except ImportError as exc:
            _loaded[name] = f"backend {name!r} failed to import: {exc}"
        else:
            reason = module.unavailable_reason()
            _loaded[name] = module if reason is None else f"backend {name!r}: {reason}"
    return _loaded[name]


def check_backend_name(backend: str) -> str:
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (for some device and dtype)."""
    return [name for name in BACKENDS if isinstance(_load(name), ModuleType)]


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The backend module to run for tensors of ``device`` and ``dtype``.

    ``backend="auto"`` takes ``$MMOE_FAST_BACKEND`` when set, else the first backend of the
    device's preference list that supports the dtype. An explicit name that cannot run raises
    ``ValueError`` saying why.
    """
    key = (backend, device.type, dtype, os.environ.get(ENV_VAR))
    hit = _resolved.get(key)
    if hit is not None:
        return hit
    check_backend_name(backend)
    if backend == "auto" and os.environ.get(ENV_VAR):
        backend = os.environ[ENV_VAR]
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"${ENV_VAR} must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            module = _load(name)
            if isinstance(module, ModuleType) and module.supports(device, dtype):
                break
        else:
            raise ValueError(f"no backend supports device {device} and dtype {dtype}")
    else:
        module = _load(backend)
        if isinstance(module, str):
            raise ValueError(module)
        if not module.supports(device, dtype):
            raise ValueError(f"backend {backend!r} cannot run on device {device} with dtype {dtype}")
    _resolved[key] = module
    return module


def backend_name(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def describe() -> str:
    """A few lines: every backend, whether it can run and why not, and what ``auto`` picks."""
    lines = []
    for name in BACKENDS:
        module = _load(name)
        lines.append(f"{name:10s} {'available' if isinstance(module, ModuleType) else module}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            try:
                pick = backend_name(resolve("auto", torch.device(dev), dtype))
            except ValueError as exc:
                pick = f"none ({exc})"
            lines.append(f"auto on {dev} {str(dtype).replace('torch.', '')}: {pick}")
    return "\n".join(lines)
