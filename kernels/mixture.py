"""Expert mixture kernels: the last expert layer and every task's weighted sum, fused.

Forward:  a program owns rows x output columns; it loops over the experts, forms
          ``f = act(a_e @ W[e] + b[e])`` for its tile and adds ``G[:, t, e] * f`` into a
          ``[rows, T_PAD, cols]`` accumulator, so the ``[B, E, H]`` expert outputs never reach memory.
Backward: a program owns rows x one expert; it recomputes ``pre`` tile by tile (the op contract gives
          backward only the inputs), reduces ``dG[b, t, e] = <dm[t, b], f_e[b]>`` over the columns and
          writes ``dpre = (sum_t G[b, t, e] dm[t, b]) * act'(pre)``, which ``linear.input_grad`` and
          ``linear.weight_grad`` turn into ``da``, ``dW`` and ``db``.
"""

import triton
import triton.language as tl

from .common import act, act_grad, autotune, cfg, pre_tile

_CONFIGS = [
    cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
    cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_stages=4),
    cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8),
    cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8),
    cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8),
]
_INTERPRET_CONFIG = cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)


def _fits_registers(configs, named_args, **kwargs):
    """Keep configs whose [BLOCK_M, T_PAD, BLOCK_N] fp32 accumulator stays near 128 registers a thread."""
    t_pad = kwargs["T_PAD"]
    fit = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * t_pad <= 128 * 32 * c.num_warps]
    return fit or configs[:1]


@autotune(_CONFIGS, _INTERPRET_CONFIG, key=["B_BUCKET", "K", "N", "E", "T"], prune=_fits_registers)
@triton.jit
def expert_mixture_fwd(a_ptr, w_ptr, bias_ptr, g_ptr, m_ptr, B, K, N, E, T, stride_ab, stride_ae, B_BUCKET,
                       ACT: tl.constexpr, HAS_BIAS: tl.constexpr, T_PAD: tl.constexpr,
                       DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """m[T, B, N] = sum_e G[:, t, e] * act(a_e @ W[e] + b[e]); G is [B, T, E]. 1-D grid over (rows, cols)."""
    # The column tiles of one row block are neighbours in launch order: they share a's rows in L2.
    n_tiles = tl.cdiv(N, BLOCK_N)
    rows = (tl.program_id(0) // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    ts = tl.arange(0, T_PAD)
    row_ok = rows < B
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * (T * E) + ts[None, :] * E
    g_ok = row_ok[:, None] & (ts < T)[None, :]
    acc = tl.zeros((BLOCK_M, T_PAD, BLOCK_N), ACC)
    for e in range(0, E):
        f = act(pre_tile(a_ptr, w_ptr, bias_ptr, e, rows, cols, B, K, N, stride_ab, stride_ae,
                         HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT, ACC, PREC), ACT)
        g = tl.load(g_rows + e, mask=g_ok, other=0.0).to(ACC)
        acc += g[:, :, None] * f[:, None, :]
    out = m_ptr + (ts.to(tl.int64)[None, :, None] * B + rows[:, None, None]) * N + cols[None, None, :]
    mask = g_ok[:, :, None] & (cols < N)[None, None, :]
    tl.store(out, acc.to(m_ptr.dtype.element_ty), mask=mask)


@autotune(_CONFIGS, _INTERPRET_CONFIG, key=["B_BUCKET", "K", "N", "E", "T"], prune=_fits_registers)
@triton.jit
def expert_mixture_bwd_rows(dm_ptr, a_ptr, w_ptr, bias_ptr, g_ptr, dpre_ptr, dg_ptr, B, K, N, E, T,
                            stride_ab, stride_ae, B_BUCKET,
                            ACT: tl.constexpr, HAS_BIAS: tl.constexpr, T_PAD: tl.constexpr,
                            DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dpre[B, E, N] and dG[B, T, E] from dm[T, B, N]; 1-D grid over (rows, experts): one owner per element."""
    # The experts of one row block are neighbours in launch order: they share dm's and a's rows in L2.
    e = tl.program_id(0) % E
    rows = (tl.program_id(0) // E) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    ts = tl.arange(0, T_PAD)
    row_ok = rows < B
    g_offs = rows64[:, None] * (T * E) + ts[None, :] * E + e
    g_ok = row_ok[:, None] & (ts < T)[None, :]
    g = tl.load(g_ptr + g_offs, mask=g_ok, other=0.0).to(ACC)
    dg = tl.zeros((BLOCK_M, T_PAD), ACC)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        pre = pre_tile(a_ptr, w_ptr, bias_ptr, e, rows, cols, B, K, N, stride_ab, stride_ae,
                       HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT, ACC, PREC)
        dm = tl.load(dm_ptr + (ts.to(tl.int64)[None, :, None] * B + rows[:, None, None]) * N + cols[None, None, :],
                     mask=g_ok[:, :, None] & col_ok[None, None, :], other=0.0).to(ACC)
        dg += tl.sum(dm * act(pre, ACT)[:, None, :], axis=2)
        dpre = tl.sum(g[:, :, None] * dm, axis=1) * act_grad(pre, ACT)
        tl.store(dpre_ptr + rows64[:, None] * (E * N) + e * N + cols[None, :], dpre.to(dpre_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
    tl.store(dg_ptr + g_offs, dg.to(dg_ptr.dtype.element_ty), mask=g_ok)
