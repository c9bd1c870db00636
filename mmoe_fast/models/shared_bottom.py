"""The Shared-Bottom baseline: one plain ``nn.Linear`` + ReLU MLP shared by every task, then per-task towers.

It has no experts and no gates, so it runs no fused op (and takes no ``backend``). Under no_grad on a CPU with
the C++ kernels, the whole forward is one C++ call on its parameters read in place (``common.live_forward``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..backends import cpp as cpp_backend
from ..contract import RELU
from .common import (
    MultiTaskModel,
    Towers,
    _hooked,
    guarded,
    live_applies,
    live_call,
    live_forward,
    mlp,
    positive,
    sizes,
)


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
        if not torch.is_grad_enabled():
            out = live_forward(self, x, self._live_forward)
            if out is not None:
                return out
        return self.towers(self.bottom(x))

    def _live_forward(self, x: Tensor) -> Tensor | bool | None:
        """The no-grad forward as one C++ call (``common.live_call``) where the bottom is plain
        ``Linear``/``ReLU`` pairs, the towers stack, nothing is hooked and the C++ backend runs for ``x``; else
        None or False (the modules run, and say what is wrong)."""
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_cpu:
            return None
        plan = guarded(self, x, self._live_modules, lambda: self._live_plan(x))
        if plan is None:
            return None
        towers = self._modules["towers"].__dict__
        return live_call(self, x, plan[-1], ((towers, "backend"),),
                         lambda: self._live_runner(x, plan, towers.get("backend")))

    def _live_modules(self) -> list[nn.Module]:
        bottom = self._modules["bottom"]
        return [self, bottom, *bottom._modules.values(), *self._modules["towers"]._tower_modules()]

    def _live_plan(self, x: Tensor) -> tuple | None:
        """``(w_0, b_0, ..., tower parameters, tower layers, in_features)``, or None where the bottom is not
        plain ``Linear``, ``ReLU`` pairs of chained widths or the towers do not stack."""
        bottom, towers = self._modules["bottom"], self._modules["towers"]
        if type(bottom) is not nn.Sequential or _hooked(bottom) or type(towers) is not Towers or _hooked(towers):
            return None
        mods = list(bottom._modules.values())
        if len(mods) % 2:
            return None
        params: list[Tensor | None] = []
        width = x.shape[1]
        for lin, relu in zip(mods[::2], mods[1::2]):
            if type(lin) is not nn.Linear or type(relu) is not nn.ReLU or _hooked(lin) or _hooked(relu):
                return None
            w, b = lin._parameters.get("weight"), lin._parameters.get("bias")
            if w is None or w.dim() != 2 or w.shape[1] != width or (b is not None and b.shape != (w.shape[0],)):
                return None
            params += [w, b]
            width = w.shape[0]
        tower_params = towers._stacked_params(x.new_empty((1, width)))
        if tower_params is None:
            return None
        return (*params, *tower_params, len(tower_params) // (2 * len(towers.towers._modules)), x.shape[1])

    def _live_runner(self, x: Tensor, plan: tuple, tower_backend) -> tuple:
        """``live_forward``'s ``(cpp.Live or None, parameters, tasks)``."""
        tower_layers, in_features = plan[-2], plan[-1]
        num_tasks = len(self._modules["towers"].towers._modules)
        tensors = (None, None, *plan[:-2])  # no gates
        bottom = plan[: len(plan) - 2 - 2 * num_tasks * tower_layers]
        tower_params = plan[len(bottom) : -2]
        if not live_applies(x, ("auto", tower_backend or "auto"), tensors):
            return None, tensors, num_tasks
        layers = [[1, w.shape[1], w.shape[0], RELU, 1] for w in bottom[::2]]
        width = bottom[-2].shape[0] if bottom else in_features
        widths = [width] + [tower_params[2 * num_tasks * layer].shape[0] for layer in range(tower_layers)]
        live = cpp_backend.live_class(x.dtype)(in_features, num_tasks, 0, layers, widths)
        return live, tensors, num_tasks
