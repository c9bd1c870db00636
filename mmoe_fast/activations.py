"""The contract's activations and their derivatives, in plain PyTorch (names and codes: ``contract``).

One place for the formulas: the batched reference backend uses them, and fused backends
are tested against the loop reference (which uses ``torch.nn.functional`` instead), so a
wrong derivative here cannot hide.
"""

from __future__ import annotations

import math

import torch

from .contract import ACTIVATIONS, check_activation

__all__ = ["ACTIVATIONS", "apply", "check_activation", "grad"]

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def apply(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """act(pre); ``gelu`` is the tanh form."""
    if activation == "relu":
        return torch.relu(pre)
    if activation == "silu":
        return pre * torch.sigmoid(pre)
    if activation == "gelu":
        return 0.5 * pre * (1.0 + torch.tanh(_GELU_C * (pre + _GELU_A * pre * pre * pre)))
    if activation == "identity":
        return pre
    raise ValueError(f"unknown activation {activation!r}")


def grad(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(pre) / d pre, elementwise."""
    if activation == "relu":
        return (pre > 0).to(pre.dtype)
    if activation == "silu":
        s = torch.sigmoid(pre)
        return s * (1.0 + pre * (1.0 - s))
    if activation == "gelu":
        th = torch.tanh(_GELU_C * (pre + _GELU_A * pre * pre * pre))
        return 0.5 * (1.0 + th) + 0.5 * pre * (1.0 - th * th) * _GELU_C * (
            1.0 + 3.0 * _GELU_A * pre * pre
        )
    if activation == "identity":
        return torch.ones_like(pre)
    raise ValueError(f"unknown activation {activation!r}")
