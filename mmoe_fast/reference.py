"""The oracle: MMoE written the way the paper reads, one expert and one task at a time.

Deliberately plain (Python loops, ``torch.nn.functional`` activations, autograd for gradients),
so that it shares no code with any backend. Tests and benchmarks compare everything against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_ACT = {
    "relu": F.relu,
    "silu": F.silu,
    "gelu": lambda t: F.gelu(t, approximate="tanh"),
    "identity": lambda t: t,
}


def gate_softmax(x: Tensor, gate_weight: Tensor, gate_bias: Tensor | None = None) -> Tensor:
    """G[B, T, E]: task t's softmax over experts of ``x @ gate_weight[t] + gate_bias[t]``."""
    gates = []
    for t in range(gate_weight.shape[0]):
        logits = x @ gate_weight[t]
        if gate_bias is not None:
            logits = logits + gate_bias[t]
        wide = torch.promote_types(logits.dtype, torch.float32)  # fp32 softmax for half inputs
        gates.append(torch.softmax(logits.to(wide), dim=-1).to(x.dtype))
    return torch.stack(gates, dim=1)


def expert_output(a: Tensor, weight: Tensor, bias: Tensor | None, e: int, activation: str) -> Tensor:
    """act(a_e @ weight[e] + bias[e]) for one expert; ``a`` is [B, K] or [B, E, K]."""
    a_e = a if a.dim() == 2 else a[:, e]
    pre = a_e @ weight[e]
    if bias is not None:
        pre = pre + bias[e]
    return _ACT[activation](pre)


def expert_mixture(a: Tensor, weight: Tensor, bias: Tensor | None, gates: Tensor, activation: str = "relu") -> Tensor:
    """m[T, B, H] = sum_e gates[:, t, e] * expert_e(a), looping over tasks and experts."""
    outputs = [expert_output(a, weight, bias, e, activation) for e in range(weight.shape[0])]
    mixtures = []
    for t in range(gates.shape[1]):
        m = torch.zeros_like(outputs[0])
        for e, f in enumerate(outputs):
            m = m + gates[:, t, e : e + 1] * f
        mixtures.append(m)
    return torch.stack(mixtures)


def grouped_linear(a: Tensor, weight: Tensor, bias: Tensor | None, activation: str = "relu") -> Tensor:
    """out[B, E, N]: every expert's layer, one expert at a time."""
    return torch.stack([expert_output(a, weight, bias, e, activation) for e in range(weight.shape[0])], dim=1)


def mmoe(
    x: Tensor, expert_weight: Tensor, expert_bias: Tensor | None, gate_weight: Tensor,
    gate_bias: Tensor | None, activation: str = "relu",
) -> Tensor:
    """m[T, B, H] of an MMoE layer with single-layer experts."""
    return expert_mixture(x, expert_weight, expert_bias, gate_softmax(x, gate_weight, gate_bias), activation)


def mmoe_layer(
    x: Tensor, expert_weights: Sequence[Tensor], expert_biases: Sequence[Tensor | None], gate_weight: Tensor,
    gate_bias: Tensor | None, activation: str = "relu",
) -> Tensor:
    """m[T, B, H] of an MMoE layer with multi-layer experts (``expert_weights[l]`` is [E, K_l, N_l])."""
    h = x
    for w, b in zip(expert_weights[:-1], expert_biases[:-1]):
        h = grouped_linear(h, w, b, activation)
    return expert_mixture(h, expert_weights[-1], expert_biases[-1], gate_softmax(x, gate_weight, gate_bias), activation)
