"""Gate kernels: every task's softmax gate, and its backward, for any number of tasks and experts.

Forward:  a program owns a block of rows and one task: ``x[rows] @ Wg[t]`` with the bias and a max-subtracted
          softmax in registers. Experts come in chunks of ``E_BLOCK`` columns (a power of two, 16 to 64;
          a GPU's ``tl.dot`` needs >= 16): with one chunk the softmax is taken in place; with more, a first pass
          writes the raw logits and keeps a running max and sum per row (online softmax), a second pass
          rewrites them normalized, so registers and shared memory stay bounded whatever E is.
Backward: ``dlogit = G * (dG - sum_e G * dG)`` per task, and, if asked, ``dx = sum_t dlogit_t @ Wg[t]^T``
          accumulated over the tasks and chunks in one program per (rows, D block). ``dlogit`` is written once
          (by the first D block) for the weight-gradient reduction and, in the fused layer backward, for
          ``linear.input_grad``, which adds the gate's dx to the experts'.
"""

import triton
import triton.language as tl

from .common import autotune, cfg, fp32_fma, mma, replica, without

# Expert columns a program holds at once: wider chunks spill or overflow shared memory (compile_check.py).
MAX_E_BLOCK = 64  # forward, and backward without dx
DX_E_BLOCK = 16  # backward with dx: dlogit @ Wg^T holds a [E_BLOCK, BLOCK_D] tile of Wg besides dx


def e_block(E: int, with_dx: bool = False) -> int:
    """The expert chunk of a gate launch: E rounded up to a power of two, between 16 and ``MAX_E_BLOCK``
    (``DX_E_BLOCK`` for a backward that writes dx)."""
    return DX_E_BLOCK if with_dx else max(16, min(MAX_E_BLOCK, triton.next_power_of_2(E)))


# Unaligned launches (common.aligned): (tensor-core dots, exact fp32 dots), configs that compile without
# spills there at every chunk width under Triton 3.6 and 3.9 (compile_check.py). The aligned ones spill up to
# 1.8 KB at 64 experts a chunk; exact fp32 dots spill in every candidate but 32x16 on 8 warps.
_FWD_UNALIGNED = ([cfg(BLOCK_M=64, BLOCK_K=32, num_warps=8), cfg(BLOCK_M=64, BLOCK_K=16, num_warps=8),
                   cfg(BLOCK_M=32, BLOCK_K=16, num_warps=8)], [cfg(BLOCK_M=32, BLOCK_K=16, num_warps=8)])
_BWD_UNALIGNED = ([cfg(BLOCK_M=64, BLOCK_D=32, num_warps=8), cfg(BLOCK_M=32, BLOCK_D=64),
                   cfg(BLOCK_M=32, BLOCK_D=32)],) * 2  # the same for exact fp32 dots


def _fwd_fit(configs, named_args, **kwargs):
    """Drop configs that spill (compile_check.py, Triton 3.6 and 3.9): 32 rows x 64 deep at the widest
    chunk; 128 rows with exact fp32 dots from 32 columns up."""
    wide, fma = kwargs["E_BLOCK"] >= 64, fp32_fma(kwargs)
    return without(configs, lambda c: (wide and c.kwargs["BLOCK_M"] == 32)
                   or (fma and kwargs["E_BLOCK"] >= 32 and c.kwargs["BLOCK_M"] == 128))


def _bwd_fit(configs, named_args, **kwargs):
    """With dx, 2 warps spill (compile_check.py)."""
    return without(configs, lambda c: kwargs["WRITE_DX"] and c.num_warps == 2)


@triton.jit
def _logits(x_ptr, wg_ptr, bg_ptr, rows, t, es, B, D, E, HAS_BIAS: tl.constexpr,
            DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, E_BLOCK: tl.constexpr):
    """x[rows] @ Wg[t][:, es] + bg[t, es] as [BLOCK_M, E_BLOCK]; -inf in the columns past E."""
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < B
    e_ok = es < E
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * D
    w_cols = wg_ptr + t * D * E + es[None, :]
    acc = tl.zeros((BLOCK_M, E_BLOCK), ACC)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + ks
        x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k[None, :] < D), other=0.0)
        w = tl.load(w_cols + k[:, None] * E, mask=(k[:, None] < D) & e_ok[None, :], other=0.0)
        acc = mma(x, w, acc, DOT, PREC)
    if HAS_BIAS:
        acc += tl.load(bg_ptr + t * E + es, mask=e_ok, other=0.0).to(ACC)[None, :]
    return tl.where(e_ok[None, :], acc, float("-inf"))


@autotune(
    [cfg(BLOCK_M=64, BLOCK_K=32), cfg(BLOCK_M=128, BLOCK_K=32, num_warps=8), cfg(BLOCK_M=32, BLOCK_K=64, num_warps=2)],
    cfg(BLOCK_M=64, BLOCK_K=32),
    # B and the replica count S are bucketed to powers of two: batches vary, weights do not
    key=["B_BUCKET", "S_BUCKET", "D", "T", "E"],
    prune=_fwd_fit,
    unaligned=_FWD_UNALIGNED,
)
@triton.jit
def gate_softmax_fwd(x_ptr, wg_ptr, bg_ptr, g_ptr, logit_ptr, B, D, T, E, stride_xr, stride_wr, stride_br,
                     stride_gr, B_BUCKET, S_BUCKET, HAS_BIAS: tl.constexpr, E_BLOCK: tl.constexpr,
                     DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """G[B, T, E] = softmax_e(x[B, D] @ Wg[t] + bg[t]); Wg is [T, D, E], bg [T, E]. Grid over
    ((row blocks, tasks), replicas); the tasks of a row block are neighbours in launch order (they share x's
    rows in L2). ``logit_ptr``: [B, T, E] scratch in ACC dtype, used only when E > E_BLOCK. A replica's
    tensors are ``stride_*r`` apart (G and the scratch both ``stride_gr``)."""
    x_ptr = replica(x_ptr, stride_xr, 1)
    wg_ptr = replica(wg_ptr, stride_wr, 1)
    bg_ptr = replica(bg_ptr, stride_br, 1)
    g_ptr = replica(g_ptr, stride_gr, 1)
    logit_ptr = replica(logit_ptr, stride_gr, 1)
    t = tl.program_id(0) % T
    rows = (tl.program_id(0) // T) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * (T * E) + t * E
    if E <= E_BLOCK:
        es = tl.arange(0, E_BLOCK)
        logits = _logits(x_ptr, wg_ptr, bg_ptr, rows, t, es, B, D, E, HAS_BIAS, DOT, ACC, PREC, BLOCK_M, BLOCK_K,
                         E_BLOCK)
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        g = p / tl.sum(p, axis=1)[:, None]
        tl.store(g_rows + es[None, :], g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & (es < E)[None, :])
    else:
        # Online softmax over the chunks; the raw logits wait in the ACC-dtype scratch.
        l_rows = logit_ptr + rows.to(tl.int64)[:, None] * (T * E) + t * E
        m = tl.full((BLOCK_M,), float("-inf"), ACC)
        s = tl.zeros((BLOCK_M,), ACC)
        for e0 in range(0, E, E_BLOCK):
            es = e0 + tl.arange(0, E_BLOCK)
            logits = _logits(x_ptr, wg_ptr, bg_ptr, rows, t, es, B, D, E, HAS_BIAS, DOT, ACC, PREC, BLOCK_M,
                             BLOCK_K, E_BLOCK)
            m_new = tl.maximum(m, tl.max(logits, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
            m = m_new
            tl.store(l_rows + es[None, :], logits, mask=row_ok[:, None] & (es < E)[None, :])
        for e0 in range(0, E, E_BLOCK):
            es = e0 + tl.arange(0, E_BLOCK)
            mask = row_ok[:, None] & (es < E)[None, :]
            logits = tl.load(l_rows + es[None, :], mask=mask, other=float("-inf"))
            g = tl.exp(logits - m[:, None]) / s[:, None]
            tl.store(g_rows + es[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)


@autotune(
    [cfg(BLOCK_M=64, BLOCK_D=64), cfg(BLOCK_M=128, BLOCK_D=64, num_warps=8), cfg(BLOCK_M=32, BLOCK_D=64, num_warps=2)],
    cfg(BLOCK_M=64, BLOCK_D=32),
    key=["B_BUCKET", "S_BUCKET", "D", "T", "E"],
    prune=_bwd_fit,
    unaligned=_BWD_UNALIGNED,
)
@triton.jit
def gate_softmax_bwd(dg_ptr, g_ptr, wg_ptr, dx_ptr, dlogit_ptr, B, D, T, E, stride_dgr, stride_gr, stride_wr,
                     stride_dxr, stride_lr, B_BUCKET, S_BUCKET, WRITE_DX: tl.constexpr, E_BLOCK: tl.constexpr,
                     ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dlogit[B, T, E] (ACC dtype; written by the programs of the first D block) and, if WRITE_DX, dx[B, D]
    (the fused layer backward adds dx inside ``linear.input_grad`` instead; its grid has one D block).
    Grid (row blocks, D blocks, replicas); a program loops over the tasks and their expert chunks.
    A replica's tensors are ``stride_*r`` apart."""
    dg_ptr = replica(dg_ptr, stride_dgr, 2)
    g_ptr = replica(g_ptr, stride_gr, 2)
    wg_ptr = replica(wg_ptr, stride_wr, 2)
    dx_ptr = replica(dx_ptr, stride_dxr, 2)
    dlogit_ptr = replica(dlogit_ptr, stride_lr, 2)
    pid_d = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    row_ok = rows < B
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dx = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for t in range(0, T):
        base = rows64[:, None] * (T * E) + t * E
        # sum_e G * dG over every chunk of the task first
        gdg = tl.zeros((BLOCK_M,), ACC)
        for e0 in range(0, E, E_BLOCK):
            es = e0 + tl.arange(0, E_BLOCK)
            mask = row_ok[:, None] & (es < E)[None, :]
            g = tl.load(g_ptr + base + es[None, :], mask=mask, other=0.0).to(ACC)
            dg = tl.load(dg_ptr + base + es[None, :], mask=mask, other=0.0).to(ACC)
            gdg += tl.sum(g * dg, axis=1)
        for e0 in range(0, E, E_BLOCK):
            es = e0 + tl.arange(0, E_BLOCK)
            e_ok = es < E
            mask = row_ok[:, None] & e_ok[None, :]
            g = tl.load(g_ptr + base + es[None, :], mask=mask, other=0.0).to(ACC)
            dg = tl.load(dg_ptr + base + es[None, :], mask=mask, other=0.0).to(ACC)
            dlogit = g * (dg - gdg[:, None])
            if pid_d == 0:
                tl.store(dlogit_ptr + base + es[None, :], dlogit.to(dlogit_ptr.dtype.element_ty), mask=mask)
            if WRITE_DX:
                # Wg[t]^T chunk [E_BLOCK, BLOCK_D]; the gate is small, so this dot runs in ACC precision.
                wt = tl.load(wg_ptr + t * D * E + ds[None, :] * E + es[:, None],
                             mask=e_ok[:, None] & (ds < D)[None, :], other=0.0)
                dx = mma(dlogit, wt, dx, ACC, PREC)
    if WRITE_DX:
        tl.store(dx_ptr + rows64[:, None] * D + ds[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (ds < D)[None, :])
