"""Gate kernels: every task's softmax gate in one GEMM, and its backward.

Forward:  one program per block of rows computes the logits of all tasks at once, ``x[rows] @ Wg``
          viewed as ``[D, T*E]``, adds the bias and takes a max-subtracted softmax per task in registers.
Backward: ``dlogit = G * (dG - sum_e G * dG)`` row by row, ``dx = dlogit @ Wg^T``; ``dlogit`` is written
          once for the weight-gradient reduction (``dWg = x^T dlogit``, ``dbg = sum_b dlogit``) and,
          in the fused layer backward, for ``linear.input_grad``, which adds the gate's dx to the experts'.
The task/expert columns are padded to powers of two, ``T_PAD * E_PAD >= 16``; column ``c`` is task
``c // E_PAD``, expert ``c % E_PAD``, so a reshape to ``[rows, T_PAD, E_PAD]`` separates the tasks.
"""

import triton
import triton.language as tl

from .common import autotune, cfg


@autotune(
    [cfg(BLOCK_M=64, BLOCK_K=32), cfg(BLOCK_M=128, BLOCK_K=32, num_warps=8), cfg(BLOCK_M=32, BLOCK_K=64, num_warps=2)],
    cfg(BLOCK_M=64, BLOCK_K=32),
    key=["B_BUCKET", "D", "T", "E"],  # B is bucketed to a power of two: batches vary, weights do not
)
@triton.jit
def gate_softmax_fwd(x_ptr, wg_ptr, bg_ptr, g_ptr, B, D, T, E, B_BUCKET,
                     HAS_BIAS: tl.constexpr, T_PAD: tl.constexpr, E_PAD: tl.constexpr,
                     DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """G[B, T, E] = softmax_e(x[B, D] @ Wg[t] + bg[t]); Wg is [T, D, E], bg [T, E]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    c = tl.arange(0, T_PAD * E_PAD)
    t = c // E_PAD
    e = c % E_PAD
    col_ok = (t < T) & (e < E)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * D
    w_cols = wg_ptr + t[None, :] * (D * E) + e[None, :]
    acc = tl.zeros((BLOCK_M, T_PAD * E_PAD), ACC)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + ks
        x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k[None, :] < D), other=0.0)
        w = tl.load(w_cols + k[:, None] * E, mask=(k[:, None] < D) & col_ok[None, :], other=0.0)
        acc = tl.dot(x.to(DOT), w.to(DOT), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bg_ptr + t * E + e, mask=col_ok, other=0.0).to(ACC)[None, :]
    # Padded experts get -inf (weight 0); padded tasks keep finite logits and are never stored.
    logits = tl.reshape(tl.where((e < E)[None, :], acc, float("-inf")), (BLOCK_M, T_PAD, E_PAD))
    p = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    g = tl.reshape(p / tl.sum(p, axis=2)[:, :, None], (BLOCK_M, T_PAD * E_PAD))
    out = g_ptr + rows.to(tl.int64)[:, None] * (T * E) + (t * E + e)[None, :]
    tl.store(out, g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gate_dx(dlogit, wg_ptr, dx_ptr, rows, pid_d, B, D, T, E, T_PAD: tl.constexpr, E_PAD: tl.constexpr,
             ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx[rows, D block pid_d] = dlogit[rows] @ Wg^T, dlogit as [BLOCK_M, T_PAD, E_PAD]."""
    c = tl.arange(0, T_PAD * E_PAD)
    t = c // E_PAD
    e = c % E_PAD
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    # Wg^T tile [T*E, BLOCK_D]: the gate is small, so this dot runs in ACC precision.
    wt = tl.load(wg_ptr + t[:, None] * (D * E) + ds[None, :] * E + e[:, None],
                 mask=((t < T) & (e < E))[:, None] & (ds < D)[None, :], other=0.0).to(ACC)
    dx = tl.dot(tl.reshape(dlogit, (BLOCK_M, T_PAD * E_PAD)), wt, input_precision=PREC)
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * D + ds[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=(rows < B)[:, None] & (ds < D)[None, :])


@autotune(
    [cfg(BLOCK_M=64, BLOCK_D=64), cfg(BLOCK_M=128, BLOCK_D=64, num_warps=8), cfg(BLOCK_M=32, BLOCK_D=64, num_warps=2)],
    cfg(BLOCK_M=64, BLOCK_D=32),
    key=["B_BUCKET", "D", "T", "E"],
)
@triton.jit
def gate_softmax_bwd(dg_ptr, g_ptr, wg_ptr, dx_ptr, dlogit_ptr, B, D, T, E, B_BUCKET,
                     WRITE_DX: tl.constexpr, T_PAD: tl.constexpr, E_PAD: tl.constexpr, ACC: tl.constexpr,
                     PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dlogit[B, T, E] (ACC dtype; written by the programs of the first D block) and, if WRITE_DX, dx[B, D]
    (the fused layer backward adds dx inside ``linear.input_grad`` instead; its grid has one D block)."""
    pid_d = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    ts = tl.arange(0, T_PAD)
    es = tl.arange(0, E_PAD)
    offs = rows.to(tl.int64)[:, None, None] * (T * E) + ts[None, :, None] * E + es[None, None, :]
    mask = row_ok[:, None, None] & (ts < T)[None, :, None] & (es < E)[None, None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    dg = tl.load(dg_ptr + offs, mask=mask, other=0.0).to(ACC)
    dlogit = g * (dg - tl.sum(g * dg, axis=2)[:, :, None])
    if pid_d == 0:
        tl.store(dlogit_ptr + offs, dlogit.to(dlogit_ptr.dtype.element_ty), mask=mask)
    if WRITE_DX:
        _gate_dx(dlogit, wg_ptr, dx_ptr, rows, pid_d, B, D, T, E, T_PAD, E_PAD, ACC, PREC, BLOCK_M, BLOCK_D)
