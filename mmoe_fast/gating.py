"""Gate statistics of a gated model (MMoE, OMoE, CGC, PLE): each gate's mean weight per expert and mean entropy,
and warnings of collapse. ``mmoe-fast gates`` prints them for a checkpoint; ``fit(log_gates=True)`` every epoch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import ops
from .features import num_rows, take
from .models import MMoELayer
from .models.ple import PLE

COLLAPSE = 0.9  # a gate putting more than this share of its mean weight on one expert has collapsed onto it
UNUSED = 0.01  # an expert under this mean weight in every gate is unused


@dataclass
class GateTable:
    """One gated level: row ``g`` of ``weights[G, E]`` is gate ``gates[g]``'s mean weight on each expert;
    ``entropy[g]`` the mean over rows of its weights' entropy over the experts it can reach, divided by the
    log of their number (0: always one expert, 1: always uniform)."""

    title: str
    gates: list[str]
    experts: list[str]
    weights: Tensor
    entropy: Tensor
    reach: list[int]  # how many experts each gate can weight

    def warnings(self) -> list[str]:
        """A gate of two or more experts that has collapsed onto one; experts no gate uses."""
        found = [f"{self.title}{g}'s gate has collapsed: {w.max().item():.2f} of its weight on expert "
                 f"{self.experts[int(w.argmax())]}" for g, w, r in zip(self.gates, self.weights, self.reach)
                 if r > 1 and w.max() > COLLAPSE]
        unused = [e for e, w in zip(self.experts, self.weights.max(dim=0).values) if w < UNUSED]
        if unused:
            found.append(f"{self.title}experts no gate uses (under {UNUSED} of every gate's weight): "
                         + ", ".join(unused))
        return found


def _accumulate(gates: Tensor, reach: Tensor, total: Tensor, entropy: Tensor) -> None:
    """Add a batch's gates ``[B, G, E]`` to the running sums of weights ``[G, E]`` and normalized entropies ``[G]``."""
    g = gates.double()
    total += g.sum(dim=0)
    h = -(g * torch.log(g.clamp_min(1e-300))).sum(dim=2)  # [B, G]; 0 * log 0 = 0
    entropy += (h / torch.log(reach.clamp_min(2).double())).sum(dim=0) * (reach > 1)


def _batches(model: nn.Module, x, batch_size: int):
    """``x[N, D]`` ``batch_size`` rows at a time; a dict of feature columns through the model's encoder."""
    for i in range(0, num_rows(x), batch_size):
        part = take(x, slice(i, i + batch_size))
        yield model.encoder(part) if isinstance(x, dict) else part


def gate_tables(model: nn.Module, x, task_names: list[str], batch_size: int = 8192) -> list[GateTable]:
    """The :class:`GateTable` of every gated level of ``model`` on ``x[N, D]`` (or its dict of feature columns):
    one for MMoE (a gate per task) and OMoE (one shared gate), one per level for CGC and PLE (task gates over
    their own and the shared experts, and the inner levels' shared gate). ValueError for a model without gates."""
    n = max(num_rows(x), 1)
    with torch.no_grad():
        layer = getattr(model, "mixture", None)
        if isinstance(layer, MMoELayer):
            count = layer.gate_weight.shape[0]
            total = torch.zeros(count, layer.num_experts, dtype=torch.float64)
            entropy = torch.zeros(count, dtype=torch.float64)
            reach = torch.full((count,), layer.num_experts)
            for h in _batches(model, x, batch_size):
                _accumulate(ops.gate_softmax(h, layer.gate_weight, layer.gate_bias, backend=layer.backend), reach,
                            total, entropy)
            names = task_names if count == len(task_names) else ["shared gate"]
            return [GateTable("", names, [str(e) for e in range(layer.num_experts)], total / n, entropy / n,
                              reach.tolist())]
        if isinstance(model, PLE):
            tables = []
            for index, level in enumerate(model.levels):
                T, S, Sh, E = level.num_tasks, level.num_specific_experts, level.num_shared_experts, level.num_experts
                count = T + (level.shared_gate_weight is not None)
                reach = torch.tensor([S + Sh] * T + [E] * (count - T))
                total, entropy = torch.zeros(count, E, dtype=torch.float64), torch.zeros(count, dtype=torch.float64)
                for h in _batches(model, x, batch_size):
                    for earlier in model.levels[:index]:
                        h = earlier(h)
                    _accumulate(level.full_gates(h), reach, total, entropy)
                experts = [f"{task_names[t]}:{i}" for t in range(T) for i in range(S)]
                experts += [f"shared:{i}" for i in range(Sh)]
                title = f"level {index}: " if len(model.levels) > 1 else ""
                tables.append(GateTable(title, task_names[:T] + ["shared"] * (count - T), experts, total / n,
                                        entropy / n, reach.tolist()))
            return tables
    raise ValueError(f"{type(model).__name__} has no gates (MMoE, OMoE, CGC and PLE have them)")




def is_gated(model: nn.Module) -> bool:
    """Whether ``gate_tables`` reads ``model``: an MMoE/OMoE layer named ``mixture``, or a CGC/PLE."""
    return isinstance(getattr(model, "mixture", None), MMoELayer) or isinstance(model, PLE)
