"""The paper's other baselines, ESMM, and PLE/CGC, with MMoE's conventions (``x[B, D] -> [B, T]``).

- ``SingleTask``, ``L2Constrained``, ``CrossStitch``, ``TensorFactorization``: one network per task.
  Their hidden layers run as one ``grouped_linear`` over the tasks (task t is "expert" t), so every
  backend runs them; the towers are the same ``Towers`` as MMoE's.
- ``ESMM`` (Ma et al., SIGIR 2018): pCTR and pCTCVR = pCTR * pCVR, both over the whole sample space.
- ``CGC`` and ``PLE`` (Tang et al., RecSys 2020): per-task and shared experts mixed by per-task gates,
  on ``expert_mixture``. A task's gate spans only its own and the shared experts: it is a softmax
  over those columns alone, placed into a zero-filled ``G[B, T, E]`` (no masked logits, no unused
  gate parameters).

Every class registers in ``mmoe_fast.models.MODELS`` when the package is imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import activations, backends, ops
from .models import MODELS, MultiTaskModel, Towers, _mlp, _positive, _sizes, _uniform_

# How a CGC/PLE level calls ``expert_mixture``: "one-call" runs every expert in one call with
# zero gates outside each task's experts; "per-group" calls it once per expert group. One call is
# the default: on CPU it was 1.6-1.8x faster at B = 1 and with 6 tasks, even at paper scale, and
# only large-batch PLE training (inner levels gather a [B, E, K] input) went ~1.2x faster per group
# (benchmarks/bench_ple.py).
MIXTURES = ("one-call", "per-group")


def _count(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _layers(hidden: int | Sequence[int], name: str) -> tuple[int, ...]:
    """Hidden sizes of at least one layer (towers may have none, these may not)."""
    sizes = _sizes(hidden, name)
    if not sizes:
        raise ValueError(f"{name} must name at least one layer, got {hidden!r}")
    return sizes


class _TaskNetworks(MultiTaskModel):
    """Base of the per-task-network baselines: ``hidden(x) -> [B, T, H]`` then one tower per task."""

    def __init__(
        self, in_features: int, num_tasks: int, task_hidden: int | Sequence[int], tower_hidden: int | Sequence[int],
        task_types: Sequence[str] | None, activation: str, backend: str,
    ) -> None:
        super().__init__(num_tasks, task_types)
        self.in_features = _positive(in_features, "in_features")
        self.task_hidden = _layers(task_hidden, "task_hidden")
        self.activation = activations.check_activation(activation)
        self.backend = backends.check_backend_name(backend)
        self.towers = Towers(num_tasks, self.task_hidden[-1], _sizes(tower_hidden, "tower_hidden"))

    def _layer(self, h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return ops.grouped_linear(h, weight, bias, activation=self.activation, backend=self.backend)

    def hidden(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.towers(self.hidden(x).transpose(0, 1))


class SingleTask(_TaskNetworks):
    """Single-Task baseline: one network per task (``task_hidden`` layers, then its tower), nothing shared."""

    def __init__(
        self, in_features: int, num_tasks: int = 2, *, task_hidden: int | Sequence[int] = 64,
        tower_hidden: int | Sequence[int] = (8,), task_types: Sequence[str] | None = None,
        activation: str = "relu", backend: str = "auto",
    ) -> None:
        super().__init__(in_features, num_tasks, task_hidden, tower_hidden, task_types, activation, backend)
        sizes = (self.in_features, *self.task_hidden)
        self.task_weights = nn.ParameterList(
            _uniform_(torch.empty(num_tasks, k, n), k) for k, n in zip(sizes[:-1], sizes[1:])
        )
        self.task_biases = nn.ParameterList(
            _uniform_(torch.empty(num_tasks, n), k) for k, n in zip(sizes[:-1], sizes[1:])
        )

    def hidden(self, x: Tensor) -> Tensor:
        """Every task's last hidden layer, ``[B, T, H]``."""
        h = x
        for w, b in zip(self.task_weights, self.task_biases):
            h = self._layer(h, w, b)
        return h


class L2Constrained(SingleTask):
    """L2-Constrained baseline (Duong et al. 2015): task networks tied softly by ``alpha * ||theta_i - theta_j||^2``.

    The paper's loss is ``L1 + L2 + alpha * ||theta1 - theta2||^2`` for two tasks, theta being all of a
    task's parameters (hidden layers and tower); with more tasks the penalty sums over every pair.
    The trainer adds ``extra_loss()`` to the task losses.
    """

    def __init__(
        self, in_features: int, num_tasks: int = 2, *, alpha: float = 1e-3, task_hidden: int | Sequence[int] = 64,
        tower_hidden: int | Sequence[int] = (8,), task_types: Sequence[str] | None = None,
        activation: str = "relu", backend: str = "auto",
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"alpha must be a non-negative number, got {alpha!r}")
        super().__init__(in_features, num_tasks, task_hidden=task_hidden, tower_hidden=tower_hidden,
                         task_types=task_types, activation=activation, backend=backend)
        self.alpha = float(alpha)

    def extra_loss(self) -> Tensor:
        """``alpha * sum_{i<j} ||theta_i - theta_j||^2`` (a 0-dim tensor)."""
        penalty = self.task_weights[0].new_zeros(())
        stacked = [*self.task_weights, *self.task_biases]
        stacked += [torch.stack(ps) for ps in zip(*(tower.parameters() for tower in self.towers.towers))]
        for p in stacked:  # p[T, ...]: row t belongs to task t
            for i in range(self.num_tasks):
                for j in range(i + 1, self.num_tasks):
                    penalty = penalty + (p[i] - p[j]).pow(2).sum()
        return self.alpha * penalty

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class CrossStitch(SingleTask):
    """Cross-Stitch baseline (Misra et al. 2016): after each hidden layer, task t's units become
    ``sum_s stitch[t, s] * h_s``, a learned T x T mixing (initialized to 0.9 on the diagonal, the
    rest of each row 0.1 split evenly, as the paper found best).
    """

    def __init__(
        self, in_features: int, num_tasks: int = 2, *, task_hidden: int | Sequence[int] = 64,
        tower_hidden: int | Sequence[int] = (8,), task_types: Sequence[str] | None = None,
        activation: str = "relu", backend: str = "auto",
    ) -> None:
        super().__init__(in_features, num_tasks, task_hidden=task_hidden, tower_hidden=tower_hidden,
                         task_types=task_types, activation=activation, backend=backend)
        init = torch.eye(num_tasks) if num_tasks == 1 else torch.full((num_tasks, num_tasks), 0.1 / (num_tasks - 1))
        if num_tasks > 1:
            init.fill_diagonal_(0.9)
        self.stitch_weights = nn.ParameterList(nn.Parameter(init.clone()) for _ in self.task_hidden)

    def hidden(self, x: Tensor) -> Tensor:
        h = x
        for w, b, stitch in zip(self.task_weights, self.task_biases, self.stitch_weights):
            h = torch.einsum("ts,bsn->btn", stitch, self._layer(h, w, b))
        return h


class TuckerLinear(nn.Module):
    """Every task's weights of one layer, ``W[T, K, N]``, as a Tucker product ``core x1 U_task x2 U_in x3 U_out``.

    ``core[r_task, r_in, r_out]``, ``task_factor[T, r_task]``, ``in_factor[K, r_in]``, ``out_factor[N, r_out]``;
    each rank is capped at its dimension. The factors start orthonormal and the core is scaled so that
    ``W`` has ``nn.Linear``'s initial variance.
    """

    def __init__(self, num_tasks: int, in_features: int, out_features: int, ranks: tuple[int, int, int]) -> None:
        super().__init__()
        dims = (num_tasks, in_features, out_features)
        r = tuple(min(rank, dim) for rank, dim in zip(ranks, dims))
        self.task_factor, self.in_factor, self.out_factor = (
            nn.Parameter(torch.linalg.qr(torch.randn(dim, rank)).Q) for dim, rank in zip(dims, r)
        )
        # With orthonormal factors ||W||^2 = ||core||^2; U(-c, c) has variance c^2 / 3 and nn.Linear's
        # weights 1 / (3 K), so c^2 = T * N / (r_task * r_in * r_out).
        bound = math.sqrt(num_tasks * out_features / math.prod(r))
        self.core = nn.Parameter(nn.init.uniform_(torch.empty(r), -bound, bound))
        self.bias = nn.Parameter(_uniform_(torch.empty(num_tasks, out_features), in_features))

    def weight(self) -> Tensor:
        """``W[T, K, N]``."""
        return torch.einsum("abc,ta,kb,nc->tkn", self.core, self.task_factor, self.in_factor, self.out_factor)


class TensorFactorization(_TaskNetworks):
    """Tensor-Factorization baseline (Yang & Hospedales 2017): per-task layers whose stacked weights
    ``W[T, K, N]`` are Tucker-factorized, so tasks share the input and output subspaces.

    ``ranks = (r_task, r_in, r_out)`` for every layer, each capped at its dimension.
    """

    def __init__(
        self, in_features: int, num_tasks: int = 2, *, task_hidden: int | Sequence[int] = 64,
        ranks: Sequence[int] = (2, 48, 48), tower_hidden: int | Sequence[int] = (8,),
        task_types: Sequence[str] | None = None, activation: str = "relu", backend: str = "auto",
    ) -> None:
        super().__init__(in_features, num_tasks, task_hidden, tower_hidden, task_types, activation, backend)
        ranks = tuple(ranks) if isinstance(ranks, Sequence) else ranks
        if not isinstance(ranks, tuple) or len(ranks) != 3 or any(
                not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in ranks):
            raise ValueError(f"ranks must be three positive ints (r_task, r_in, r_out), got {ranks!r}")
        self.ranks = ranks
        sizes = (self.in_features, *self.task_hidden)
        self.layers = nn.ModuleList(TuckerLinear(num_tasks, k, n, ranks) for k, n in zip(sizes[:-1], sizes[1:]))

    def hidden(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.layers:
            h = self._layer(h, layer.weight(), layer.bias)
        return h


class ESMM(MultiTaskModel):
    """Entire Space Multi-task Model (Ma et al., SIGIR 2018) for click (CTR) and conversion (CVR).

    A shared bottom (ESMM's shared embedding) feeds a CTR tower and a CVR tower. ``forward`` returns the
    logits of ``[pCTR, pCTCVR]``, ``pCTCVR = pCTR * pCVR``, so both tasks train with BCE on labels
    ``[click, click and conversion]`` over all impressions; ``predict_proba`` gives the probabilities,
    ``predict_cvr`` the pCVR that ESMM exists to serve.
    """

    def __init__(
        self, in_features: int, num_tasks: int = 2, *, bottom_hidden: int | Sequence[int] = 113,
        tower_hidden: int | Sequence[int] = (8,), task_types: Sequence[str] | None = None,
    ) -> None:
        if num_tasks != 2:
            raise ValueError(f"num_tasks must be 2 for ESMM (pCTR and pCTCVR), got {num_tasks!r}")
        super().__init__(num_tasks, task_types)
        if self.task_types != ("binary", "binary"):
            raise ValueError(f"task_types must be ('binary', 'binary') for ESMM, got {self.task_types!r}")
        sizes = (_positive(in_features, "in_features"), *_layers(bottom_hidden, "bottom_hidden"))
        self.bottom = _mlp(sizes, None)
        self.towers = Towers(2, sizes[-1], _sizes(tower_hidden, "tower_hidden"))

    def _ctr_cvr_logits(self, x: Tensor) -> Tensor:
        return self.towers(self.bottom(x))

    @staticmethod
    def ctcvr_logit(ctr_logit: Tensor, cvr_logit: Tensor) -> Tensor:
        """``logit(sigmoid(a) * sigmoid(b))``, exact and finite for any finite logits ``a``, ``b``."""
        a, b = ctr_logit, cvr_logit
        # sigmoid(a) sigmoid(b) / (1 - sigmoid(a) sigmoid(b)) = 1 / (e^-a + e^-b + e^-(a+b)); the result is
        # never above a, since a logsumexp is at least its largest term.
        return -torch.logsumexp(torch.stack((-a, -b, -(a + b)), dim=-1), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 2]``: logit(pCTR) and logit(pCTR * pCVR)."""
        ctr, cvr = self._ctr_cvr_logits(x).unbind(1)
        return torch.stack((ctr, self.ctcvr_logit(ctr, cvr)), dim=1)

    def predict_proba(self, x: Tensor) -> Tensor:
        """``[B, 2]``: pCTR and pCTCVR, with pCTCVR <= pCTR."""
        return torch.sigmoid(self(x))

    def predict_cvr(self, x: Tensor) -> Tensor:
        """``[B]``: pCVR, the conversion probability given a click."""
        return torch.sigmoid(self._ctr_cvr_logits(x)[:, 1])


class ExtractionLayer(nn.Module):
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
        self.in_features = _positive(in_features, "in_features")
        self.num_tasks = T = _positive(num_tasks, "num_tasks")
        self.num_specific_experts = S = _count(num_specific_experts, "num_specific_experts")
        self.num_shared_experts = Sh = _count(num_shared_experts, "num_shared_experts")
        if S + Sh == 0:
            raise ValueError("num_specific_experts + num_shared_experts must be at least 1, got 0 and 0")
        self.expert_hidden = _layers(expert_hidden, "expert_hidden")
        self.activation = activations.check_activation(activation)
        self.backend = backends.check_backend_name(backend)
        if mixture not in MIXTURES:
            raise ValueError(f"mixture must be one of {MIXTURES}, got {mixture!r}")
        self.mixture = mixture
        E = T * S + Sh
        pairs = list(zip((self.in_features, *self.expert_hidden[:-1]), self.expert_hidden))
        self.expert_weights = nn.ParameterList(_uniform_(torch.empty(E, k, n), k) for k, n in pairs)
        self.expert_biases = nn.ParameterList(_uniform_(torch.empty(E, n), k) for k, n in pairs)

        def gate(num_gates: int, width: int) -> tuple[nn.Parameter, nn.Parameter | None]:
            w = nn.Parameter(_uniform_(torch.empty(num_gates, in_features, width), in_features))
            b = nn.Parameter(_uniform_(torch.empty(num_gates, width), in_features)) if gate_bias else None
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

    def _one_call(self, inputs: Tensor, task: Tensor, shared: Tensor | None) -> Tensor:
        B, T = task.shape[:2]
        gates = task.new_zeros(B, T, self.num_experts).scatter(2, self.task_columns.expand(B, -1, -1), task)
        if shared is not None:
            gates = torch.cat((gates, shared), dim=1)
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
        num_levels = _positive(num_levels, "num_levels")
        width = _positive(in_features, "in_features")
        levels = []
        for level in range(num_levels):
            levels.append(ExtractionLayer(
                width, num_tasks, num_specific_experts, num_shared_experts, expert_hidden,
                shared_gate=level < num_levels - 1 and num_shared_experts > 0, gate_bias=gate_bias,
                activation=activation, backend=backend, mixture=mixture,
            ))
            width = levels[-1].out_features
        self.levels = nn.ModuleList(levels)
        self.towers = Towers(num_tasks, width, _sizes(tower_hidden, "tower_hidden"))

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


MODELS.update({
    "single-task": SingleTask, "l2-constrained": L2Constrained, "cross-stitch": CrossStitch,
    "tensor-factorization": TensorFactorization, "esmm": ESMM, "cgc": CGC, "ple": PLE,
})
