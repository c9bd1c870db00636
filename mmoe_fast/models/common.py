"""What every multi-task model shares: the base class (task types, constructor record), the towers, and the
size checks and initialization of the layers.

Every model maps ``x[B, D]`` to ``[B, T]``: one output per task, a logit for ``"binary"`` tasks and a
value for ``"regression"`` ones (``model.task_types`` tells the trainer which loss to use).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

TASK_TYPES = ("binary", "regression")


def sizes(hidden: int | Sequence[int], name: str) -> tuple[int, ...]:
    """Layer widths: ``16 -> (16,)``, ``(8, 4) -> (8, 4)``; each must be a positive int (``()`` is allowed)."""
    widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    if any(not isinstance(s, int) or s < 1 for s in widths):
        raise ValueError(f"{name} must be a positive int or a sequence of them, got {hidden!r}")
    return widths


def layers(hidden: int | Sequence[int], name: str) -> tuple[int, ...]:
    """Widths of at least one layer (towers may have none, experts and bottoms may not)."""
    widths = sizes(hidden, name)
    if not widths:
        raise ValueError(f"{name} must name at least one layer, got {hidden!r}")
    return widths


def positive(value: int, name: str) -> int:
    """``value`` when it is a positive int, else a ValueError naming it."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def non_negative(value: int, name: str) -> int:
    """``value`` when it is a non-negative int (a bool is not), else a ValueError naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def uniform_(t: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default initialization, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), every element independent."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


def mlp(widths: Sequence[int], out_features: int | None) -> nn.Sequential:
    """``Linear + ReLU`` for each step of ``widths[0] -> widths[1] -> ...``, then ``Linear(widths[-1], out_features)``
    when ``out_features`` is given."""
    modules: list[nn.Module] = []
    for k, n in zip(widths[:-1], widths[1:]):
        modules += [nn.Linear(k, n), nn.ReLU()]
    if out_features is not None:
        modules.append(nn.Linear(widths[-1], out_features))
    return nn.Sequential(*modules)


class Towers(nn.Module):
    """One small MLP per task, ``in_features -> tower_hidden... -> 1``; ``forward(h)`` -> ``[B, T]``.

    ``h`` is ``[T, B, in_features]`` (one input per task) or ``[B, in_features]`` (shared).
    """

    def __init__(self, num_tasks: int, in_features: int, tower_hidden: Sequence[int] = (8,)) -> None:
        super().__init__()
        self.towers = nn.ModuleList(mlp((in_features, *tower_hidden), 1) for _ in range(num_tasks))

    def forward(self, h: Tensor) -> Tensor:
        outs = [tower(h if h.dim() == 2 else h[t]) for t, tower in enumerate(self.towers)]
        return torch.cat(outs, dim=1)


class FusedModule(nn.Module):
    """Base of every module that calls the fused ops: TorchScript cannot compile them, so scripting says so."""

    def __prepare_scriptable__(self):
        raise TypeError(f"torch.jit.script cannot compile {type(self).__name__} (mmoe_fast's fused ops are Python "
                        "custom ops); use torch.jit.trace, torch.export.export, torch.compile or "
                        "mmoe_fast.InferenceSession")


class MultiTaskModel(FusedModule):
    """Base of the full models: validates ``task_types``, and records the constructor's arguments.

    ``config()`` returns those arguments (defaults filled in), so ``type(model)(**model.config())`` builds the
    same architecture again: a checkpoint stores them and needs nothing else to rebuild the model.
    """

    def __new__(cls, *args, **kwargs) -> MultiTaskModel:
        self = super().__new__(cls)
        # Bound here, not in __init__, so every subclass is recorded with its own signature. copy and pickle call
        # __new__ without arguments and then restore the record with the rest of __dict__.
        try:
            bound = inspect.signature(cls.__init__).bind(self, *args, **kwargs)
        except TypeError:
            return self  # bad arguments: __init__ raises the error
        bound.apply_defaults()
        self._config = {k: v for k, v in bound.arguments.items() if k != "self"}
        return self

    def __init__(self, num_tasks: int, task_types: Sequence[str] | None) -> None:
        super().__init__()
        self.num_tasks = positive(num_tasks, "num_tasks")
        task_types = ("binary",) * num_tasks if task_types is None else tuple(task_types)
        if len(task_types) != num_tasks or any(t not in TASK_TYPES for t in task_types):
            raise ValueError(f"task_types must be {num_tasks} entries from {TASK_TYPES}, got {task_types!r}")
        self.task_types = task_types

    def config(self) -> dict:
        """The constructor's arguments by name, e.g. ``{"in_features": 100, "num_tasks": 2, "num_experts": 8, ...}``."""
        return dict(self._config)
