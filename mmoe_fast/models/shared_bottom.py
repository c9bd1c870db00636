"""The Shared-Bottom baseline: one plain ``nn.Linear`` + ReLU MLP shared by every task, then per-task towers.

It has no experts and no gates, so it runs no fused op (and takes no ``backend``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .common import MultiTaskModel, Towers, mlp, positive, sizes


class SharedBottom(MultiTaskModel):
    """Shared-Bottom baseline: one MLP (``bottom_hidden``, ReLU) feeding every task's tower; ``x[B, D] -> [B, T]``."""

    def __init__(
        self, in_features: int, num_tasks: int = 2, *, bottom_hidden: int | Sequence[int] = 113,
        tower_hidden: int | Sequence[int] = (8,), task_types: Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_tasks, task_types)
        widths = (positive(in_features, "in_features"), *sizes(bottom_hidden, "bottom_hidden"))
        self.bottom = mlp(widths, None)
        self.towers = Towers(num_tasks, widths[-1], sizes(tower_hidden, "tower_hidden"))

    def forward(self, x: Tensor) -> Tensor:
        return self.towers(self.bottom(x))
