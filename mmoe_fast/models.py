"""Multi-task models built on the fused ops: MMoE, OMoE and Shared-Bottom, with per-task towers.

Every model maps ``x[B, D]`` to ``[B, T]``: one output per task, a logit for ``"binary"`` tasks and a
value for ``"regression"`` ones (``model.task_types`` tells the trainer which loss to use).
The backend is a plain attribute, so the ``state_dict`` is the same whichever backend runs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import activations, backends, ops

TASK_TYPES = ("binary", "regression")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters, to size-match models as the paper does."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _sizes(hidden: int | Sequence[int], name: str) -> tuple[int, ...]:
    sizes = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    if any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"{name} must be a positive int or a sequence of them, got {hidden!r}")
    return sizes


def _positive(value: int, name: str) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _uniform_(t: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default initialization, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), every element independent."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


class MMoELayer(nn.Module):
    """E experts (MLPs ``in_features -> expert_hidden...``) mixed by one softmax gate per task.

    ``forward(x[B, D]) -> m[T, B, H]`` with ``H = expert_hidden[-1]``. Hidden expert layers run as
    ``grouped_linear``; the last layer and the mixture run as one ``expert_mixture`` (or ``mmoe``).
    """

    def __init__(
        self, in_features: int, num_experts: int, expert_hidden: int | Sequence[int], num_tasks: int, *,
        gate_bias: bool = True, activation: str = "relu", backend: str = "auto", num_gates: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _positive(in_features, "in_features")
        self.num_experts = _positive(num_experts, "num_experts")
        self.num_tasks = _positive(num_tasks, "num_tasks")
        self.expert_hidden = _sizes(expert_hidden, "expert_hidden")
        self.activation = activations.check_activation(activation)
        self.backend = backends.check_backend_name(backend)
        num_gates = self.num_tasks if num_gates is None else num_gates
        sizes = (self.in_features, *self.expert_hidden)
        self.expert_weights = nn.ParameterList(
            _uniform_(torch.empty(num_experts, k, n), k) for k, n in zip(sizes[:-1], sizes[1:])
        )
        self.expert_biases = nn.ParameterList(
            _uniform_(torch.empty(num_experts, n), k) for k, n in zip(sizes[:-1], sizes[1:])
        )
        self.gate_weight = nn.Parameter(_uniform_(torch.empty(num_gates, in_features, num_experts), in_features))
        if gate_bias:
            self.gate_bias = nn.Parameter(_uniform_(torch.empty(num_gates, num_experts), in_features))
        else:
            self.register_parameter("gate_bias", None)

    @property
    def out_features(self) -> int:
        return self.expert_hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        kw = dict(activation=self.activation, backend=self.backend)
        weights, biases = list(self.expert_weights), list(self.expert_biases)
        if len(weights) == 1:
            m = ops.mmoe(x, weights[0], biases[0], self.gate_weight, self.gate_bias, **kw)
        else:
            h = x
            for w, b in zip(weights[:-1], biases[:-1]):
                h = ops.grouped_linear(h, w, b, **kw)
            gates = ops.gate_softmax(x, self.gate_weight, self.gate_bias, backend=self.backend)
            m = ops.expert_mixture(h, weights[-1], biases[-1], gates, **kw)
        if m.shape[0] != self.num_tasks:  # one shared gate (OMoE): every task sees the same mixture
            m = m.expand(self.num_tasks, -1, -1)
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_experts={self.num_experts}, "
                f"expert_hidden={self.expert_hidden}, num_tasks={self.num_tasks}, "
                f"num_gates={self.gate_weight.shape[0]}, activation={self.activation!r}, backend={self.backend!r}")


class OMoELayer(MMoELayer):
    """One-gate MoE: a single softmax gate shared by every task (the paper's OMoE baseline)."""

    def __init__(
        self, in_features: int, num_experts: int, expert_hidden: int | Sequence[int], num_tasks: int, *,
        gate_bias: bool = True, activation: str = "relu", backend: str = "auto",
    ) -> None:
        super().__init__(in_features, num_experts, expert_hidden, num_tasks, gate_bias=gate_bias,
                         activation=activation, backend=backend, num_gates=1)


def _mlp(sizes: Sequence[int], out_features: int | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, n in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(k, n), nn.ReLU()]
    if out_features is not None:
        layers.append(nn.Linear(sizes[-1], out_features))
    return nn.Sequential(*layers)


class Towers(nn.Module):
    """One small MLP per task, ``in_features -> tower_hidden... -> 1``; ``forward(h)`` -> ``[B, T]``.

    ``h`` is ``[T, B, in_features]`` (one input per task) or ``[B, in_features]`` (shared).
    """

    def __init__(self, num_tasks: int, in_features: int, tower_hidden: Sequence[int] = (8,)) -> None:
        super().__init__()
        sizes = (in_features, *tower_hidden)
        self.towers = nn.ModuleList(_mlp(sizes, 1) for _ in range(num_tasks))

    def forward(self, h: Tensor) -> Tensor:
        outs = [tower(h if h.dim() == 2 else h[t]) for t, tower in enumerate(self.towers)]
        return torch.cat(outs, dim=1)


class MultiTaskModel(nn.Module):
    """Base of the full models: validates ``task_types`` and owns the towers."""

    def __init__(self, num_tasks: int, task_types: Sequence[str] | None) -> None:
        super().__init__()
        self.num_tasks = _positive(num_tasks, "num_tasks")
        task_types = ("binary",) * num_tasks if task_types is None else tuple(task_types)
        if len(task_types) != num_tasks or any(t not in TASK_TYPES for t in task_types):
            raise ValueError(f"task_types must be {num_tasks} entries from {TASK_TYPES}, got {task_types!r}")
        self.task_types = task_types


class MMoE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018): ``x[B, D] -> [B, T]``."""

    layer_class = MMoELayer

    def __init__(
        self, in_features: int, num_tasks: int = 2, *, num_experts: int = 8,
        expert_hidden: int | Sequence[int] = 16, tower_hidden: int | Sequence[int] = (8,),
        task_types: Sequence[str] | None = None, gate_bias: bool = True, activation: str = "relu",
        backend: str = "auto",
    ) -> None:
        super().__init__(num_tasks, task_types)
        self.mixture = self.layer_class(in_features, num_experts, expert_hidden, num_tasks, gate_bias=gate_bias,
                                        activation=activation, backend=backend)
        self.towers = Towers(num_tasks, self.mixture.out_features, _sizes(tower_hidden, "tower_hidden"))

    def forward(self, x: Tensor) -> Tensor:
        return self.towers(self.mixture(x))


class OMoE(MMoE):
    """One-gate Mixture-of-Experts baseline: the same experts, one gate for all tasks."""

    layer_class = OMoELayer


class SharedBottom(MultiTaskModel):
    """Shared-Bottom baseline: one MLP (``bottom_hidden``, ReLU) feeding every task's tower."""

    def __init__(
        self, in_features: int, num_tasks: int = 2, *, bottom_hidden: int | Sequence[int] = 113,
        tower_hidden: int | Sequence[int] = (8,), task_types: Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_tasks, task_types)
        sizes = (_positive(in_features, "in_features"), *_sizes(bottom_hidden, "bottom_hidden"))
        self.bottom = _mlp(sizes, None)
        self.towers = Towers(num_tasks, sizes[-1], _sizes(tower_hidden, "tower_hidden"))

    def forward(self, x: Tensor) -> Tensor:
        return self.towers(self.bottom(x))


# Every model by its CLI name; mmoe_fast.multitask adds the other baselines, ESMM, CGC and PLE.
MODELS = {"mmoe": MMoE, "omoe": OMoE, "shared-bottom": SharedBottom}


def build_model(name: str, in_features: int, num_tasks: int, **options) -> MultiTaskModel:
    """``MODELS[name](in_features, num_tasks, **options)``; an option the model does not take is a ValueError."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    cls = MODELS[name]
    accepted = set(inspect.signature(cls).parameters) - {"in_features", "num_tasks"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"model {name!r} takes no option {', '.join(unknown)} (it takes {', '.join(sorted(accepted))})"
        )
    return cls(in_features, num_tasks, **options)


def fused_backend(model: nn.Module) -> str | None:
    """The ``backend`` setting of the model's fused layers, or None when it has none."""
    return next((m.backend for m in model.modules() if isinstance(getattr(m, "backend", None), str)), None)
