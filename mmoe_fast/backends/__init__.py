"""The backend table: which implementation of the fused ops runs for a given device and dtype.

A backend is a module ``mmoe_fast.backends.<name>`` implementing ``mmoe_fast.contract.Backend`` (required
and optional members, with shapes, are listed there). A new backend is that module plus its name in
``BACKENDS`` (or ``register(name, module)`` for one that lives elsewhere); ``ops.py`` needs no change,
and ``tests/test_conformance.py`` runs the whole conformance suite on it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from .. import contract

# Every known name; the order of ``_AUTO_ORDER`` is auto's preference per device type.
BACKENDS: tuple[str, ...] = ("reference", "triton", "cpp", "numba")
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpp", "numba", "reference")}
ENV_VAR = "MMOE_FAST_BACKEND"

_loaded: dict[str, ModuleType | str] = {}
_resolved: dict[tuple, ModuleType] = {}

# os.environ's own mapping and ENV_VAR as it keys it (POSIX: bytes), for env_backend.
_ENVIRON = os.environ
_ENV_DATA: dict = getattr(_ENVIRON, "_data", {})
_ENV_KEY = _ENVIRON.encodekey(ENV_VAR) if hasattr(_ENVIRON, "_data") and hasattr(_ENVIRON, "encodekey") else None


def env_backend() -> str | None:
    """``os.environ.get(ENV_VAR)``, read at every fused call (a change takes effect at once), at a tenth of its
    cost (0.68 against 0.05 us here): os.environ's own mapping, keyed as os.environ keys it; the public path
    where os.environ is not that object."""
    if os.environ is not _ENVIRON or _ENV_KEY is None:
        return os.environ.get(ENV_VAR)
    value = _ENV_DATA.get(_ENV_KEY)
    return None if value is None else _ENVIRON.decodevalue(value)


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
            _loaded[name] = _checked(name, module)
    return _loaded[name]


def _checked(name: str, module: ModuleType) -> ModuleType | str:
    missing = contract.missing_members(module)
    if missing:
        return f"backend {name!r} does not implement {', '.join(missing)} (see mmoe_fast.contract)"
    reason = module.unavailable_reason()
    return module if reason is None else f"backend {name!r}: {reason}"


def register(name: str, module: ModuleType, *, auto: tuple[str, ...] = ()) -> None:
    """Add a backend module under ``name``; ``auto``: device types where ``auto`` tries it before the others.

    A module that misses a required member of ``contract.Backend`` is a ValueError naming them.
    """
    global BACKENDS
    if not isinstance(name, str) or not name.isidentifier() or name == "auto":
        raise ValueError(f"backend name must be an identifier other than 'auto', got {name!r}")
    missing = contract.missing_members(module)
    if missing:
        raise ValueError(f"backend {name!r} does not implement {', '.join(missing)} (see mmoe_fast.contract)")
    if name not in BACKENDS:
        BACKENDS = (*BACKENDS, name)
    for device_type in auto:
        _AUTO_ORDER[device_type] = (name, *(n for n in _AUTO_ORDER.get(device_type, ("reference",)) if n != name))
    _loaded[name] = _checked(name, module)
    _resolved.clear()


def check_backend_name(backend: str) -> str:
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def status() -> dict[str, str | None]:
    """Every backend's name and why it cannot run here (None: it can, for some device and dtype)."""
    loaded = {name: _load(name) for name in BACKENDS}
    return {name: m if isinstance(m, str) else None for name, m in loaded.items()}


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (for some device and dtype)."""
    return [name for name, reason in status().items() if reason is None]


def load(name: str) -> ModuleType:
    """The backend module ``name``; ValueError saying why when it cannot run here."""
    check_backend_name(name)
    loaded = _load(name)
    if isinstance(loaded, str):
        raise ValueError(loaded)
    return loaded


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The backend module to run for tensors of ``device`` and ``dtype``.

    ``backend="auto"`` takes ``$MMOE_FAST_BACKEND`` when set, else the first backend of the
    device's preference list that supports the dtype. An explicit name that cannot run raises
    ``ValueError`` saying why.
    """
    env = env_backend()
    key = (backend, device.type, dtype, env)
    hit = _resolved.get(key)
    if hit is not None:
        return hit
    check_backend_name(backend)
    if backend == "auto" and env:
        backend = env
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
        module = load(backend)
        if not module.supports(device, dtype):
            raise ValueError(f"backend {backend!r} cannot run on device {device} with dtype {dtype}")
    _resolved[key] = module
    return module


def backend_name(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def describe() -> str:
    """A few lines: every backend, whether it can run and why not, and what ``auto`` picks."""
    lines = [f"{name:10s} {reason or 'available'}" for name, reason in status().items()]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            try:
                pick = backend_name(resolve("auto", torch.device(dev), dtype))
            except ValueError as exc:
                pick = f"none ({exc})"
            lines.append(f"auto on {dev} {str(dtype).replace('torch.', '')}: {pick}")
    return "\n".join(lines)
