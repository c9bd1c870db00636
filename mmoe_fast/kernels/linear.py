"""Grouped linear kernels (hidden expert layers) and the GEMMs every backward shares.

``grouped_linear_fwd``:  out[B, E, N] = act(a_e @ W[e] + b[e]), one program per (rows, cols, expert).
``grouped_linear_bwd_rows``: dpre = dout * act'(pre), recomputing pre (skipped for identity).
``input_grad``:  da = sum_e dpre_e @ W[e]^T, summed over the experts for a shared input.
``weight_grad``: dW[e] = a_e^T @ dy_e and db[e] = sum_b dy_e without atomics: a program owns one
                 weight tile of one slice of the batch and loops over its rows; the slices' partial sums
                 land in a ``[replicas, slices, E, K, N]`` buffer that the launcher sums over the slices
                 in a fixed order (one slice: the program writes the gradient itself, in the output dtype).
Every kernel runs S replicas along its last grid axis, a replica's tensors ``stride_*r`` apart
(``common.replica``).
"""

import triton
import triton.language as tl

from .common import SIZES_BUT_E, act, act_grad, autotune, cfg, fp32_fma, mma, pre_tile, replica, without

_SQUARE = cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
_TALL = cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8)
_WIDE = cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8)
_DEEP = cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_stages=4)
_TILE_CONFIGS = [_SQUARE, _TALL, _WIDE, _DEEP]
# Unaligned launches (common.aligned): (tensor-core dots, exact fp32 dots), configs that compile without
# spills there for every flag under Triton 3.6 and 3.9 (compile_check.py): not 64 deep in 4 stages.
_FWD_UNALIGNED = ([_TALL, _WIDE, _SQUARE], [_TALL, _SQUARE])
_SQUARE_8 = cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8)
_BWD_ROWS_UNALIGNED = ([_TALL, _SQUARE, _SQUARE_8], [_SQUARE_8, cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)])
_KEY = ["B_BUCKET", "S_BUCKET", "K", "N", "E"]  # B and S bucketed to powers of two; the weight shapes exact


@triton.jit
def _tile(E, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(expert, rows, cols) of this program; the column tiles, then the experts, of a row block are
    neighbours in launch order, so they share a's rows in L2."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    e = (pid // n_tiles) % E
    rows = (pid // (n_tiles * E)) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, rows, cols


@autotune(_TILE_CONFIGS, cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32), key=_KEY, unaligned=_FWD_UNALIGNED,
          aligned_args=SIZES_BUT_E)
@triton.jit
def grouped_linear_fwd(a_ptr, w_ptr, bias_ptr, out_ptr, B, K, N, E, stride_ab, stride_ae,
                       stride_ar, stride_wr, stride_br, stride_outr, B_BUCKET, S_BUCKET,
                       ACT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
                       PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[B, E, N] = act(a_e @ W[e] + b[e]); grid ((rows, experts, cols), replicas)."""
    a_ptr = replica(a_ptr, stride_ar, 1)
    w_ptr = replica(w_ptr, stride_wr, 1)
    bias_ptr = replica(bias_ptr, stride_br, 1)
    out_ptr = replica(out_ptr, stride_outr, 1)
    e, rows, cols = _tile(E, N, BLOCK_M, BLOCK_N)
    y = act(pre_tile(a_ptr, w_ptr, bias_ptr, e, rows, cols, B, K, N, stride_ab, stride_ae,
                     HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT, ACC, PREC), ACT)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * (E * N) + e * N + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=(rows < B)[:, None] & (cols < N)[None, :])


def _bwd_rows_fit(configs, named_args, **kwargs):
    """Exact fp32 dots spill at 128x128 (compile_check.py)."""
    if fp32_fma(kwargs):
        return without(configs, lambda c: c.kwargs["BLOCK_N"] == 128)
    return configs


@autotune(_TILE_CONFIGS, cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32), key=_KEY, prune=_bwd_rows_fit,
          unaligned=_BWD_ROWS_UNALIGNED, aligned_args=SIZES_BUT_E)
@triton.jit
def grouped_linear_bwd_rows(dout_ptr, a_ptr, w_ptr, bias_ptr, dpre_ptr, B, K, N, E, stride_ab, stride_ae,
                            stride_doutr, stride_ar, stride_wr, stride_br, stride_dpr, B_BUCKET, S_BUCKET,
                            ACT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
                            PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """dpre[B, E, N] = dout * act'(a_e @ W[e] + b[e]); grid ((rows, experts, cols), replicas)."""
    dout_ptr = replica(dout_ptr, stride_doutr, 1)
    a_ptr = replica(a_ptr, stride_ar, 1)
    w_ptr = replica(w_ptr, stride_wr, 1)
    bias_ptr = replica(bias_ptr, stride_br, 1)
    dpre_ptr = replica(dpre_ptr, stride_dpr, 1)
    e, rows, cols = _tile(E, N, BLOCK_M, BLOCK_N)
    offs = rows.to(tl.int64)[:, None] * (E * N) + e * N + cols[None, :]
    mask = (rows < B)[:, None] & (cols < N)[None, :]
    dpre = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(ACC)
    if ACT != "identity":
        dpre *= act_grad(pre_tile(a_ptr, w_ptr, bias_ptr, e, rows, cols, B, K, N, stride_ab, stride_ae,
                                  HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT, ACC, PREC), ACT)
    tl.store(dpre_ptr + offs, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)


def _weight_grad_fit(configs, kwargs):
    """Drop what compile_check.py finds broken: exact fp32 dots spill with 8 warps at 128x64; fp64's
    64x128x128 tile needs 261 KB of shared memory, over the 227 KB a block may have."""
    return without(configs, lambda c: (fp32_fma(kwargs) and c.num_warps == 8 and c.kwargs["BLOCK_N"] == 64)
                   or (kwargs.get("ACC") == tl.float64 and c.kwargs["BLOCK_N"] == 128))


# input_grad's output tile is [BLOCK_M, BLOCK_K]; BLOCK_N steps through its long reduction (E * N for
# a shared input). The last two are for exact fp32 dots, which spill in the others (compile_check.py,
# Triton 3.6 and 3.9): 8 warps without the gate's share, a 16-wide reduction step with it.
_INPUT_GRAD_CONFIGS = [
    cfg(BLOCK_M=64, BLOCK_K=64, BLOCK_N=32), cfg(BLOCK_M=128, BLOCK_K=64, BLOCK_N=32, num_warps=8),
    cfg(BLOCK_M=128, BLOCK_K=128, BLOCK_N=32, num_warps=8), cfg(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, num_stages=4),
    cfg(BLOCK_M=64, BLOCK_K=64, BLOCK_N=32, num_warps=8), cfg(BLOCK_M=64, BLOCK_K=64, BLOCK_N=16),
]


# Unaligned launches (common.aligned): 16-wide reduction steps or 8 warps (compile_check.py, Triton 3.6 and 3.9).
_STEP16_8 = cfg(BLOCK_M=64, BLOCK_K=64, BLOCK_N=16, num_warps=8)
_INPUT_GRAD_UNALIGNED = ([_INPUT_GRAD_CONFIGS[4], cfg(BLOCK_M=64, BLOCK_K=64, BLOCK_N=16), _STEP16_8],
                         [_STEP16_8, cfg(BLOCK_M=64, BLOCK_K=32, BLOCK_N=32, num_warps=8)])


def _input_grad_fit(configs, named_args, **kwargs):
    if fp32_fma(kwargs):
        return [configs[-1] if kwargs.get("GATE") else configs[-2]]
    return configs[:-2]


# E_PER_PROGRAM in the key: a shared input's gradient (all E experts per program) and a per-expert one (one) are
# different work at the same shapes, and must not share a tuned config.
@autotune(_INPUT_GRAD_CONFIGS, cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32), key=[*_KEY, "E_PER_PROGRAM"],
          prune=_input_grad_fit, unaligned=_INPUT_GRAD_UNALIGNED)
@triton.jit
def input_grad(dy_ptr, w_ptr, da_ptr, dlogit_ptr, wg_ptr, B, K, N, E, T, E_PER_PROGRAM,
               stride_yb, stride_ye, stride_db, stride_de, stride_yr, stride_wr, stride_dr, stride_lr, stride_gr,
               B_BUCKET, S_BUCKET, GATE: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """da[b, j, k] = sum over the experts e of group j of dy[b, e, :] @ W[e, k, :].

    A shared input has one group of all E experts (E_PER_PROGRAM = E); a per-expert input has E groups
    of one. ``da`` is written at ``b * stride_db + j * stride_de + k``. Grid ((rows, groups, k), replicas);
    a replica's dy, W, da, dlogit and Wg start ``stride_yr``, ``stride_wr``, ``stride_dr``, ``stride_lr``,
    ``stride_gr`` apart. GATE (shared input only): also add the gate's share of dx, ``dlogit[b] @ Wg^T``
    (dlogit is [B, T * E] in ACC dtype, Wg is [T, K, E]), so dx is written once.
    """
    dy_ptr = replica(dy_ptr, stride_yr, 1)
    w_ptr = replica(w_ptr, stride_wr, 1)
    da_ptr = replica(da_ptr, stride_dr, 1)
    dlogit_ptr = replica(dlogit_ptr, stride_lr, 1)
    wg_ptr = replica(wg_ptr, stride_gr, 1)
    k_tiles = tl.cdiv(K, BLOCK_K)
    groups = E // E_PER_PROGRAM
    pid = tl.program_id(0)
    j = (pid // k_tiles) % groups
    rows = (pid // (k_tiles * groups)) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = (pid % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    row_ok = rows < B
    acc = tl.zeros((BLOCK_M, BLOCK_K), ACC)
    for i in range(0, E_PER_PROGRAM):
        e = j * E_PER_PROGRAM + i
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            dy = tl.load(dy_ptr + rows64[:, None] * stride_yb + e * stride_ye + ns[None, :],
                         mask=row_ok[:, None] & (ns < N)[None, :], other=0.0)
            wt = tl.load(w_ptr + e * K * N + ks[None, :] * N + ns[:, None],
                         mask=(ns < N)[:, None] & (ks < K)[None, :], other=0.0)
            acc = mma(dy, wt, acc, DOT, PREC)
    if GATE:
        for c0 in range(0, T * E, BLOCK_N):
            c = c0 + tl.arange(0, BLOCK_N)
            c_ok = c < T * E
            dl = tl.load(dlogit_ptr + rows64[:, None] * (T * E) + c[None, :], mask=row_ok[:, None] & c_ok[None, :],
                         other=0.0)
            wgt = tl.load(wg_ptr + (c // E)[:, None] * (K * E) + ks[None, :] * E + (c % E)[:, None],
                          mask=c_ok[:, None] & (ks < K)[None, :], other=0.0)
            acc = mma(dl, wgt, acc, ACC, PREC)
    tl.store(da_ptr + rows64[:, None] * stride_db + j * stride_de + ks[None, :], acc.to(da_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (ks < K)[None, :])


_WEIGHT_GRAD_CONFIGS = [cfg(BLOCK_B=32, BLOCK_K=64, BLOCK_N=64), cfg(BLOCK_B=64, BLOCK_K=64, BLOCK_N=64, num_stages=4),
                        cfg(BLOCK_B=32, BLOCK_K=128, BLOCK_N=64, num_warps=8),
                        cfg(BLOCK_B=64, BLOCK_K=128, BLOCK_N=128, num_warps=8)]


@autotune(
    _WEIGHT_GRAD_CONFIGS,
    cfg(BLOCK_B=32, BLOCK_K=32, BLOCK_N=32),
    key=["B_BUCKET", "S_BUCKET", "K", "N", "E", "ROWS_PER_SPLIT"],
    prune=lambda configs, named_args, **kw: _weight_grad_fit(configs, kw),
    # unaligned: the 128 x 128 tile spills (compile_check.py), and with exact fp32 dots 8 warps
    unaligned=(_WEIGHT_GRAD_CONFIGS[:3], _WEIGHT_GRAD_CONFIGS[:2]),
    aligned_args=SIZES_BUT_E,
)
@triton.jit
def weight_grad(a_ptr, dy_ptr, dw_ptr, db_ptr, B, K, N, E, ROWS_PER_SPLIT, stride_ab, stride_ae, stride_yb, stride_ye,
                stride_ar, stride_yr, B_BUCKET, S_BUCKET, DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """dW_partial[s, e] = a_e[rows of s]^T @ dy_e[rows of s], db_partial[s, e] = sum of dy_e over them.

    Grid ((K blocks, N blocks), slices * E, replicas); slice s holds rows [s * ROWS_PER_SPLIT,
    (s + 1) * ROWS_PER_SPLIT). ``a[b, e, k]`` at ``b * stride_ab + e * stride_ae + k``, ``dy[b, e, n]`` at
    ``b * stride_yb + e * stride_ye + n``, a replica's ``stride_ar``, ``stride_yr`` apart; the partials are
    [replicas, slices, E, K, N] and [replicas, slices, E, N].
    """
    a_ptr = replica(a_ptr, stride_ar, 2)
    dy_ptr = replica(dy_ptr, stride_yr, 2)
    k_tiles = tl.cdiv(K, BLOCK_K)
    pid_k = tl.program_id(0) % k_tiles
    e = tl.program_id(1) % E
    s = tl.program_id(1) // E
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = (tl.program_id(0) // k_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    lo = s * ROWS_PER_SPLIT
    hi = tl.minimum(lo + ROWS_PER_SPLIT, B)
    acc = tl.zeros((BLOCK_K, BLOCK_N), ACC)
    dbias = tl.zeros((BLOCK_N,), ACC)
    for b0 in range(lo, hi, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rows64 = rows.to(tl.int64)
        row_ok = rows < hi
        at = tl.load(a_ptr + rows64[None, :] * stride_ab + e * stride_ae + ks[:, None],
                     mask=(ks < K)[:, None] & row_ok[None, :], other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_yb + e * stride_ye + ns[None, :],
                     mask=row_ok[:, None] & (ns < N)[None, :], other=0.0)
        acc = mma(at, dy, acc, DOT, PREC)
        dbias += tl.sum(dy.to(ACC), axis=0)
    slot = tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)  # (replica, slice, expert)
    tl.store(dw_ptr + (slot * K + ks[:, None]).to(tl.int64) * N + ns[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=(ks < K)[:, None] & (ns < N)[None, :])
    if pid_k == 0:  # one owner for each db element
        tl.store(db_ptr + slot * N + ns, dbias.to(db_ptr.dtype.element_ty), mask=ns < N)
