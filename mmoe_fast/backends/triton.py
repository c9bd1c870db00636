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


def _strides(a: torch.Tensor, K: int) -> tuple[int, int]:
    """(stride over rows, stride over experts) of a[B, K] (shared: 0) or a[B, E, K]."""
    return (K, 0) if a.dim() == 2 else (a.shape[1] * K, K)


def _weight_grad_splits(B: int, tiles: int, device: torch.device) -> int:
    """Batch slices for the weight-gradient reduction: enough programs to fill the GPU, >= 1024 rows each."""
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(programs, tiles), B // 1024))


def _weight_grad(a: torch.Tensor, dy: torch.Tensor, E: int, K: int, N: int, dtype: torch.dtype):
    """(dW[E, K, N], db[E, N]) in ``dtype`` from a[B, K] or [B, E, K] and dy[B, E, N] ([B, N] when E = 1)."""
    B, device = a.shape[0], a.device
    splits = _weight_grad_splits(B, triton.cdiv(K, 64) * triton.cdiv(N, 64) * E, device)
    rows = triton.cdiv(B, splits)
    splits = triton.cdiv(B, rows)
    part = dtype if splits == 1 else _acc_dtype(dtype)  # one slice: no partials to sum, write the result
    dw = _new((splits, E, K, N), part, device)
    db = _new((splits, E, N), part, device)
    s_ab, s_ae = _strides(a, K)
    kinds = _kinds(dtype)
    if dy.dtype != a.dtype:  # dlogit is kept in ACC dtype: run that dot in ACC precision
        kinds["DOT"] = kinds["ACC"]
    grid = lambda META: (triton.cdiv(K, META["BLOCK_K"]), triton.cdiv(N, META["BLOCK_N"]), splits * E)  # noqa: E731
    linear.weight_grad[grid](a, dy, dw, db, B, K, N, E, rows, s_ab, s_ae, E * N, N, _bucket(B), **kinds)
    if splits == 1:
        return dw[0], db[0]
    # A fixed-order sum over the slices: the same bits on every run.
    return dw.sum(0).to(dtype), db.sum(0).to(dtype)


def _input_grad(dpre: torch.Tensor, W: torch.Tensor, shared: bool, gate=None) -> torch.Tensor:
    """da = sum_e dpre_e @ W[e]^T: [B, K] for a shared input, else [B, E, K].

    ``gate = (dlogit[B, T, E] in ACC dtype, Wg[T, K, E])`` adds the gate's share, dlogit @ Wg^T (shared only).
    """
    B, (E, K, N) = dpre.shape[0], W.shape
    da = _new((B, K) if shared else (B, E, K), W.dtype, W.device)
    groups, per = (1, E) if shared else (E, 1)
    dlogit, wg = gate if gate is not None else (dpre, W)
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_K"]) * groups,)  # noqa: E731
    linear.input_grad[grid](dpre, W, da, dlogit, wg, B, K, N, E, wg.shape[0] if gate else 0, per, E * N, N,
                            da.stride(0), 0 if shared else K, _bucket(B), GATE=gate is not None, **_kinds(W.dtype))
    return da


# ---- the backend contract -----------------------------------------------------------------------


def gate_softmax(x, Wg, bg):
    """G[B, T, E] = softmax_e(x[B, D] @ Wg[t] + bg[t])."""
    B, D = x.shape
    T, _, E = Wg.shape
    block = gating.e_block(E)
    G = _new((B, T, E), x.dtype, x.device)
    # Raw logits between the two passes of a gate wider than one chunk.
    scratch = _new((B, T, E) if E > block else (1,), _acc_dtype(x.dtype), x.device)
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]) * T,)  # noqa: E731
    gating.gate_softmax_fwd[grid](x, Wg, Wg if bg is None else bg, G, scratch, B, D, T, E, _bucket(B),
                                  HAS_BIAS=bg is not None, E_BLOCK=block, **_kinds(x.dtype))
    return G


def _gate_backward(dG, G, x, Wg, with_dx: bool):
    """(dx[B, D] | None, dlogit[B, T, E] in ACC dtype)."""
    B, D = x.shape
    T, _, E = Wg.shape
    dx = _new((B, D), x.dtype, x.device) if with_dx else None
    dlogit = _new((B, T, E), _acc_dtype(x.dtype), x.device)
    kinds = _kinds(x.dtype)
    d_blocks = (lambda META: triton.cdiv(D, META["BLOCK_D"])) if with_dx else (lambda META: 1)
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]), d_blocks(META))  # noqa: E731
    gating.gate_softmax_bwd[grid](dG, G, Wg, dlogit if dx is None else dx, dlogit, B, D, T, E, _bucket(B),
                                  WRITE_DX=with_dx, E_BLOCK=gating.e_block(E, with_dx), ACC=kinds["ACC"],
                                  PREC=kinds["PREC"])
    return dx, dlogit


def _gate_weight_grads(x, dlogit, T, D, E):
    """(dWg[T, D, E], dbg[T, E]) from dlogit[B, T, E]."""
    dwg, dbg = _weight_grad(x, dlogit, 1, D, T * E, x.dtype)
    return dwg.view(D, T, E).permute(1, 0, 2).contiguous(), dbg.view(T, E)


def gate_softmax_backward(dG, G, x, Wg, input_grad=True):
    """(dx[B, D], dWg[T, D, E], dbg[T, E]) from dG[B, T, E] and the forward's G."""
    T, D, E = Wg.shape
    dx, dlogit = _gate_backward(dG, G, x, Wg, with_dx=input_grad)
    return dx, *_gate_weight_grads(x, dlogit, T, D, E)


def expert_mixture(a, W, b, G, activation):
    """m[T, B, H] = sum_e G[:, t, e] * act(a_e @ W[e] + b[e]); a is [B, K] or [B, E, K]."""
    B = a.shape[0]
    E, K, N = W.shape
    T = G.shape[1]
    m = _new((T, B, N), a.dtype, a.device)
    s_ab, s_ae = _strides(a, K)
    # Up to MAX_TASKS accumulators a program; more tasks split evenly into groups that recompute f.
    groups = triton.cdiv(T, mixture.MAX_TASKS)
    tasks = triton.cdiv(T, groups)
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]) * groups * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    mixture.expert_mixture_fwd[grid](a, W, W if b is None else b, G, m, B, K, N, E, T, s_ab, s_ae, _bucket(B),
                                     ACT=activation, HAS_BIAS=b is not None, TASKS=tasks, **_kinds(a.dtype))
    return m


def _mixture_rows(dm, a, W, b, G, activation, dg_dtype):
    """(dpre[B, E, H], dG[B, T, E] in dg_dtype): the row-parallel half of the mixture backward."""
    B = a.shape[0]
    E, K, N = W.shape
    T = G.shape[1]
    dpre = _new((B, E, N), a.dtype, a.device)
    dG = _new((B, T, E), dg_dtype, a.device)
    s_ab, s_ae = _strides(a, K)
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]) * E,)  # noqa: E731
    mixture.expert_mixture_bwd_rows[grid](dm, a, W, W if b is None else b, G, dpre, dG, B, K, N, E, T, s_ab, s_ae,
                                          _bucket(B), ACT=activation, HAS_BIAS=b is not None,
                                          T_PAD=triton.next_power_of_2(T), **_kinds(a.dtype))
    return dpre, dG


def expert_mixture_backward(dm, a, W, b, G, activation, input_grad=True):
    """(da, dW[E, K, H], db[E, H], dG[B, T, E]) from dm[T, B, H]; da has a's shape."""
    E, K, N = W.shape
    dpre, dG = _mixture_rows(dm, a, W, b, G, activation, a.dtype)
    da = _input_grad(dpre, W, a.dim() == 2) if input_grad else None
    return da, *_weight_grad(a, dpre, E, K, N, a.dtype), dG


def mmoe_backward(dm, x, W, b, Wg, bg, activation, input_grad=True):
    """(dx, dW, db, dWg, dbg) of a single-layer MMoE from dm[T, B, H], fused across the gate and the mixture.

    Against composing the two backward ops: dG stays in fp32, and the gate's share of dx is added inside
    the experts' input-gradient kernel, so dx is written once (no separate [B, D] pass and add).
    """
    T, D, E = Wg.shape
    _, _, N = W.shape
    G = gate_softmax(x, Wg, bg)  # recomputed: the backward op gets only the inputs
    dpre, dG = _mixture_rows(dm, x, W, b, G, activation, _acc_dtype(x.dtype))
    _, dlogit = _gate_backward(dG, G, x, Wg, with_dx=False)
    dx = _input_grad(dpre, W, True, gate=(dlogit, Wg)) if input_grad else None
    return dx, *_weight_grad(x, dpre, E, D, N, x.dtype), *_gate_weight_grads(x, dlogit, T, D, E)


def grouped_linear(a, W, b, activation):
    """out[B, E, N] = act(a_e @ W[e] + b[e]) (hidden expert layers)."""
    B = a.shape[0]
    E, K, N = W.shape
    out = _new((B, E, N), a.dtype, a.device)
    s_ab, s_ae = _strides(a, K)
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]) * E,)  # noqa: E731
    linear.grouped_linear_fwd[grid](a, W, W if b is None else b, out, B, K, N, E, s_ab, s_ae, _bucket(B),
                                    ACT=activation, HAS_BIAS=b is not None, **_kinds(a.dtype))
    return out


def grouped_linear_backward(dout, a, W, b, activation, input_grad=True):
    """(da, dW[E, K, N], db[E, N]) from dout[B, E, N]; da has a's shape."""
    B = a.shape[0]
    E, K, N = W.shape
    dpre = _new((B, E, N), a.dtype, a.device)
    s_ab, s_ae = _strides(a, K)
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]) * E,)  # noqa: E731
    linear.grouped_linear_bwd_rows[grid](dout, a, W, W if b is None else b, dpre, B, K, N, E, s_ab, s_ae,
                                         _bucket(B), ACT=activation, HAS_BIAS=b is not None, **_kinds(a.dtype))
    da = _input_grad(dpre, W, a.dim() == 2) if input_grad else None
    return da, *_weight_grad(a, dpre, E, K, N, a.dtype)


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
