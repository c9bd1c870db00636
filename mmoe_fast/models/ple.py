"""CGC and PLE (Tang et al., RecSys 2020): per-task and shared experts mixed by per-task gates, on ``expert_mixture``.

A task's gate spans only its own and the shared experts: it is a softmax over those columns alone, placed
into a zero-filled ``G[B, T, E]`` (no masked logits, no unused gate parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import activations, backends, ops
from .common import FusedModule, MultiTaskModel, Towers, layers, non_negative, positive, sizes, uniform_

# How a CGC/PLE level calls ``expert_mixture``: "one-call" runs every expert in one call with
# zero gates outside each task's experts; "per-group" calls it once per expert group. One call is
# the default: on CPU it was 1.6-1.8x faster at B = 1 and with 6 tasks, even at paper scale, and
# only large-batch PLE training (inner levels gather a [B, E, K] input) went ~1.2x faster per group
# (benchmarks/bench_ple.py).
MIXTURES = ("one-call", "per-group")



class ExtractionLayer(FusedModule):
    """One level of PLE (all of CGC): each task's own experts plus shared experts, mixed per task.

    Experts are ordered task 0's ``num_specific_experts``, task 1's, ..., then the ``num_shared_experts``.
    Task t's gate is a softmax over its own and the shared experts; with ``shared_gate`` (PLE's inner
    levels) one more gate mixes all experts into the shared representation.

    ``forward(x[B, K])`` (every expert and gate reads x) or ``forward(reps[R, B, K])`` (the previous
    level's output: task t's experts and gate read ``reps[t]``, the shared experts and gate ``reps[T]``)
    returns ``m[T, B, H]``, or ``m[T + 1, B, H]`` with the shared representation last when ``shared_gate``.
    """

    def __init__(
        self, in_features: int, num_tasks: int, num_specific_experts: int, num_shared_experts: int,
        expert_hidden: int | Sequence[int], *, shared_gate: bool, gate_bias: bool = True, activation: str = "relu",
        backend: str = "auto", mixture: str = "one-call",
    ) -> None:
        super().__init__()
        self.in_features = positive(in_features, "in_features")
        self.num_tasks = T = positive(num_tasks, "num_tasks")
        self.num_specific_experts = S = non_negative(num_specific_experts, "num_specific_experts")
        self.num_shared_experts = Sh = non_negative(num_shared_experts, "num_shared_experts")
        if S + Sh == 0:
            raise ValueError("num_specific_experts + num_shared_experts must be at least 1, got 0 and 0")
        self.expert_hidden = layers(expert_hidden, "expert_hidden")
        self.activation = activations.check_activation(activation)
        self.backend = backends.check_backend_name(backend)
        if mixture not in MIXTURES:
            raise ValueError(f"mixture must be one of {MIXTURES}, got {mixture!r}")
        self.mixture = mixture
        E = T * S + Sh
        pairs = list(zip((self.in_features, *self.expert_hidden[:-1]), self.expert_hidden))
        self.expert_weights = nn.ParameterList(uniform_(torch.empty(E, k, n), k) for k, n in pairs)
        self.expert_biases = nn.ParameterList(uniform_(torch.empty(E, n), k) for k, n in pairs)

        def gate(num_gates: int, width: int) -> tuple[nn.Parameter, nn.Parameter | None]:
            w = nn.Parameter(uniform_(torch.empty(num_gates, in_features, width), in_features))
            b = nn.Parameter(uniform_(torch.empty(num_gates, width), in_features)) if gate_bias else None
            return w, b

        self.task_gate_weight, self.task_gate_bias = gate(T, S + Sh)
        self.shared_gate_weight, self.shared_gate_bias = gate(1, E) if shared_gate else (None, None)
        # Not state: derived from the sizes, so checkpoints do not depend on the mixture strategy.
        columns = [list(range(t * S, (t + 1) * S)) + list(range(T * S, E)) for t in range(T)]
        self.register_buffer("task_columns", torch.tensor(columns, dtype=torch.long).view(T, S + Sh),
                             persistent=False)
        self.register_buffer("expert_group", torch.tensor([min(e // S, T) if S else T for e in range(E)]),
                             persistent=False)

    @property
    def num_experts(self) -> int:
        return self.num_tasks * self.num_specific_experts + self.num_shared_experts

    @property
    def out_features(self) -> int:
        return self.expert_hidden[-1]

    def _gates(self, inputs: Tensor) -> tuple[Tensor, Tensor | None]:
        """Task gates ``[B, T, S + Sh]`` and the shared gate ``[B, 1, E]`` (None without one)."""
        wg, bg, be = self.task_gate_weight, self.task_gate_bias, self.backend
        if inputs.dim() == 2:
            task = ops.gate_softmax(inputs, wg, bg, backend=be)
        else:
            task = torch.cat([
                ops.gate_softmax(inputs[t], wg[t : t + 1], None if bg is None else bg[t : t + 1], backend=be)
                for t in range(self.num_tasks)
            ], dim=1)
        if self.shared_gate_weight is None:
            return task, None
        shared_in = inputs if inputs.dim() == 2 else inputs[self.num_tasks]
        return task, ops.gate_softmax(shared_in, self.shared_gate_weight, self.shared_gate_bias, backend=be)

    def _experts(self, a: Tensor, lo: int, hi: int, gates: Tensor) -> Tensor:
        """``m[R, B, H]``: experts ``lo:hi`` mixed by ``gates[B, R, hi - lo]``; ``a[B, K]`` or ``a[B, hi - lo, K]``."""
        kw = dict(activation=self.activation, backend=self.backend)
        weights, biases = list(self.expert_weights), list(self.expert_biases)
        for w, b in zip(weights[:-1], biases[:-1]):
            a = ops.grouped_linear(a, w[lo:hi], b[lo:hi], **kw)
        return ops.expert_mixture(a, weights[-1][lo:hi], biases[-1][lo:hi], gates, **kw)

    def forward(self, inputs: Tensor) -> Tensor:
        task, shared = self._gates(inputs)
        if self.mixture == "one-call":
            return self._one_call(inputs, task, shared)
        return self._per_group(inputs, task, shared)

    def _spread(self, task: Tensor, shared: Tensor | None) -> Tensor:
        """``[B, T (+1), E]``: the task gates at their experts' columns (zero elsewhere), the shared gate last."""
        B, T = task.shape[:2]
        gates = task.new_zeros(B, T, self.num_experts).scatter(2, self.task_columns.expand(B, -1, -1), task)
        return gates if shared is None else torch.cat((gates, shared), dim=1)

    def full_gates(self, inputs: Tensor) -> Tensor:
        """Every gate of this level over all ``E`` experts, ``[B, T (+1), E]`` (zero outside a task's experts; the
        shared gate last when the level has one), for ``forward``'s ``inputs``."""
        return self._spread(*self._gates(inputs))

    def _one_call(self, inputs: Tensor, task: Tensor, shared: Tensor | None) -> Tensor:
        gates = self._spread(task, shared)
        a = inputs if inputs.dim() == 2 else inputs[self.expert_group].transpose(0, 1)  # [B, E, K]
        return self._experts(a, 0, self.num_experts, gates)

    def _per_group(self, inputs: Tensor, task: Tensor, shared: Tensor | None) -> Tensor:
        T, S = self.num_tasks, self.num_specific_experts
        task_parts: list[list[Tensor]] = [[] for _ in range(T)]
        shared_parts: list[Tensor] = []
        for g in range(T + 1):  # group g < T: task g's experts; g = T: the shared experts
            lo, hi = (g * S, (g + 1) * S) if g < T else (T * S, self.num_experts)
            if lo == hi:
                continue
            gates = task[:, g : g + 1, :S] if g < T else task[:, :, S:]
            if shared is not None:
                gates = torch.cat((gates, shared[:, :, lo:hi]), dim=1)
            m = self._experts(inputs if inputs.dim() == 2 else inputs[g], lo, hi, gates)
            for t in ([g] if g < T else range(T)):
                task_parts[t].append(m[0 if g < T else t])
            if shared is not None:
                shared_parts.append(m[-1])
        rows = [sum(parts[1:], parts[0]) for parts in task_parts]
        if shared is not None:
            rows.append(sum(shared_parts[1:], shared_parts[0]))
        return torch.stack(rows)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_tasks={self.num_tasks}, "
                f"num_specific_experts={self.num_specific_experts}, num_shared_experts={self.num_shared_experts}, "
                f"expert_hidden={self.expert_hidden}, shared_gate={self.shared_gate_weight is not None}, "
                f"activation={self.activation!r}, backend={self.backend!r}, mixture={self.mixture!r}")


class PLE(MultiTaskModel):
    """Progressive Layered Extraction (Tang et al., RecSys 2020): ``num_levels`` stacked extraction levels.

    Inner levels also produce a shared representation (a gate over all experts) that feeds the next
    level's shared experts and shared gate; the last level feeds each task's tower. Any number of
    task-specific and shared experts (either may be 0, not both; without shared experts there is
    nothing for a shared representation to feed, so no level has a shared gate).
    """

    def __init__(
        self, in_features: int, num_tasks: int = 2, *, num_levels: int = 2, num_specific_experts: int = 2,
        num_shared_experts: int = 2, expert_hidden: int | Sequence[int] = 16, tower_hidden: int | Sequence[int] = (8,),
        task_types: Sequence[str] | None = None, gate_bias: bool = True, activation: str = "relu",
        backend: str = "auto", mixture: str = "one-call",
    ) -> None:
        super().__init__(num_tasks, task_types)
        num_levels = positive(num_levels, "num_levels")
        width = positive(in_features, "in_features")
        levels = []
        for level in range(num_levels):
            levels.append(ExtractionLayer(
                width, num_tasks, num_specific_experts, num_shared_experts, expert_hidden,
                shared_gate=level < num_levels - 1 and num_shared_experts > 0, gate_bias=gate_bias,
                activation=activation, backend=backend, mixture=mixture,
            ))
            width = levels[-1].out_features
        self.levels = nn.ModuleList(levels)
        self.towers = Towers(num_tasks, width, sizes(tower_hidden, "tower_hidden"), backend)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for level in self.levels:
            h = level(h)
        return self.towers(h)


class CGC(PLE):
    """Customized Gate Control (Tang et al. 2020): one extraction level, per-task and shared experts.

    The defaults (T = 2: 3 experts per task + 2 shared, 16 units) match MMoE's 8 experts of 16 units.
    """

    def __init__(
        self, in_features: int, num_tasks: int = 2, *, num_specific_experts: int = 3, num_shared_experts: int = 2,
        expert_hidden: int | Sequence[int] = 16, tower_hidden: int | Sequence[int] = (8,),
        task_types: Sequence[str] | None = None, gate_bias: bool = True, activation: str = "relu",
        backend: str = "auto", mixture: str = "one-call",
    ) -> None:
        super().__init__(in_features, num_tasks, num_levels=1, num_specific_experts=num_specific_experts,
                         num_shared_experts=num_shared_experts, expert_hidden=expert_hidden,
                         tower_hidden=tower_hidden, task_types=task_types, gate_bias=gate_bias,
                         activation=activation, backend=backend, mixture=mixture)
