"""MMoE and OMoE (Ma et al., KDD 2018) on the fused ops: experts, softmax gates and their mixture.

The backend is a plain attribute, so the ``state_dict`` is the same whichever backend runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import activations, backends, ops
from .common import FusedModule, MultiTaskModel, Towers, positive, sizes, uniform_


class MMoELayer(FusedModule):
    """E experts (MLPs ``in_features -> expert_hidden...``) mixed by one softmax gate per task.

    ``forward(x[B, D]) -> m[T, B, H]`` with ``H = expert_hidden[-1]``. Hidden expert layers run as
    ``grouped_linear``; the last layer and the mixture run as one ``expert_mixture`` (or ``mmoe``).
    """

    def __init__(
        self, in_features: int, num_experts: int, expert_hidden: int | Sequence[int], num_tasks: int, *,
        gate_bias: bool = True, activation: str = "relu", backend: str = "auto", num_gates: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = positive(in_features, "in_features")
        self.num_experts = positive(num_experts, "num_experts")
        self.num_tasks = positive(num_tasks, "num_tasks")
        self.expert_hidden = sizes(expert_hidden, "expert_hidden")
        self.activation = activations.check_activation(activation)
        self.backend = backends.check_backend_name(backend)
        num_gates = self.num_tasks if num_gates is None else num_gates
        widths = (self.in_features, *self.expert_hidden)
        self.expert_weights = nn.ParameterList(
            uniform_(torch.empty(num_experts, k, n), k) for k, n in zip(widths[:-1], widths[1:])
        )
        self.expert_biases = nn.ParameterList(
            uniform_(torch.empty(num_experts, n), k) for k, n in zip(widths[:-1], widths[1:])
        )
        self.gate_weight = nn.Parameter(uniform_(torch.empty(num_gates, in_features, num_experts), in_features))
        if gate_bias:
            self.gate_bias = nn.Parameter(uniform_(torch.empty(num_gates, num_experts), in_features))
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
        self.towers = Towers(num_tasks, self.mixture.out_features, sizes(tower_hidden, "tower_hidden"))

    def forward(self, x: Tensor) -> Tensor:
        return self.towers(self.mixture(x))


class OMoE(MMoE):
    """One-gate Mixture-of-Experts baseline: the same experts, one gate for all tasks."""

    layer_class = OMoELayer
