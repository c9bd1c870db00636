"""The public fused ops, registered with ``torch.library`` so autograd and ``torch.compile`` see them.

Each op is a ``custom_op`` with a separate backward op (itself a custom op), an exact-stride fake
implementation and ``register_autograd``. The op's ``backend`` argument is resolved inside the
implementation (``backends.resolve``), so compiled graphs keep one opaque node per op.
When no gradient is wanted and nothing is compiling, the public functions call the backend
directly: the dispatcher costs tens of microseconds per call, which dominates at small batches.
The backward ops recompute the expert pre-activations from the inputs (nothing else is saved).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks, activations, backends
from .backends import reference as _reference

__all__ = ["gate_softmax", "expert_mixture", "grouped_linear", "mmoe", "available_backends"]

available_backends = backends.available_backends


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _impl(backend: str, t: Tensor):
    """The backend module for these tensors; empty batches go to the reference, which handles them.

    The backend is resolved first in any case, so that one that cannot run is an error even at B = 0.
    """
    module = backends.resolve(backend, t.device, t.dtype)
    return _reference if t.shape[0] == 0 else module


def _direct(*tensors: Optional[Tensor]) -> bool:
    """True when a call may skip the dispatcher: no autograd wanted, nothing compiling."""
    if torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


# ---- gate_softmax -------------------------------------------------------------------------------


@torch.library.custom_op("mmoe_fast::gate_softmax", mutates_args=())
def _gate_softmax(x: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor], backend: str) -> Tensor:
    return _impl(backend, x).gate_softmax(_c(x), _c(gate_weight), _c(gate_bias))


@_gate_softmax.register_fake
def _(x, gate_weight, gate_bias, backend):
    return x.new_empty((x.shape[0], gate_weight.shape[0], gate_weight.shape[2]))


@torch.library.custom_op("mmoe_fast::gate_softmax_backward", mutates_args=())
def _gate_softmax_backward(
    grad: Tensor, gates: Tensor, x: Tensor, gate_weight: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _impl(backend, x).gate_softmax_backward(_c(grad), _c(gates), _c(x), _c(gate_weight))


@_gate_softmax_backward.register_fake
def _(grad, gates, x, gate_weight, backend):
    T, _, E = gate_weight.shape
    return x.new_empty(x.shape), gate_weight.new_empty(gate_weight.shape), x.new_empty((T, E))


def _gate_setup(ctx, inputs, output):
    x, gate_weight, gate_bias, backend = inputs
    ctx.save_for_backward(x, gate_weight, output)
    ctx.has_bias = gate_bias is not None
    ctx.backend = backend


def _gate_backward(ctx, grad):
    x, gate_weight, gates = ctx.saved_tensors
    dx, dwg, dbg = _gate_softmax_backward(grad, gates, x, gate_weight, ctx.backend)
    return dx, dwg, dbg if ctx.has_bias else None, None


_gate_softmax.register_autograd(_gate_backward, setup_context=_gate_setup)


def gate_softmax(
    x: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor] = None, *, backend: str = "auto"
) -> Tensor:
    """Every task's gate: ``G[B, T, E] = softmax_e(x[B, D] @ gate_weight[t] + gate_bias[t])``.

    ``gate_weight[T, D, E]``, ``gate_bias[T, E] | None``. The softmax is max-subtracted in fp32.
    """
    _checks.check_gate(x, gate_weight, gate_bias)
    backends.check_backend_name(backend)
    if _direct(x, gate_weight, gate_bias):
        return _impl(backend, x).gate_softmax(_c(x), _c(gate_weight), _c(gate_bias))
    return _gate_softmax(x, gate_weight, gate_bias, backend)


# ---- expert_mixture -----------------------------------------------------------------------------


@torch.library.custom_op("mmoe_fast::expert_mixture", mutates_args=())
def _expert_mixture(
    a: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gates: Tensor, activation: str, backend: str
) -> Tensor:
    return _impl(backend, a).expert_mixture(_c(a), _c(expert_weight), _c(expert_bias), _c(gates), activation)


@_expert_mixture.register_fake
def _(a, expert_weight, expert_bias, gates, activation, backend):
    return a.new_empty((gates.shape[1], a.shape[0], expert_weight.shape[2]))


@torch.library.custom_op("mmoe_fast::expert_mixture_backward", mutates_args=())
def _expert_mixture_backward(
    grad: Tensor, a: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gates: Tensor,
    activation: str, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _impl(backend, a).expert_mixture_backward(
        _c(grad), _c(a), _c(expert_weight), _c(expert_bias), _c(gates), activation
    )


@_expert_mixture_backward.register_fake
def _(grad, a, expert_weight, expert_bias, gates, activation, backend):
    E, _, H = expert_weight.shape
    return (a.new_empty(a.shape), expert_weight.new_empty(expert_weight.shape),
            a.new_empty((E, H)), gates.new_empty(gates.shape))


def _mixture_setup(ctx, inputs, output):
    a, expert_weight, expert_bias, gates, activation, backend = inputs
    ctx.save_for_backward(a, expert_weight, expert_bias, gates)
    ctx.has_bias = expert_bias is not None
    ctx.activation, ctx.backend = activation, backend


def _mixture_backward(ctx, grad):
    a, w, b, gates = ctx.saved_tensors
    da, dw, db, dg = _expert_mixture_backward(grad, a, w, b, gates, ctx.activation, ctx.backend)
    return da, dw, db if ctx.has_bias else None, dg, None, None


_expert_mixture.register_autograd(_mixture_backward, setup_context=_mixture_setup)


def expert_mixture(
    a: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gates: Tensor, *,
    activation: str = "relu", backend: str = "auto",
) -> Tensor:
    """Every task's mixture of expert outputs: ``m[T, B, H]``.

    ``m[t, b] = sum_e gates[b, t, e] * act(a_e[b] @ expert_weight[e] + expert_bias[e])`` with
    ``a[B, K]`` (one input shared by the experts) or ``a[B, E, K]`` (one per expert),
    ``expert_weight[E, K, H]``, ``expert_bias[E, H] | None``, ``gates[B, T, E]``.
    """
    _checks.check_experts(a, expert_weight, expert_bias)
    _checks.check_gates(gates, a, expert_weight.shape[0])
    activations.check_activation(activation)
    backends.check_backend_name(backend)
    if _direct(a, expert_weight, expert_bias, gates):
        return _impl(backend, a).expert_mixture(_c(a), _c(expert_weight), _c(expert_bias), _c(gates), activation)
    return _expert_mixture(a, expert_weight, expert_bias, gates, activation, backend)


# ---- grouped_linear (hidden expert layers) ------------------------------------------------------


@torch.library.custom_op("mmoe_fast::grouped_linear", mutates_args=())
def _grouped_linear(a: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, backend: str) -> Tensor:
    return _impl(backend, a).grouped_linear(_c(a), _c(weight), _c(bias), activation)


@_grouped_linear.register_fake
def _(a, weight, bias, activation, backend):
    return a.new_empty((a.shape[0], weight.shape[0], weight.shape[2]))


@torch.library.custom_op("mmoe_fast::grouped_linear_backward", mutates_args=())
def _grouped_linear_backward(
    grad: Tensor, a: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _impl(backend, a).grouped_linear_backward(_c(grad), _c(a), _c(weight), _c(bias), activation)


@_grouped_linear_backward.register_fake
def _(grad, a, weight, bias, activation, backend):
    E, _, N = weight.shape
    return a.new_empty(a.shape), weight.new_empty(weight.shape), a.new_empty((E, N))


def _grouped_setup(ctx, inputs, output):
    a, weight, bias, activation, backend = inputs
    ctx.save_for_backward(a, weight, bias)
    ctx.has_bias = bias is not None
    ctx.activation, ctx.backend = activation, backend


def _grouped_backward(ctx, grad):
    a, w, b = ctx.saved_tensors
    da, dw, db = _grouped_linear_backward(grad, a, w, b, ctx.activation, ctx.backend)
    return da, dw, db if ctx.has_bias else None, None, None


_grouped_linear.register_autograd(_grouped_backward, setup_context=_grouped_setup)


def grouped_linear(
    a: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: str = "relu", backend: str = "auto"
) -> Tensor:
    """One hidden layer of every expert: ``out[B, E, N] = act(a_e @ weight[e] + bias[e])``.

    ``a[B, K]`` (shared input) or ``a[B, E, K]``, ``weight[E, K, N]``, ``bias[E, N] | None``.
    """
    _checks.check_experts(a, weight, bias, weight_name="weight", bias_name="bias")
    activations.check_activation(activation)
    backends.check_backend_name(backend)
    if _direct(a, weight, bias):
        return _impl(backend, a).grouped_linear(_c(a), _c(weight), _c(bias), activation)
    return _grouped_linear(a, weight, bias, activation, backend)


# ---- mmoe: gates and mixture in one op ----------------------------------------------------------


def _mmoe_forward(be, x, w, b, wg, bg, activation):
    fused = getattr(be, "mmoe", None)
    if fused is not None:
        return fused(x, w, b, wg, bg, activation)
    return be.expert_mixture(x, w, b, be.gate_softmax(x, wg, bg), activation)


@torch.library.custom_op("mmoe_fast::mmoe", mutates_args=())
def _mmoe(
    x: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gate_weight: Tensor,
    gate_bias: Optional[Tensor], activation: str, backend: str,
) -> Tensor:
    return _mmoe_forward(_impl(backend, x), _c(x), _c(expert_weight), _c(expert_bias), _c(gate_weight),
                         _c(gate_bias), activation)


@_mmoe.register_fake
def _(x, expert_weight, expert_bias, gate_weight, gate_bias, activation, backend):
    return x.new_empty((gate_weight.shape[0], x.shape[0], expert_weight.shape[2]))


@torch.library.custom_op("mmoe_fast::mmoe_backward", mutates_args=())
def _mmoe_backward(
    grad: Tensor, x: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gate_weight: Tensor,
    gate_bias: Optional[Tensor], activation: str, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    be = _impl(backend, x)
    grad, x, w, b, wg, bg = map(_c, (grad, x, expert_weight, expert_bias, gate_weight, gate_bias))
    fused = getattr(be, "mmoe_backward", None)
    if fused is not None:
        return fused(grad, x, w, b, wg, bg, activation)
    gates = be.gate_softmax(x, wg, bg)  # recomputed: cheaper than saving [B, T, E] through autograd
    dx, dw, db, dgates = be.expert_mixture_backward(grad, x, w, b, gates, activation)
    dx_gate, dwg, dbg = be.gate_softmax_backward(dgates, gates, x, wg)
    return dx + dx_gate, dw, db, dwg, dbg


@_mmoe_backward.register_fake
def _(grad, x, expert_weight, expert_bias, gate_weight, gate_bias, activation, backend):
    T, _, E = gate_weight.shape
    return (x.new_empty(x.shape), expert_weight.new_empty(expert_weight.shape),
            x.new_empty((expert_weight.shape[0], expert_weight.shape[2])),
            gate_weight.new_empty(gate_weight.shape), x.new_empty((T, E)))


def _mmoe_setup(ctx, inputs, output):
    x, w, b, wg, bg, activation, backend = inputs
    ctx.save_for_backward(x, w, b, wg, bg)
    ctx.has_bias = (b is not None, bg is not None)
    ctx.activation, ctx.backend = activation, backend


def _mmoe_grad(ctx, grad):
    x, w, b, wg, bg = ctx.saved_tensors
    dx, dw, db, dwg, dbg = _mmoe_backward(grad, x, w, b, wg, bg, ctx.activation, ctx.backend)
    return dx, dw, db if ctx.has_bias[0] else None, dwg, dbg if ctx.has_bias[1] else None, None, None


_mmoe.register_autograd(_mmoe_grad, setup_context=_mmoe_setup)


def mmoe(
    x: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gate_weight: Tensor,
    gate_bias: Optional[Tensor], *, activation: str = "relu", backend: str = "auto",
) -> Tensor:
    """One MMoE layer with single-layer experts: ``expert_mixture(x, W, b, gate_softmax(x, Wg, bg))``.

    ``x[B, D]``, ``expert_weight[E, D, H]``, ``expert_bias[E, H] | None``, ``gate_weight[T, D, E]``,
    ``gate_bias[T, E] | None``; returns ``m[T, B, H]``.
    """
    _checks.check_gate(x, gate_weight, gate_bias)
    _checks.check_experts(x, expert_weight, expert_bias, a_name="x")
    if expert_weight.shape[0] != gate_weight.shape[2]:
        raise ValueError(
            f"gate_weight must have shape [T, D, E] with E = {expert_weight.shape[0]} experts "
            f"(expert_weight's first dimension), got {tuple(gate_weight.shape)}"
        )
    activations.check_activation(activation)
    backends.check_backend_name(backend)
    if _direct(x, expert_weight, expert_bias, gate_weight, gate_bias):
        return _mmoe_forward(_impl(backend, x), *map(_c, (x, expert_weight, expert_bias, gate_weight, gate_bias)),
                             activation)
    return _mmoe(x, expert_weight, expert_bias, gate_weight, gate_bias, activation, backend)
