"""Triton backend: fused gate softmax and fused expert mixture, forward and backward (``mmoe_fast.kernels``).

Forward:  ``gate_softmax`` is a GEMM per (row block, task) with the softmax in its epilogue (any T and E:
          experts in chunks of <= 64, an online softmax past one chunk); ``expert_mixture`` mixes the
          expert outputs tile by tile in registers, never writing ``[B, E, H]``.
Backward: one row-parallel kernel recomputes ``pre`` (the backward ops get only the inputs) and writes
          ``dG`` and ``dpre``; two GEMM kernels give ``da`` and ``dW``/``db``. Weight gradients are
          reduced without atomics (per-slice partial buffers summed in a fixed order): deterministic.
          ``mmoe_backward`` fuses the gate's backward in (one dx, fp32 dG).
Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
fp32, fp64, fp16 and bf16 inputs; fp32 accumulation (fp64 for fp64); outputs in the input dtype.
fp32 ``tl.dot`` precision: ``precision()`` (tf32 rounds the operands to nearest first).
"""

from __future__ import annotations

import functools
import os
import threading

import torch

from ..contract import TF32_TOLERANCE, TOLERANCE

try:
    import triton
    import triton.language as tl
except ImportError:  # the backend table reports unavailable_reason()
    triton = None

if triton is not None:
    from ..kernels import gating, linear, mixture
    from ..kernels.common import INTERPRET

PRECISION_ENV = "MMOE_FAST_TRITON_PRECISION"
# The interpreter rounds fp32 -> bf16/fp16 stores toward zero (a GPU rounds to nearest), which about
# doubles the error of half-precision outputs there; half numerics are checked on a GPU (gpu_check.sh).
INTERPRETER_HALF_TOLERANCE = 3e-2

_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_HALF = (torch.float16, torch.bfloat16)


def unavailable_reason() -> str | None:
    if triton is None:
        return "triton is not installed (pip install triton)"
    if not INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on the CPU through Triton's interpreter)"
    return None


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    if triton is None or dtype not in _DTYPES:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def precision() -> str:
    """``tl.dot`` input precision for fp32: ``"tf32"`` or ``"ieee"``.

    ``$MMOE_FAST_TRITON_PRECISION`` when set; else it follows ``torch.get_float32_matmul_precision()``
    (``"highest"``, torch's default, gives ``"ieee"``). tf32 rounds each fp32 operand to nearest (ties away)
    before the tensor cores, which would truncate it; the interpreter does the same rounding, then exact fp32
    products, so it shows tf32's numerics on the CPU.
    """
    env = os.environ.get(PRECISION_ENV)
    if env:
        if env not in ("tf32", "ieee"):
            raise ValueError(f"${PRECISION_ENV} must be 'tf32' or 'ieee', got {env!r}")
        return env
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def tolerance(dtype: torch.dtype) -> float:
    """The relative error this backend promises for ``dtype`` under the current ``precision()``."""
    if dtype == torch.float32 and precision() == "tf32":  # the interpreter rounds the operands the same way
        return TF32_TOLERANCE
    if dtype in _HALF and INTERPRET:
        return INTERPRETER_HALF_TOLERANCE
    return TOLERANCE[dtype]


def _new(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer comes from here (tests fill them with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _kinds(dtype: torch.dtype) -> dict:
    """The constexprs of a launch: the dot's operand dtype, the accumulator's, and the fp32 precision."""
    tdt = getattr(tl, _DTYPES[dtype])
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    # The interpreter's bf16/fp16 arithmetic is wrong: compute half inputs in fp32 there.
    dot = tl.float32 if INTERPRET and dtype in _HALF else tdt
    return dict(DOT=dot, ACC=acc, PREC=precision() if dtype == torch.float32 else "tf32")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bucket(n: int) -> int:
    return triton.next_power_of_2(n)


# ---- S replicas in one launch: every kernel has a grid axis of replicas. A tensor is either [S, ...] (``per``:
# replica s's at s) or one all replicas share (replica stride 0); every output is [S, ...]. The single-model
# members below are the same launchers with S = None: one replica, outputs without the replica dimension (a
# forward's output must be a tensor of its own, not a view, for forward-mode AD).

MAX_REPLICAS = 65535  # a CUDA grid's second and third axes, where the replicas go; more run in chunks


def _at(t: torch.Tensor, per: bool) -> tuple:
    """The shape of one replica's ``t``."""
    return tuple(t.shape[1:]) if per else tuple(t.shape)


def _rs(S: int | None, t: torch.Tensor | None, per: bool = True) -> int:
    """Elements between two replicas' ``t`` (an output, or an input with ``per``); 0 for a shared or absent
    tensor, and for every tensor of one replica: Triton then knows the pointer keeps its alignment."""
    return t.stride(0) if per and S is not None and S > 1 and t is not None else 0


def _shape(S: int | None, *dims: int) -> tuple:
    """An output's shape: ``[S, *dims]``, or ``dims`` for one model (S = None)."""
    return dims if S is None else (S, *dims)


def _n(S: int | None) -> int:
    """The replica grid axis' length."""
    return 1 if S is None else S


def _check_replicas(S: int | None) -> None:
    """A launch's replica count fits its grid axis (``_in_chunks`` sees to it for the replica members)."""
    if S is not None and not 1 <= S <= MAX_REPLICAS:
        raise ValueError(f"a Triton launch runs 1 to {MAX_REPLICAS} replicas (a CUDA grid axis), got {S}")


def _in_chunks(member):
    """A replica member for any S: past ``MAX_REPLICAS`` (``jacrev`` vmaps a backward over every output element)
    it runs chunks of that many replicas and concatenates their results."""
    @functools.wraps(member)
    def run(S, per, *args):
        if S <= MAX_REPLICAS:
            return member(S, per, *args)
        n, parts = len(per), []
        for lo in range(0, S, MAX_REPLICAS):
            hi = min(S, lo + MAX_REPLICAS)
            chunk = [t[lo:hi] if flag and t is not None else t for t, flag in zip(args[:n], per)]
            parts.append(member(hi - lo, per, *chunk, *args[n:]))
        if isinstance(parts[0], torch.Tensor):
            return torch.cat(parts)
        return tuple(torch.cat(outs) for outs in zip(*parts))
    return run


def _strides(a: torch.Tensor, K: int, per: bool) -> tuple[int, int]:
    """(stride over rows, stride over experts) of one replica's a[B, K] (shared: 0) or a[B, E, K]."""
    return (K, 0) if len(_at(a, per)) == 2 else (_at(a, per)[1] * K, K)


def _weight_grad_splits(B: int, tiles: int, device: torch.device) -> int:
    """Batch slices for the weight-gradient reduction: enough programs to fill the GPU, >= 1024 rows each."""
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(programs, tiles), B // 1024))


def _weight_grad(S: int | None, a: torch.Tensor, per_a: bool, dy: torch.Tensor, E: int, K: int, N: int,
                 dtype: torch.dtype):
    """(dW[S, E, K, N], db[S, E, N]) in ``dtype`` from a[B, K] or [B, E, K] (``per_a``: [S, ...]) and
    dy[S, B, E, N] ([S, B, N] when E = 1); no S dimension anywhere when S is None."""
    B, device = _at(a, per_a)[0], a.device
    splits = _weight_grad_splits(B, triton.cdiv(K, 64) * triton.cdiv(N, 64) * E * _n(S), device)
    rows = triton.cdiv(B, splits)
    splits = triton.cdiv(B, rows)
    part = dtype if splits == 1 else _acc_dtype(dtype)  # one slice: no partials to sum, write the result
    dw = _new((_n(S), splits, E, K, N), part, device)
    db = _new((_n(S), splits, E, N), part, device)
    s_ab, s_ae = _strides(a, K, per_a)
    kinds = _kinds(dtype)
    if dy.dtype != a.dtype:  # dlogit is kept in ACC dtype: run that dot in ACC precision
        kinds["DOT"] = kinds["ACC"]
    grid = lambda META: (triton.cdiv(K, META["BLOCK_K"]) * triton.cdiv(N, META["BLOCK_N"]), splits * E, _n(S))  # noqa: E731
    linear.weight_grad[grid](a, dy, dw, db, B, K, N, E, rows, s_ab, s_ae, E * N, N, _rs(S, a, per_a), _rs(S, dy),
                             _bucket(B), _bucket(_n(S)), **kinds)
    if splits == 1:
        dw, db = dw[:, 0], db[:, 0]
    else:  # a fixed-order sum over the slices: the same bits on every run
        dw, db = dw.sum(1).to(dtype), db.sum(1).to(dtype)
    return (dw, db) if S is not None else (dw[0], db[0])


def _input_grad(S: int | None, dpre: torch.Tensor, W: torch.Tensor, per_W: bool, shared: bool,
                gate=None) -> torch.Tensor:
    """da[S] = sum_e dpre_e @ W[e]^T: [S, B, K] for a shared input, else [S, B, E, K]; dpre is [S, B, E, N].

    ``gate = (dlogit[S, B, T, E] in ACC dtype, Wg[T, K, E], per_Wg)`` adds the gate's share, dlogit @ Wg^T
    (shared only).
    """
    B, (E, K, N) = dpre.shape[-3], _at(W, per_W)
    da = _new(_shape(S, B, K) if shared else _shape(S, B, E, K), W.dtype, W.device)
    groups, per = (1, E) if shared else (E, 1)
    dlogit, wg, per_wg = gate if gate is not None else (dpre, W, per_W)
    T = _at(wg, per_wg)[0] if gate else 0
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_K"]) * groups, _n(S))  # noqa: E731
    linear.input_grad[grid](dpre, W, da, dlogit, wg, B, K, N, E, T, per, E * N, N, K if shared else E * K,
                            0 if shared else K,
                            _rs(S, dpre), _rs(S, W, per_W), _rs(S, da), _rs(S, dlogit), _rs(S, wg, per_wg),
                            _bucket(B), _bucket(_n(S)), GATE=gate is not None, **_kinds(W.dtype))
    return da


def _no_input_grad(S: int, like: torch.Tensor) -> torch.Tensor:
    """What a replica member returns for ``da`` when it was not asked for (the vmap rule needs a tensor)."""
    return like.new_empty((S, 0))


def _gate_forward(S: int | None, per, x, Wg, bg) -> torch.Tensor:
    """G[S, B, T, E]; ``per`` flags (x, Wg, bg)."""
    _check_replicas(S)
    B, D = _at(x, per[0])
    T, _, E = _at(Wg, per[1])
    block = gating.e_block(E)
    G = _new(_shape(S, B, T, E), x.dtype, x.device)
    # Raw logits between the two passes of a gate wider than one chunk.
    scratch = _new(_shape(S, B, T, E) if E > block else (1,), _acc_dtype(x.dtype), x.device)
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]) * T, _n(S))  # noqa: E731
    gating.gate_softmax_fwd[grid](x, Wg, Wg if bg is None else bg, G, scratch, B, D, T, E, _rs(S, x, per[0]),
                                  _rs(S, Wg, per[1]), _rs(S, bg, per[2]), _rs(S, G), _bucket(B), _bucket(_n(S)),
                                  HAS_BIAS=bg is not None, E_BLOCK=block, **_kinds(x.dtype))
    return G


def _gate_backward(S: int | None, per, dG, G, x, Wg, with_dx: bool):
    """(dx[S, B, D] | None, dlogit[S, B, T, E] in ACC dtype); ``per`` flags (dG, G, x, Wg)."""
    _check_replicas(S)
    B, D = _at(x, per[2])
    T, _, E = _at(Wg, per[3])
    dx = _new(_shape(S, B, D), x.dtype, x.device) if with_dx else None
    dlogit = _new(_shape(S, B, T, E), _acc_dtype(x.dtype), x.device)
    kinds = _kinds(x.dtype)
    d_blocks = (lambda META: triton.cdiv(D, META["BLOCK_D"])) if with_dx else (lambda META: 1)
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]), d_blocks(META), _n(S))  # noqa: E731
    gating.gate_softmax_bwd[grid](dG, G, Wg, dlogit if dx is None else dx, dlogit, B, D, T, E, _rs(S, dG, per[0]),
                                  _rs(S, G, per[1]), _rs(S, Wg, per[3]), _rs(S, dx), _rs(S, dlogit), _bucket(B),
                                  _bucket(_n(S)), WRITE_DX=with_dx,
                                  E_BLOCK=gating.e_block(E, with_dx), ACC=kinds["ACC"], PREC=kinds["PREC"])
    return dx, dlogit


def _gate_weight_grads(S: int | None, x, per_x: bool, dlogit, T, D, E):
    """(dWg[S, T, D, E], dbg[S, T, E]) from dlogit[S, B, T, E]."""
    dwg, dbg = _weight_grad(S, x, per_x, dlogit, 1, D, T * E, x.dtype)
    return dwg.view(_shape(S, D, T, E)).transpose(-3, -2).contiguous(), dbg.view(_shape(S, T, E))


def _mixture_forward(S: int | None, per, a, W, b, G, activation) -> torch.Tensor:
    """m[S, T, B, H]; ``per`` flags (a, W, b, G)."""
    _check_replicas(S)
    B = _at(a, per[0])[0]
    E, K, N = _at(W, per[1])
    T = G.shape[-2]
    m = _new(_shape(S, T, B, N), a.dtype, a.device)
    s_ab, s_ae = _strides(a, K, per[0])
    # Up to MAX_TASKS accumulators a program; more tasks split evenly into groups that recompute f.
    groups = triton.cdiv(T, mixture.MAX_TASKS)
    tasks = triton.cdiv(T, groups)
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]) * groups * triton.cdiv(N, META["BLOCK_N"]), _n(S))  # noqa: E731
    mixture.expert_mixture_fwd[grid](a, W, W if b is None else b, G, m, B, K, N, E, T, s_ab, s_ae,
                                     *(_rs(S, t, p) for t, p in zip((a, W, b, G), per)), _rs(S, m), _bucket(B),
                                     _bucket(_n(S)),
                                     ACT=activation, HAS_BIAS=b is not None, TASKS=tasks, **_kinds(a.dtype))
    return m


def _mixture_rows(S: int | None, per, dm, a, W, b, G, activation, dg_dtype):
    """(dpre[S, B, E, H], dG[S, B, T, E] in dg_dtype): the row-parallel half of the mixture backward; ``per``
    flags (dm, a, W, b, G)."""
    B = _at(a, per[1])[0]
    E, K, N = _at(W, per[2])
    T = G.shape[-2]
    dpre = _new(_shape(S, B, E, N), a.dtype, a.device)
    dG = _new(_shape(S, B, T, E), dg_dtype, a.device)
    s_ab, s_ae = _strides(a, K, per[1])
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]) * E, _n(S))  # noqa: E731
    mixture.expert_mixture_bwd_rows[grid](dm, a, W, W if b is None else b, G, dpre, dG, B, K, N, E, T, s_ab, s_ae,
                                          *(_rs(S, t, p) for t, p in zip((dm, a, W, b, G), per)), _rs(S, dpre),
                                          _rs(S, dG), _bucket(B), _bucket(_n(S)), ACT=activation,
                                          HAS_BIAS=b is not None, T_PAD=triton.next_power_of_2(T), **_kinds(a.dtype))
    return dpre, dG


def _mixture_backward(S: int | None, per, dm, a, W, b, G, activation, input_grad):
    """(da[S] | None, dW[S], db[S], dG[S]); ``per`` flags (dm, a, W, b, G)."""
    _check_replicas(S)
    E, K, N = _at(W, per[2])
    dpre, dG = _mixture_rows(S, per, dm, a, W, b, G, activation, a.dtype)
    da = _input_grad(S, dpre, W, per[2], len(_at(a, per[1])) == 2) if input_grad else None
    return da, *_weight_grad(S, a, per[1], dpre, E, K, N, a.dtype), dG


def _mmoe_backward(S: int | None, per, dm, x, W, b, Wg, bg, activation, input_grad):
    """(dx[S] | None, dW, db, dWg, dbg); ``per`` flags (dm, x, W, b, Wg, bg)."""
    _check_replicas(S)
    T, D, E = _at(Wg, per[4])
    N = _at(W, per[2])[2]
    G = _gate_forward(S, (per[1], per[4], per[5]), x, Wg, bg)  # recomputed: the backward op gets only the inputs
    dpre, dG = _mixture_rows(S, (per[0], per[1], per[2], per[3], True), dm, x, W, b, G, activation,
                             _acc_dtype(x.dtype))
    _, dlogit = _gate_backward(S, (True, True, per[1], per[4]), dG, G, x, Wg, with_dx=False)
    dx = _input_grad(S, dpre, W, per[2], True, gate=(dlogit, Wg, per[4])) if input_grad else None
    return dx, *_weight_grad(S, x, per[1], dpre, E, D, N, x.dtype), *_gate_weight_grads(S, x, per[1], dlogit, T, D, E)


def _grouped_rows(kernel, S: int | None, lead: tuple, per, a, W, b, activation) -> torch.Tensor:
    """[S, B, E, N] from a row-parallel grouped kernel: ``grouped_linear_fwd`` (``lead`` empty) or
    ``grouped_linear_bwd_rows`` (``lead`` = ((dout, its flag),)); ``per`` flags (a, W, b)."""
    _check_replicas(S)
    B = _at(a, per[0])[0]
    E, K, N = _at(W, per[1])
    out = _new(_shape(S, B, E, N), a.dtype, a.device)
    s_ab, s_ae = _strides(a, K, per[0])
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]) * E, _n(S))  # noqa: E731
    flagged = (*lead, *zip((a, W, b), per))
    kernel[grid](*(t for t, _ in lead), a, W, W if b is None else b, out, B, K, N, E, s_ab, s_ae,
                 *(_rs(S, t, p) for t, p in flagged), _rs(S, out), _bucket(B), _bucket(_n(S)), ACT=activation,
                 HAS_BIAS=b is not None, **_kinds(a.dtype))
    return out


def _linear_forward(S: int | None, per, a, W, b, activation) -> torch.Tensor:
    """out[S, B, E, N]; ``per`` flags (a, W, b)."""
    return _grouped_rows(linear.grouped_linear_fwd, S, (), per, a, W, b, activation)


def _linear_backward(S: int | None, per, dout, a, W, b, activation, input_grad):
    """(da[S] | None, dW[S], db[S]); ``per`` flags (dout, a, W, b)."""
    E, K, N = _at(W, per[2])
    dpre = _grouped_rows(linear.grouped_linear_bwd_rows, S, ((dout, per[0]),), per[1:], a, W, b, activation)
    da = _input_grad(S, dpre, W, per[2], len(_at(a, per[1])) == 2) if input_grad else None
    return da, *_weight_grad(S, a, per[1], dpre, E, K, N, a.dtype)


_SHARED = (False,) * 6


# ---- the backend contract -----------------------------------------------------------------------


def gate_softmax(x, Wg, bg):
    """G[B, T, E] = softmax_e(x[B, D] @ Wg[t] + bg[t])."""
    return _gate_forward(None, _SHARED, x, Wg, bg)


def gate_softmax_backward(dG, G, x, Wg, input_grad=True):
    """(dx[B, D], dWg[T, D, E], dbg[T, E]) from dG[B, T, E] and the forward's G."""
    T, D, E = Wg.shape
    dx, dlogit = _gate_backward(None, _SHARED, dG, G, x, Wg, with_dx=input_grad)
    return dx, *_gate_weight_grads(None, x, False, dlogit, T, D, E)


def expert_mixture(a, W, b, G, activation):
    """m[T, B, H] = sum_e G[:, t, e] * act(a_e @ W[e] + b[e]); a is [B, K] or [B, E, K]."""
    return _mixture_forward(None, _SHARED, a, W, b, G, activation)


def expert_mixture_backward(dm, a, W, b, G, activation, input_grad=True):
    """(da, dW[E, K, H], db[E, H], dG[B, T, E]) from dm[T, B, H]; da has a's shape."""
    return _mixture_backward(None, _SHARED, dm, a, W, b, G, activation, input_grad)


def mmoe_backward(dm, x, W, b, Wg, bg, activation, input_grad=True):
    """(dx, dW, db, dWg, dbg) of a single-layer MMoE from dm[T, B, H], fused across the gate and the mixture.

    Against composing the two backward ops: dG stays in fp32, and the gate's share of dx is added inside
    the experts' input-gradient kernel, so dx is written once (no separate [B, D] pass and add).
    """
    return _mmoe_backward(None, _SHARED, dm, x, W, b, Wg, bg, activation, input_grad)


def grouped_linear(a, W, b, activation):
    """out[B, E, N] = act(a_e @ W[e] + b[e]) (hidden expert layers)."""
    return _linear_forward(None, _SHARED, a, W, b, activation)


def grouped_linear_backward(dout, a, W, b, activation, input_grad=True):
    """(da, dW[E, K, N], db[E, N]) from dout[B, E, N]; da has a's shape."""
    return _linear_backward(None, _SHARED, dout, a, W, b, activation, input_grad)


# The ops' vmap rules call these with S replicas and ``per``, one flag per tensor argument (in the op's order).


@_in_chunks
def gate_softmax_replicas(S, per, x, Wg, bg):
    return _gate_forward(S, per, x, Wg, bg)


@_in_chunks
def gate_softmax_backward_replicas(S, per, dG, x, Wg, bg, G, input_grad):
    T, D, E = _at(Wg, per[2])
    dx, dlogit = _gate_backward(S, (per[0], per[4], per[1], per[2]), dG, G, x, Wg, with_dx=input_grad)
    return (_no_input_grad(S, x) if dx is None else dx, *_gate_weight_grads(S, x, per[1], dlogit, T, D, E))


@_in_chunks
def expert_mixture_replicas(S, per, a, W, b, G, activation):
    return _mixture_forward(S, per, a, W, b, G, activation)


@_in_chunks
def expert_mixture_backward_replicas(S, per, dm, a, W, b, G, activation, input_grad):
    da, *rest = _mixture_backward(S, per, dm, a, W, b, G, activation, input_grad)
    return (_no_input_grad(S, a) if da is None else da, *rest)


@_in_chunks
def mmoe_replicas(S, per, x, W, b, Wg, bg, activation):
    G = _gate_forward(S, (per[0], per[3], per[4]), x, Wg, bg)
    return _mixture_forward(S, (*per[:3], True), x, W, b, G, activation)


@_in_chunks
def mmoe_backward_replicas(S, per, dm, x, W, b, Wg, bg, activation, input_grad):
    dx, *rest = _mmoe_backward(S, per, dm, x, W, b, Wg, bg, activation, input_grad)
    return (_no_input_grad(S, x) if dx is None else dx, *rest)


@_in_chunks
def grouped_linear_replicas(S, per, a, W, b, activation):
    return _linear_forward(S, per, a, W, b, activation)


@_in_chunks
def grouped_linear_backward_replicas(S, per, dout, a, W, b, activation, input_grad):
    da, *rest = _linear_backward(S, per, dout, a, W, b, activation, input_grad)
    return (_no_input_grad(S, a) if da is None else da, *rest)


def _serialized(fn):
    """Under the interpreter, one launch at a time: it patches ``triton.language`` while a kernel runs, so
    concurrent launches from several threads would fail (a GPU launches concurrently)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _INTERPRETER_LOCK:
            return fn(*args, **kwargs)
    return run


if triton is not None and INTERPRET:
    _INTERPRETER_LOCK = threading.RLock()
    for _name in ("gate_softmax", "gate_softmax_backward", "expert_mixture", "expert_mixture_backward",
                  "mmoe_backward", "grouped_linear", "grouped_linear_backward"):
        globals()[_name] = _serialized(globals()[_name])
        globals()[_name + "_replicas"] = _serialized(globals()[_name + "_replicas"])
    mmoe_replicas = _serialized(mmoe_replicas)
