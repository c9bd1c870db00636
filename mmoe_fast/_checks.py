"""Input checks shared by every public op: one message format, naming the argument and the shape expected."""

from __future__ import annotations

import torch


def _tensor(name: str, t, ref: torch.Tensor | None) -> torch.Tensor:
    if isinstance(t, torch.fx.Proxy):
        raise TypeError(f"{name} is a torch.fx Proxy: torch.fx.symbolic_trace cannot trace mmoe_fast's fused ops "
                        "(they check shapes and pick a backend); use torch.export.export or torch.compile")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ref is not None:
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the input has dtype {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on device {t.device} but the input is on {ref.device}")
    return t


def _shape(name: str, t: torch.Tensor, expected: tuple, labels: str, batch_dim: bool = False) -> None:
    """Check t.shape against ``expected`` (None = any size); ``labels`` like "[B, T, E]".

    Every size must be at least 1, but the leading batch size when ``batch_dim`` (B = 0 is allowed).
    """
    if t.dim() != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected)):
        want = ", ".join("?" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} must have shape {labels} = [{want}], got {tuple(t.shape)}")
    if any(s < 1 for s in t.shape[1 if batch_dim else 0 :]):
        raise ValueError(f"{name} must have shape {labels} with every size but B at least 1, got {tuple(t.shape)}")


def check_gate(x, gate_weight, gate_bias) -> None:
    """x[B, D], gate_weight[T, D, E], gate_bias[T, E] | None."""
    _tensor("x", x, None)
    _shape("x", x, (None, None), "[B, D]", batch_dim=True)
    _tensor("gate_weight", gate_weight, x)
    _shape("gate_weight", gate_weight, (None, x.shape[1], None), "[T, D, E]")
    if gate_bias is not None:
        _tensor("gate_bias", gate_bias, x)
        _shape("gate_bias", gate_bias, tuple(gate_weight.shape[::2]), "[T, E]")


def check_experts(a, expert_weight, expert_bias, a_name: str = "a", weight_name: str = "expert_weight",
                  bias_name: str = "expert_bias") -> None:
    """a[B, K] or a[B, E, K], expert_weight[E, K, H], expert_bias[E, H] | None (``*_name``: the caller's names)."""
    _tensor(a_name, a, None)
    if a.dim() not in (2, 3):
        raise ValueError(f"{a_name} must have shape [B, K] or [B, E, K], got {tuple(a.shape)}")
    _shape(a_name, a, (None,) * a.dim(), "[B, K]" if a.dim() == 2 else "[B, E, K]", batch_dim=True)
    _tensor(weight_name, expert_weight, a)
    E = expert_weight.shape[0] if expert_weight.dim() == 3 else None
    if a.dim() == 3:
        _shape(weight_name, expert_weight, (a.shape[1], a.shape[2], None), "[E, K, H]")
    else:
        _shape(weight_name, expert_weight, (E, a.shape[1], None), "[E, K, H]")
    if expert_bias is not None:
        _tensor(bias_name, expert_bias, a)
        _shape(bias_name, expert_bias, (expert_weight.shape[0], expert_weight.shape[2]), "[E, H]")


def check_gates(gates, a: torch.Tensor, num_experts: int) -> None:
    """gates[B, T, E] for an input of batch B."""
    _tensor("gates", gates, a)
    _shape("gates", gates, (a.shape[0], None, num_experts), "[B, T, E]", batch_dim=True)
