"""The public fused ops, registered with ``torch.library`` so autograd and ``torch.compile`` see them.

Each op is one plain function (``_gate_softmax_forward`` and so on) that resolves the backend and runs it.
``_define`` registers it as a ``custom_op`` with a separate backward op (itself a custom op), an exact-stride
fake implementation and ``register_autograd``; the backend is resolved inside the op, so compiled graphs
keep one opaque node per op. When no gradient is wanted and nothing is compiling or tracing, the public
functions call the same plain function directly: the dispatcher costs tens of microseconds per call,
which dominates at small batches. The backward ops get only the forward's inputs (and the gates'
output) and recompute the expert pre-activations (docs/design.md: recompute, not save).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from . import _checks, backends, contract
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


def _call(op, forward: Callable, *args):
    """``forward(*args)`` when no autograd is wanted and nothing compiles or traces, else the registered op."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return op(*args)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args):
        return op(*args)
    return forward(*args)


def _define(name: str, forward: Callable, fake: Callable, backward: Callable, backward_fake: Callable, *,
            tensors: int, save_output: bool = False):
    """Register ``forward`` as ``mmoe_fast::<name>`` and ``backward`` as ``mmoe_fast::<name>_backward``, linked.

    The first ``tensors`` arguments of ``forward`` are its tensors: they are saved for the backward (with the
    output when ``save_output``); the others (activation, backend) are passed on. The backward op is called as
    ``backward(grad, *tensors, [output], *others)`` and returns one gradient per tensor argument; a gradient
    that no input needs (``ctx.needs_input_grad``, a missing bias) is dropped.
    """
    op = torch.library.custom_op(f"mmoe_fast::{name}", mutates_args=())(forward)
    op.register_fake(fake)
    backward_op = torch.library.custom_op(f"mmoe_fast::{name}_backward", mutates_args=())(backward)
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensors], *((output,) if save_output else ()))
        ctx.others = inputs[tensors:]

    def grad(ctx, grad_output):
        grads = backward_op(grad_output, *ctx.saved_tensors, *ctx.others)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), *(None,) * len(ctx.others))

    op.register_autograd(grad, setup_context=setup_context)
    return op, backward_op


# ---- gate_softmax -------------------------------------------------------------------------------


def _gate_softmax_forward(x: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor], backend: str) -> Tensor:
    return _impl(backend, x).gate_softmax(_c(x), _c(gate_weight), _c(gate_bias))


def _gate_softmax_fake(x, gate_weight, gate_bias, backend):
    return x.new_empty((x.shape[0], gate_weight.shape[0], gate_weight.shape[2]))


def _gate_softmax_backward(
    grad: Tensor, x: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor], gates: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _impl(backend, x).gate_softmax_backward(_c(grad), _c(gates), _c(x), _c(gate_weight))


def _gate_softmax_backward_fake(grad, x, gate_weight, gate_bias, gates, backend):
    T, _, E = gate_weight.shape
    return x.new_empty(x.shape), gate_weight.new_empty(gate_weight.shape), x.new_empty((T, E))


_gate_softmax, _gate_softmax_bwd = _define("gate_softmax", _gate_softmax_forward, _gate_softmax_fake,
                                           _gate_softmax_backward, _gate_softmax_backward_fake, tensors=3,
                                           save_output=True)


def gate_softmax(
    x: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor] = None, *, backend: str = "auto"
) -> Tensor:
    """Every task's gate: ``G[B, T, E] = softmax_e(x[B, D] @ gate_weight[t] + gate_bias[t])``.

    ``gate_weight[T, D, E]``, ``gate_bias[T, E] | None``. The softmax is max-subtracted in fp32.
    """
    _checks.check_gate(x, gate_weight, gate_bias)
    backends.check_backend_name(backend)
    return _call(_gate_softmax, _gate_softmax_forward, x, gate_weight, gate_bias, backend)


# ---- expert_mixture -----------------------------------------------------------------------------


def _expert_mixture_forward(
    a: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gates: Tensor, activation: str, backend: str
) -> Tensor:
    return _impl(backend, a).expert_mixture(_c(a), _c(expert_weight), _c(expert_bias), _c(gates), activation)


def _expert_mixture_fake(a, expert_weight, expert_bias, gates, activation, backend):
    return a.new_empty((gates.shape[1], a.shape[0], expert_weight.shape[2]))


def _expert_mixture_backward(
    grad: Tensor, a: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gates: Tensor,
    activation: str, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _impl(backend, a).expert_mixture_backward(
        _c(grad), _c(a), _c(expert_weight), _c(expert_bias), _c(gates), activation
    )


def _expert_mixture_backward_fake(grad, a, expert_weight, expert_bias, gates, activation, backend):
    E, _, H = expert_weight.shape
    return (a.new_empty(a.shape), expert_weight.new_empty(expert_weight.shape),
            a.new_empty((E, H)), gates.new_empty(gates.shape))


_expert_mixture, _expert_mixture_bwd = _define("expert_mixture", _expert_mixture_forward, _expert_mixture_fake,
                                               _expert_mixture_backward, _expert_mixture_backward_fake, tensors=4)


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
    contract.check_activation(activation)
    backends.check_backend_name(backend)
    return _call(_expert_mixture, _expert_mixture_forward, a, expert_weight, expert_bias, gates, activation, backend)


# ---- grouped_linear (hidden expert layers) ------------------------------------------------------


def _grouped_linear_forward(a: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, backend: str) -> Tensor:
    return _impl(backend, a).grouped_linear(_c(a), _c(weight), _c(bias), activation)


def _grouped_linear_fake(a, weight, bias, activation, backend):
    return a.new_empty((a.shape[0], weight.shape[0], weight.shape[2]))


def _grouped_linear_backward(
    grad: Tensor, a: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _impl(backend, a).grouped_linear_backward(_c(grad), _c(a), _c(weight), _c(bias), activation)


def _grouped_linear_backward_fake(grad, a, weight, bias, activation, backend):
    E, _, N = weight.shape
    return a.new_empty(a.shape), weight.new_empty(weight.shape), a.new_empty((E, N))


_grouped_linear, _grouped_linear_bwd = _define("grouped_linear", _grouped_linear_forward, _grouped_linear_fake,
                                               _grouped_linear_backward, _grouped_linear_backward_fake, tensors=3)


def grouped_linear(
    a: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: str = "relu", backend: str = "auto"
) -> Tensor:
    """One hidden layer of every expert: ``out[B, E, N] = act(a_e @ weight[e] + bias[e])``.

    ``a[B, K]`` (shared input) or ``a[B, E, K]``, ``weight[E, K, N]``, ``bias[E, N] | None``.
    """
    _checks.check_experts(a, weight, bias, weight_name="weight", bias_name="bias")
    contract.check_activation(activation)
    backends.check_backend_name(backend)
    return _call(_grouped_linear, _grouped_linear_forward, a, weight, bias, activation, backend)


# ---- mmoe: gates and mixture in one op ----------------------------------------------------------


def _mmoe_forward(
    x: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gate_weight: Tensor,
    gate_bias: Optional[Tensor], activation: str, backend: str,
) -> Tensor:
    be = _impl(backend, x)
    x, w, wg = x.contiguous(), expert_weight.contiguous(), gate_weight.contiguous()
    b, bg = _c(expert_bias), _c(gate_bias)
    fused, _ = contract.fused_mmoe(be)
    if fused is not None:
        return fused(x, w, b, wg, bg, activation)
    return be.expert_mixture(x, w, b, be.gate_softmax(x, wg, bg), activation)


def _mmoe_fake(x, expert_weight, expert_bias, gate_weight, gate_bias, activation, backend):
    return x.new_empty((gate_weight.shape[0], x.shape[0], expert_weight.shape[2]))


def _mmoe_backward(
    grad: Tensor, x: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gate_weight: Tensor,
    gate_bias: Optional[Tensor], activation: str, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    be = _impl(backend, x)
    grad, x, w, wg = grad.contiguous(), x.contiguous(), expert_weight.contiguous(), gate_weight.contiguous()
    b, bg = _c(expert_bias), _c(gate_bias)
    _, fused = contract.fused_mmoe(be)
    if fused is not None:
        return fused(grad, x, w, b, wg, bg, activation)
    gates = be.gate_softmax(x, wg, bg)  # recomputed: cheaper than saving [B, T, E] through autograd
    dx, dw, db, dgates = be.expert_mixture_backward(grad, x, w, b, gates, activation)
    dx_gate, dwg, dbg = be.gate_softmax_backward(dgates, gates, x, wg)
    return dx + dx_gate, dw, db, dwg, dbg


def _mmoe_backward_fake(grad, x, expert_weight, expert_bias, gate_weight, gate_bias, activation, backend):
    T, _, E = gate_weight.shape
    return (x.new_empty(x.shape), expert_weight.new_empty(expert_weight.shape),
            x.new_empty((expert_weight.shape[0], expert_weight.shape[2])),
            gate_weight.new_empty(gate_weight.shape), x.new_empty((T, E)))


_mmoe, _mmoe_bwd = _define("mmoe", _mmoe_forward, _mmoe_fake, _mmoe_backward, _mmoe_backward_fake, tensors=5)


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
    contract.check_activation(activation)
    backends.check_backend_name(backend)
    return _call(_mmoe, _mmoe_forward, x, expert_weight, expert_bias, gate_weight, gate_bias, activation, backend)
