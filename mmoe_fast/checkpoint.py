"""The one checkpoint format: ``save(model, path)`` and ``load(path)``, for the trainer, the experiments and users.

A checkpoint is a ``torch.save`` of a dict:

- ``format``: ``"mmoe_fast.checkpoint/1"``;
- ``model``: the model's name in ``MODELS`` (None for a class that is not registered);
- ``class``: the model's class, ``module.QualName`` (for messages);
- ``config``: its constructor's arguments (``model.config()``; None for a model that does not record them);
- ``state_dict``: its ``state_dict``;
- any extra entries the writer adds: ``trainer`` (the state ``fit(resume=...)`` continues from), ``data``
  (the ``load_splits`` spec of the data it was trained on).

Only tensors, plain containers, str, int, float, bool and None are stored, so reading uses
``torch.load(weights_only=True)``. Writes go to a temporary file in the same folder, then ``os.replace``:
a run killed mid-write never leaves a truncated checkpoint behind. A tensor holding NaN or infinity is
never written (ValueError naming the entry): a diverged model must not replace a good checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from . import files
from .models import MODELS, build_model, model_name

FORMAT = "mmoe_fast.checkpoint/1"
RESERVED = ("format", "model", "class", "config", "state_dict")


class CheckpointError(ValueError):
    """A file that is missing, truncated, or not an mmoe_fast checkpoint; the message names the file."""


def _plain(value, where: str):
    """``value`` when ``weights_only`` loading can read it back, else a TypeError naming ``where``."""
    if value is None or isinstance(value, (str, int, float, bool, torch.Tensor, torch.Size)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"checkpoint entry {where} is a {type(value).__name__}; only tensors, lists, tuples, dicts, "
                    "str, int, float, bool and None can be stored")


def save(model: nn.Module, path: str | os.PathLike, **extra) -> Path:
    """Write ``model`` (its name, constructor arguments and ``state_dict``) and the ``extra`` entries to ``path``.

    Returns ``path``. The model is rebuilt by :func:`load` from the file alone when its class is in ``MODELS``.
    """
    clash = sorted(set(extra) & set(RESERVED))
    if clash:
        raise ValueError(f"checkpoint entries {', '.join(clash)} are reserved")
    cls = type(model)
    config = model.config() if callable(getattr(model, "config", None)) else None
    payload = {"format": FORMAT, "model": model_name(model), "class": f"{cls.__module__}.{cls.__qualname__}",
               "config": _plain(config, "config"), "state_dict": model.state_dict(),
               **{k: _plain(v, k) for k, v in extra.items()}}
    bad = _non_finite(payload, "")
    if bad is not None:  # a diverged model is no result: refuse it rather than overwrite a good file with it
        raise ValueError(f"not saving {path}: checkpoint entry {bad} holds NaN or infinite values")
    return files.write_atomic(path, lambda f: torch.save(payload, f), binary=True)


def _non_finite(value, where: str) -> str | None:
    """The place of the first floating tensor holding a NaN or infinity in ``value``, or None."""
    if isinstance(value, torch.Tensor):
        return where if value.is_floating_point() and not torch.isfinite(value).all() else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return next((bad for k, v in items if (bad := _non_finite(v, f"{where}[{k!r}]")) is not None), None)


def read(path: str | os.PathLike) -> dict:
    """The checkpoint dict of ``path`` (tensors on the CPU), checked; any problem is one :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file" if not path.exists() else f"{path} is not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError or UnpicklingError depending on the damage
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be read as a checkpoint (truncated, or not written by "
                              f"mmoe_fast.save): {reason}") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path} is not an mmoe_fast checkpoint (no format tag; expected {FORMAT!r})")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['format']!r}; this version reads {FORMAT!r}")
    missing = [k for k in RESERVED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is an incomplete checkpoint: no {', '.join(missing)}")
    return ckpt


def model_from(ckpt: dict, path: str | os.PathLike) -> nn.Module:
    """The model of a :func:`read` checkpoint, rebuilt from its name and config, with its weights, in eval mode."""
    name, config = ckpt["model"], ckpt["config"]
    if name not in MODELS or not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {ckpt['class']}, not a model of MODELS: build it yourself and "
                              "load_state_dict(mmoe_fast.checkpoint.read(path)['state_dict'])")
    options = dict(config)
    try:
        model = build_model(name, options.pop("in_features"), options.pop("num_tasks"),
                            task_types=options.pop("task_types", None), **options)
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: its {name!r} model cannot be rebuilt from its config: {reason}") from None
    return model.eval()


def load(path: str | os.PathLike) -> nn.Module:
    """The model saved at ``path`` by :func:`save`, rebuilt without knowing its config, in eval mode."""
    return model_from(read(path), path)
