"""The paper's per-task-network baselines: Single-Task, L2-Constrained, Cross-Stitch and Tensor-Factorization.

Each has one network per task, ``x[B, D] -> [B, T]``. Their hidden layers run as one ``grouped_linear``
over the tasks (task t is "expert" t), so every backend runs them; the towers are the same ``Towers`` as MMoE's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import activations, backends, ops
from .common import MultiTaskModel, Towers, layers, positive, sizes, uniform_


class _TaskNetworks(MultiTaskModel):
    """Base of the per-task-network baselines: ``hidden(x) -> [B, T, H]`` then one tower per task."""

    def __init__(
        self, in_features: int, num_tasks: int, task_hidden: int | Sequence[int], tower_hidden: int | Sequence[int],
        task_types: Sequence[str] | None, activation: str, backend: str,
    ) -> None:
        super().__init__(num_tasks, task_types)
        self.in_features = positive(in_features, "in_features")
        self.task_hidden = layers(task_hidden, "task_hidden")
        self.activation = activations.check_activation(activation)
        self.backend = backends.check_backend_name(backend)
        self.towers = Towers(num_tasks, self.task_hidden[-1], sizes(tower_hidden, "tower_hidden"), backend)

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
        widths = (self.in_features, *self.task_hidden)
        self.task_weights = nn.ParameterList(
            uniform_(torch.empty(num_tasks, k, n), k) for k, n in zip(widths[:-1], widths[1:])
        )
        self.task_biases = nn.ParameterList(
            uniform_(torch.empty(num_tasks, n), k) for k, n in zip(widths[:-1], widths[1:])
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
        self.bias = nn.Parameter(uniform_(torch.empty(num_tasks, out_features), in_features))

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
        widths = (self.in_features, *self.task_hidden)
        self.layers = nn.ModuleList(TuckerLinear(num_tasks, k, n, ranks) for k, n in zip(widths[:-1], widths[1:]))

    def hidden(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.layers:
            h = self._layer(h, layer.weight(), layer.bias)
        return h
