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

import contextlib
from collections.abc import Callable
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import _checks, backends, contract
from .backends import reference as _reference

__all__ = ["gate_softmax", "expert_mixture", "grouped_linear", "mmoe", "available_backends"]

available_backends = backends.available_backends
# One cheap check before the per-device ones (a private name, so absent in some torch: then always look).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _dense(t: Tensor) -> Tensor:
    """A contiguous tensor whose memory holds its values (a negative-bit view's does not: kernels read memory)."""
    return t.resolve_neg().contiguous()


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else _dense(t)


def _c_in(be, t: Tensor) -> Tensor:
    """``_c(t)``, but an expert-major ``t[B, E, K]`` (a hidden layer's output as the one-node training path keeps
    it) stays as it is for a backend that reads those in place (``READS_EXPERT_MAJOR``)."""
    if getattr(be, "READS_EXPERT_MAJOR", False) and be.is_expert_major(t) and not t.is_neg():
        return t
    return _dense(t)


def _input_grad(da: Optional[Tensor], wanted: bool, like: Tensor) -> Tensor:
    """The backward op's first output: the input gradient, or an empty tensor when nothing needs it (a backend
    may then skip computing it, as ``input_grad=False`` lets it)."""
    if not wanted:
        return like.new_empty(0)
    assert da is not None, "a backend returned no input gradient although one was wanted"
    return da


def _input_grad_fake(like: Tensor, wanted: bool) -> Tensor:
    return like.new_empty(like.shape if wanted else (0,))


def _impl(backend: str, t: Tensor):
    """The backend module for these tensors; empty batches go to the reference, which handles them.

    The backend is resolved first in any case, so that one that cannot run is an error even at B = 0.
    """
    module = backends.resolve(backend, t.device, t.dtype)
    return _reference if t.shape[0] == 0 else module


def _autocast(*tensors):
    """Under ``torch.autocast`` for the tensors' device: every floating tensor cast to the autocast dtype.

    The fused ops are matmul-like, so they take part in autocast as ``torch.mm`` does; ``backend="auto"`` then
    picks a backend for that dtype (on CPU, bf16 runs on the reference backend). Checked before the inputs.
    """
    first = tensors[0]
    if not _any_autocast() or not isinstance(first, Tensor) or first.device.type not in ("cpu", "cuda"):
        return tensors
    if not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors)


def _call(op, transformable, eager, forward: Callable, *args, recompute: bool = True):
    """``forward(*args)`` when no autograd is wanted and nothing compiles, traces or transforms, else the op.

    Eager autograd goes through ``eager`` (an ``autograd.Function`` calling the backend directly: the custom
    op's dispatch and autograd wrapper cost tens of microseconds per call, a training step's worth at small
    sizes), which saves the pre-activations for its backward unless ``recompute``. Compiled and traced graphs
    keep the op itself (its backward recomputes them). Under ``torch.func`` transforms and forward-mode AD the
    op runs through ``transformable`` (an ``autograd.Function``, which those support: the custom op's own
    autograd does not). Under ``torch.autocast`` the public functions have cast the inputs already
    (``_autocast``), and the op runs with autocast off, so its numerics are those of the same inputs outside.
    """
    if _decomposing or _in_onnx_export():  # ATen ops only: the reference's formulas
        return _DECOMPOSED[op](*args)
    if _any_autocast() and args[0].device.type in ("cpu", "cuda") and torch.is_autocast_enabled(args[0].device.type):
        with torch.autocast(args[0].device.type, enabled=False):
            return _call(op, transformable, eager, forward, *args, recompute=recompute)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # first: compiled graphs keep the op itself
        return op(*args)
    if torch._C._functorch.peek_interpreter_stack() is not None or _forward_ad._current_level >= 0:
        return transformable.apply(*args)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args):
        return eager.apply(recompute, *args)
    return forward(*args)


def _eager(name: str, train: Callable, backward: Callable, backward_op, *, tensors: int, op_takes_saved: bool = False):
    """The eager-autograd path of ``mmoe_fast::<name>``: an ``autograd.Function`` around the backend's own calls.

    ``train(recompute, *args) -> (out, saved)``: the forward, and what it keeps for the backward (the
    pre-activations, or nothing when ``recompute`` or the backend keeps nothing); ``backward(grad, *args,
    input_grad, saved)`` returns one gradient per tensor argument. Under ``create_graph`` the backward runs
    through ``backward_op`` (recomputing; ``op_takes_saved``: it takes the saved tensors after the inputs, as the
    gate's takes G), whose autograd refuses a second derivative by name.
    """

    def forward(ctx, recompute, *args):
        out, saved = train(recompute, *args)
        ctx.save_for_backward(*args[:tensors], *saved)
        ctx.others = args[tensors:]
        return out

    def grad(ctx, grad_output):
        inputs, saved = ctx.saved_tensors[:tensors], ctx.saved_tensors[tensors:]
        wanted = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():
            grads = backward_op(grad_output, *inputs, *(saved if op_takes_saved else ()), *ctx.others, wanted[0])
        else:
            grads = backward(grad_output, *inputs, *ctx.others, wanted[0], tuple(saved))
        return (None, *(g if need else None for g, need in zip(grads, wanted)), *(None,) * len(ctx.others))

    return type(f"{name}_eager", (torch.autograd.Function,), dict(forward=staticmethod(forward),
                                                                   backward=staticmethod(grad)))


def _looped(op):
    """A vmap rule for ``op``: one call per slice of the vmapped dimension, the results stacked (correct for any
    backend)."""

    def rule(info, in_dims, *args):
        outs = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
                for i in range(info.batch_size)]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0

    return rule


_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _replicas_vmap(op, kernel: str, backend_at: int):
    """A vmap rule for ``op`` that runs the backend's ``<kernel>_replicas`` (every slice of the vmapped dimension
    in one call: S small models fill the cores) where the backend has it, else one call per slice. The backend
    name is argument ``backend_at`` (from the end when negative); the tensors (or None) come before the first
    non-tensor argument."""
    loop = _looped(op)

    def rule(info, in_dims, *args):
        S = info.batch_size
        n = next(i for i, a in enumerate(args) if a is not None and not isinstance(a, Tensor))
        at = backend_at % len(args)
        be = backends.resolve(args[at], args[0].device, args[0].dtype)
        replicas = getattr(be, f"{kernel}_replicas", None)
        if (replicas is None or S < 1 or any(a is not None and a.numel() == 0 for a in args[:n])
                or any(a is not None and _wrapped(a) for a in args[:n])):
            # empty inputs: the reference backend's, as outside vmap; tensors still wrapped by an outer transform
            # (nested vmap, grad of vmap): the op per slice, which that transform then handles
            return loop(info, in_dims, *args)
        tensors = [None if a is None else _dense(a.movedim(d, 0) if d is not None else a)
                   for a, d in zip(args[:n], in_dims[:n])]
        per = tuple(d is not None for d in in_dims[:n])
        others = [a for i, a in enumerate(args[n:], n) if i != at]
        out = replicas(S, per, *tensors, *others)
        return out, ((0,) * len(out) if isinstance(out, tuple) else 0)

    op.register_vmap(rule)


# Each op's plain-PyTorch form (the reference backend's formulas), which ONNX export traces in its place.
_DECOMPOSED: dict = {}
_decomposing = False


@contextlib.contextmanager
def decomposed():
    """Within it the fused ops run as their plain-PyTorch formulas (ATen ops only, the reference backend's):
    a ``torch.export`` archive, a trace or a graph made there holds no ``mmoe_fast::`` op, so it loads and runs
    where mmoe_fast is not installed. (ONNX exports do this by themselves.) Not thread-local: do not train in
    another thread meanwhile, which would run the formulas too (correct, but slower)."""
    global _decomposing
    before, _decomposing = _decomposing, True
    try:
        yield
    finally:
        _decomposing = before


def is_decomposing() -> bool:
    """Whether the fused ops run as their plain-PyTorch formulas now (``decomposed()``, or an ONNX export)."""
    return _decomposing or _in_onnx_export()


_onnx_flags: tuple | None = None


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()`` without its two imports per call (1.6 vs 0.3 us here, on every op call): the
    flags it reads, found once; the public function where this torch keeps them elsewhere."""
    global _onnx_flags
    if torch.compiler.is_compiling():  # what dynamo can trace (it skips the exporters' internals)
        return torch.onnx.is_in_onnx_export()
    if _onnx_flags is None:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

            _onnx_flags = (_flags, GLOBALS) if hasattr(_flags, "_is_onnx_exporting") and hasattr(
                GLOBALS, "in_onnx_export") else ()
        except ImportError:
            _onnx_flags = ()
    if not _onnx_flags:
        return torch.onnx.is_in_onnx_export()
    flags, glob = _onnx_flags
    return bool(glob.in_onnx_export or flags._is_onnx_exporting)


def _define(name: str, forward: Callable, fake: Callable, backward: Callable, backward_fake: Callable,
            tangent: Callable, *, tensors: int, save_output: bool = False):
    """Register ``forward`` as ``mmoe_fast::<name>`` and ``backward`` as ``mmoe_fast::<name>_backward``, linked.

    The first ``tensors`` arguments of ``forward`` are its tensors: they are saved for the backward (with the
    output when ``save_output``); the others (activation, backend) are passed on. The backward op is called as
    ``backward(grad, *tensors, [output], *others, input_grad)`` and returns one gradient per tensor argument;
    ``input_grad`` says whether the first input needs its gradient (data rarely does: a third of the backward's
    GEMM work is skipped then). A gradient no input needs (``ctx.needs_input_grad``, a missing bias) is
    dropped. Both ops get a vmap rule.
    Returns ``(op, backward_op, transformable)``: the last is the same op as an ``autograd.Function`` for
    ``torch.func`` transforms and forward-mode AD, whose tangents come from ``tangent(*args)`` (plain
    differentiable PyTorch, the reference backend's formulas) through ``torch.func.jvp``.
    """
    op = torch.library.custom_op(f"mmoe_fast::{name}", mutates_args=())(forward)
    _DECOMPOSED[op] = tangent
    op.register_fake(fake)
    backward_op = torch.library.custom_op(f"mmoe_fast::{name}_backward", mutates_args=())(backward)
    backward_op.register_fake(backward_fake)
    _replicas_vmap(op, name, -1)  # (..., backend)
    _replicas_vmap(backward_op, f"{name}_backward", -2)  # (..., backend, input_grad)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensors], *((output,) if save_output else ()))
        ctx.others = inputs[tensors:]

    def grad(ctx, grad_output):
        grads = backward_op(grad_output, *ctx.saved_tensors, *ctx.others, ctx.needs_input_grad[0])
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), *(None,) * len(ctx.others))

    op.register_autograd(grad, setup_context=setup_context)

    def backward_below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return backward_op(*args)

    def no_second_derivative(ctx, *grads):
        raise RuntimeError(f"second derivatives of mmoe_fast::{name} are not supported (its backward op is not "
                           "differentiable)")

    # Regular autograd's double backward (create_graph=True, then grad again) ends at the backward op.
    backward_op.register_autograd(no_second_derivative)
    once = type(f"{name}_backward_function", (torch.autograd.Function,), dict(
        forward=staticmethod(backward_below_autograd), setup_context=staticmethod(lambda ctx, inputs, output: None),
        backward=staticmethod(no_second_derivative), jvp=staticmethod(no_second_derivative),
        generate_vmap_rule=True))

    def transform_grad(ctx, grad_output):
        grads = once.apply(grad_output, *ctx.saved_tensors, *ctx.others, ctx.needs_input_grad[0])
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), *(None,) * len(ctx.others))

    def jvp_setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:tensors])
        ctx.primals = inputs[:tensors]

    def jvp(ctx, *tangents):
        if torch._C._functorch.peek_interpreter_stack() is not None:  # inside torch.func: nest its jvp
            primals = [p for p in ctx.primals if p is not None]
            given = [torch.zeros_like(p) if t is None else t for p, t in zip(ctx.primals, tangents) if p is not None]

            def f(*args):
                it = iter(args)
                return tangent(*(None if p is None else next(it) for p in ctx.primals), *ctx.others)

            return torch.func.jvp(f, tuple(primals), tuple(given))[1]
        # Plain forward-mode AD cannot nest: J v by the double-vjp identity on the differentiable formulas
        # (u -> J^T u is linear, and its vjp with v is J v).
        present = [(p.detach().requires_grad_(), t) for p, t in zip(ctx.primals, tangents) if p is not None]
        with torch.enable_grad():
            it = iter(present)
            out = tangent(*(None if p is None else next(it)[0] for p in ctx.primals), *ctx.others)
            u = torch.zeros_like(out, requires_grad=True)
            vjps = torch.autograd.grad(out, [p for p, _ in present], u, create_graph=True, allow_unused=True)
            pairs = [(g, t) for g, (_, t) in zip(vjps, present) if g is not None and t is not None]
            if not pairs:
                return torch.zeros_like(out)
            return torch.autograd.grad([g for g, _ in pairs], u, [t for _, t in pairs])[0]

    def below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():  # the Function is the autograd node; skip the op's own
            return op(*args)

    transformable = type(f"{name}_function", (torch.autograd.Function,), dict(
        forward=staticmethod(below_autograd), setup_context=staticmethod(jvp_setup),
        backward=staticmethod(transform_grad), jvp=staticmethod(jvp), generate_vmap_rule=True))
    return op, backward_op, transformable


# ---- gate_softmax -------------------------------------------------------------------------------


def _gate_softmax_forward(x: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor], backend: str) -> Tensor:
    return _impl(backend, x).gate_softmax(_c(x), _c(gate_weight), _c(gate_bias))


def _gate_softmax_fake(x, gate_weight, gate_bias, backend):
    return x.new_empty((x.shape[0], gate_weight.shape[0], gate_weight.shape[2]))


def _gate_softmax_backward(
    grad: Tensor, x: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor], gates: Tensor, backend: str,
    input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dwg, dbg = _impl(backend, x).gate_softmax_backward(_c(grad), _c(gates), _c(x), _c(gate_weight),
                                                           input_grad=input_grad)
    return _input_grad(dx, input_grad, x), dwg, dbg


def _gate_softmax_backward_fake(grad, x, gate_weight, gate_bias, gates, backend, input_grad):
    T, _, E = gate_weight.shape
    return _input_grad_fake(x, input_grad), gate_weight.new_empty(gate_weight.shape), x.new_empty((T, E))


_gate_softmax, _gate_softmax_bwd, _GateSoftmax = _define(
    "gate_softmax", _gate_softmax_forward, _gate_softmax_fake, _gate_softmax_backward, _gate_softmax_backward_fake,
    lambda x, wg, bg, backend: _reference.gate_softmax(x, wg, bg), tensors=3, save_output=True)


def _gate_softmax_train(recompute, x, gate_weight, gate_bias, backend):
    G = _gate_softmax_forward(x, gate_weight, gate_bias, backend)
    return G, (G,)


def _gate_softmax_eager_backward(grad, x, gate_weight, gate_bias, backend, input_grad, saved):
    return _gate_softmax_backward(grad, x, gate_weight, gate_bias, saved[0], backend, input_grad)


_GateSoftmaxEager = _eager("gate_softmax", _gate_softmax_train, _gate_softmax_eager_backward, _gate_softmax_bwd,
                           tensors=3, op_takes_saved=True)


def gate_softmax(
    x: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor] = None, *, backend: str = "auto"
) -> Tensor:
    """Every task's gate: ``G[B, T, E] = softmax_e(x[B, D] @ gate_weight[t] + gate_bias[t])``.

    ``gate_weight[T, D, E]``, ``gate_bias[T, E] | None``. The softmax is max-subtracted in fp32.
    """
    x, gate_weight, gate_bias = _autocast(x, gate_weight, gate_bias)
    _checks.check_gate(x, gate_weight, gate_bias)
    backends.check_backend_name(backend)
    return _call(_gate_softmax, _GateSoftmax, _GateSoftmaxEager, _gate_softmax_forward, x, gate_weight, gate_bias,
                 backend)


# ---- expert_mixture -----------------------------------------------------------------------------


def _expert_mixture_forward(
    a: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gates: Tensor, activation: str, backend: str
) -> Tensor:
    return _impl(backend, a).expert_mixture(_c(a), _c(expert_weight), _c(expert_bias), _c(gates), activation)


def _expert_mixture_fake(a, expert_weight, expert_bias, gates, activation, backend):
    return a.new_empty((gates.shape[1], a.shape[0], expert_weight.shape[2]))


def _expert_mixture_backward(
    grad: Tensor, a: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gates: Tensor,
    activation: str, backend: str, input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    da, dw, db, dg = _impl(backend, a).expert_mixture_backward(
        _c(grad), _c(a), _c(expert_weight), _c(expert_bias), _c(gates), activation, input_grad=input_grad
    )
    return _input_grad(da, input_grad, a), dw, db, dg


def _expert_mixture_backward_fake(grad, a, expert_weight, expert_bias, gates, activation, backend, input_grad):
    E, _, H = expert_weight.shape
    return (_input_grad_fake(a, input_grad), expert_weight.new_empty(expert_weight.shape),
            a.new_empty((E, H)), gates.new_empty(gates.shape))


_expert_mixture, _expert_mixture_bwd, _ExpertMixture = _define(
    "expert_mixture", _expert_mixture_forward, _expert_mixture_fake, _expert_mixture_backward,
    _expert_mixture_backward_fake, lambda a, w, b, g, act, backend: _reference.expert_mixture(a, w, b, g, act),
    tensors=4)


def _saving(be, name: str, recompute: bool):
    """The backend's ``<name>_train`` (a forward that keeps its pre-activations), unless recomputing or absent."""
    return None if recompute else getattr(be, f"{name}_train", None)


def _expert_mixture_train(recompute, a, expert_weight, expert_bias, gates, activation, backend):
    be = _impl(backend, a)
    train = _saving(be, "expert_mixture", recompute)
    if train is None:
        return _expert_mixture_forward(a, expert_weight, expert_bias, gates, activation, backend), ()
    return train(_c_in(be, a), _c(expert_weight), _c(expert_bias), _c(gates), activation)


def _expert_mixture_eager_backward(grad, a, expert_weight, expert_bias, gates, activation, backend, input_grad,
                                   saved):
    if not saved:
        return _expert_mixture_backward(grad, a, expert_weight, expert_bias, gates, activation, backend, input_grad)
    be = _impl(backend, a)
    da, dw, db, dg = be.expert_mixture_backward(
        _c(grad), _c_in(be, a), _c(expert_weight), _c(expert_bias), _c(gates), activation, input_grad=input_grad,
        saved=saved)
    return _input_grad(da, input_grad, a), dw, db, dg


_ExpertMixtureEager = _eager("expert_mixture", _expert_mixture_train, _expert_mixture_eager_backward,
                             _expert_mixture_bwd, tensors=4)


def expert_mixture(
    a: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gates: Tensor, *,
    activation: str = "relu", backend: str = "auto", recompute: bool = False,
) -> Tensor:
    """Every task's mixture of expert outputs: ``m[T, B, H]``.

    ``m[t, b] = sum_e gates[b, t, e] * act(a_e[b] @ expert_weight[e] + expert_bias[e])`` with
    ``a[B, K]`` (one input shared by the experts) or ``a[B, E, K]`` (one per expert),
    ``expert_weight[E, K, H]``, ``expert_bias[E, H] | None``, ``gates[B, T, E]``.
    ``recompute=True``: under autograd keep only the inputs (not ``[B, E, H]`` pre-activations) and recompute
    them in the backward (one more GEMM, less memory).
    """
    a, expert_weight, expert_bias, gates = _autocast(a, expert_weight, expert_bias, gates)
    _checks.check_experts(a, expert_weight, expert_bias)
    _checks.check_gates(gates, a, expert_weight.shape[0])
    contract.check_activation(activation)
    backends.check_backend_name(backend)
    return _call(_expert_mixture, _ExpertMixture, _ExpertMixtureEager, _expert_mixture_forward, a, expert_weight,
                 expert_bias, gates, activation, backend, recompute=recompute)


# ---- grouped_linear (hidden expert layers) ------------------------------------------------------


def _grouped_linear_forward(a: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, backend: str) -> Tensor:
    return _impl(backend, a).grouped_linear(_c(a), _c(weight), _c(bias), activation)


def _grouped_linear_fake(a, weight, bias, activation, backend):
    return a.new_empty((a.shape[0], weight.shape[0], weight.shape[2]))


def _grouped_linear_backward(
    grad: Tensor, a: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, backend: str, input_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    da, dw, db = _impl(backend, a).grouped_linear_backward(_c(grad), _c(a), _c(weight), _c(bias), activation,
                                                           input_grad=input_grad)
    return _input_grad(da, input_grad, a), dw, db


def _grouped_linear_backward_fake(grad, a, weight, bias, activation, backend, input_grad):
    E, _, N = weight.shape
    return _input_grad_fake(a, input_grad), weight.new_empty(weight.shape), a.new_empty((E, N))


_grouped_linear, _grouped_linear_bwd, _GroupedLinear = _define(
    "grouped_linear", _grouped_linear_forward, _grouped_linear_fake, _grouped_linear_backward,
    _grouped_linear_backward_fake, lambda a, w, b, act, backend: _reference.grouped_linear(a, w, b, act), tensors=3)


def _grouped_linear_train(recompute, a, weight, bias, activation, backend, expert_major=False):
    """``expert_major``: the output may be an expert-major view where the backend reads those (``_c_in``)."""
    be = _impl(backend, a)
    train = _saving(be, "grouped_linear", recompute)
    if train is None:
        return _grouped_linear_forward(a, weight, bias, activation, backend), ()
    if expert_major and getattr(be, "READS_EXPERT_MAJOR", False):
        return train(_c_in(be, a), _c(weight), _c(bias), activation, expert_major=True)
    return train(_c(a), _c(weight), _c(bias), activation)


def _grouped_linear_eager_backward(grad, a, weight, bias, activation, backend, input_grad, saved):
    if not saved:
        return _grouped_linear_backward(grad, a, weight, bias, activation, backend, input_grad)
    be = _impl(backend, a)
    da, dw, db = be.grouped_linear_backward(_c_in(be, grad), _c_in(be, a), _c(weight), _c(bias), activation,
                                            input_grad=input_grad, saved=saved)
    return _input_grad(da, input_grad, a), dw, db


_GroupedLinearEager = _eager("grouped_linear", _grouped_linear_train, _grouped_linear_eager_backward,
                             _grouped_linear_bwd, tensors=3)


def grouped_linear(
    a: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: str = "relu", backend: str = "auto",
    recompute: bool = False,
) -> Tensor:
    """One hidden layer of every expert: ``out[B, E, N] = act(a_e @ weight[e] + bias[e])``.

    ``a[B, K]`` (shared input) or ``a[B, E, K]``, ``weight[E, K, N]``, ``bias[E, N] | None``;
    ``recompute`` as in ``expert_mixture``.
    """
    a, weight, bias = _autocast(a, weight, bias)
    _checks.check_experts(a, weight, bias, weight_name="weight", bias_name="bias")
    contract.check_activation(activation)
    backends.check_backend_name(backend)
    return _call(_grouped_linear, _GroupedLinear, _GroupedLinearEager, _grouped_linear_forward, a, weight, bias,
                 activation, backend, recompute=recompute)


# ---- mmoe: gates and mixture in one op ----------------------------------------------------------


def _mmoe_forward(
    x: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gate_weight: Tensor,
    gate_bias: Optional[Tensor], activation: str, backend: str,
) -> Tensor:
    be = _impl(backend, x)
    x, w, wg, b, bg = _dense(x), _dense(expert_weight), _dense(gate_weight), _c(expert_bias), _c(gate_bias)
    fused, _ = contract.fused_mmoe(be)
    if fused is not None:
        return fused(x, w, b, wg, bg, activation)
    return be.expert_mixture(x, w, b, be.gate_softmax(x, wg, bg), activation)


def _mmoe_fake(x, expert_weight, expert_bias, gate_weight, gate_bias, activation, backend):
    return x.new_empty((gate_weight.shape[0], x.shape[0], expert_weight.shape[2]))


def _mmoe_backward(
    grad: Tensor, x: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gate_weight: Tensor,
    gate_bias: Optional[Tensor], activation: str, backend: str, input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _mmoe_backward_from(grad, x, expert_weight, expert_bias, gate_weight, gate_bias, activation, backend,
                               input_grad, ())


def _mmoe_backward_from(grad, x, expert_weight, expert_bias, gate_weight, gate_bias, activation, backend, input_grad,
                        saved):
    """The backward, from what ``mmoe_train`` saved (empty: recomputed)."""
    be = _impl(backend, x)
    grad, x, w, wg = _dense(grad), _dense(x), _dense(expert_weight), _dense(gate_weight)
    b, bg = _c(expert_bias), _c(gate_bias)
    _, fused = contract.fused_mmoe(be)
    if fused is not None:
        extra = dict(saved=saved) if saved else {}
        dx, dw, db, dwg, dbg = fused(grad, x, w, b, wg, bg, activation, input_grad=input_grad, **extra)
        return _input_grad(dx, input_grad, x), dw, db, dwg, dbg
    gates = be.gate_softmax(x, wg, bg)  # recomputed: cheaper than saving [B, T, E] through autograd
    dx, dw, db, dgates = be.expert_mixture_backward(grad, x, w, b, gates, activation, input_grad=input_grad)
    dx_gate, dwg, dbg = be.gate_softmax_backward(dgates, gates, x, wg, input_grad=input_grad)
    return _input_grad(dx + dx_gate if input_grad else None, input_grad, x), dw, db, dwg, dbg


def _mmoe_backward_fake(grad, x, expert_weight, expert_bias, gate_weight, gate_bias, activation, backend, input_grad):
    T, _, E = gate_weight.shape
    return (_input_grad_fake(x, input_grad), expert_weight.new_empty(expert_weight.shape),
            x.new_empty((expert_weight.shape[0], expert_weight.shape[2])),
            gate_weight.new_empty(gate_weight.shape), x.new_empty((T, E)))


_mmoe, _mmoe_bwd, _MMoE = _define(
    "mmoe", _mmoe_forward, _mmoe_fake, _mmoe_backward, _mmoe_backward_fake,
    lambda x, w, b, wg, bg, act, backend: _reference.expert_mixture(x, w, b, _reference.gate_softmax(x, wg, bg), act),
    tensors=5)


def _mmoe_train(recompute, x, expert_weight, expert_bias, gate_weight, gate_bias, activation, backend):
    be = _impl(backend, x)
    train = _saving(be, "mmoe", recompute)
    if train is None:
        return _mmoe_forward(x, expert_weight, expert_bias, gate_weight, gate_bias, activation, backend), ()
    return train(_dense(x), _dense(expert_weight), _c(expert_bias), _dense(gate_weight), _c(gate_bias), activation)


_MMoEEager = _eager("mmoe", _mmoe_train, _mmoe_backward_from, _mmoe_bwd, tensors=5)


def mmoe(
    x: Tensor, expert_weight: Tensor, expert_bias: Optional[Tensor], gate_weight: Tensor,
    gate_bias: Optional[Tensor], *, activation: str = "relu", backend: str = "auto", recompute: bool = False,
) -> Tensor:
    """One MMoE layer with single-layer experts: ``expert_mixture(x, W, b, gate_softmax(x, Wg, bg))``.

    ``x[B, D]``, ``expert_weight[E, D, H]``, ``expert_bias[E, H] | None``, ``gate_weight[T, D, E]``,
    ``gate_bias[T, E] | None``; returns ``m[T, B, H]``. ``recompute`` as in ``expert_mixture``.
    """
    x, expert_weight, expert_bias, gate_weight, gate_bias = _autocast(x, expert_weight, expert_bias, gate_weight,
                                                                      gate_bias)
    _checks.check_gate(x, gate_weight, gate_bias)
    _checks.check_experts(x, expert_weight, expert_bias, a_name="x")
    if expert_weight.shape[0] != gate_weight.shape[2]:
        raise ValueError(
            f"gate_weight must have shape [T, D, E] with E = {expert_weight.shape[0]} experts "
            f"(expert_weight's first dimension), got {tuple(gate_weight.shape)}"
        )
    contract.check_activation(activation)
    backends.check_backend_name(backend)
    return _call(_mmoe, _MMoE, _MMoEEager, _mmoe_forward, x, expert_weight, expert_bias, gate_weight, gate_bias,
                 activation, backend, recompute=recompute)
