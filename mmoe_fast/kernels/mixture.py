"""Expert mixture kernels: the last expert layer and every task's weighted sum, fused.

Forward:  a program owns rows x output columns; it loops over the experts, forms
          ``f = act(a_e @ W[e] + b[e])`` for its tile and adds ``G[:, t, e] * f`` into one accumulator
          per task, so the ``[B, E, H]`` expert outputs never reach memory.
Backward: a program owns rows x one expert; it recomputes ``pre`` tile by tile (the op contract gives
          backward only the inputs), reduces ``dG[b, t, e] = <dm[t, b], f_e[b]>`` over the columns and
          writes ``dpre = (sum_t G[b, t, e] dm[t, b]) * act'(pre)``, which ``linear.input_grad`` and
          ``linear.weight_grad`` turn into ``da``, ``dW`` and ``db``.
Both run S replicas along grid axis 1, a replica's tensors ``stride_*r`` apart (``common.replica``).
"""

import triton
import triton.language as tl

from .common import SIZES_BUT_E, act, act_grad, autotune, cfg, fp32_fma, pre_tile, replica

_CONFIGS = [
    cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
    cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8),
    cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4),
    cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8),
    cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8),
    cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8),  # half the k-steps of 128x64x32
]
# The backward holds more tiles (pre, f, df, dm, act'): narrower column tiles or more warps.
_BWD_CONFIGS = [
    cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8),
    cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32),
    cfg(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, num_warps=8),
]
# Exact fp32 dots (no tensor cores) keep their operands in registers: narrower tiles, the only ones that
# compile without spills for every TASKS under Triton 3.6 and 3.9 (compile_check.py).
_FMA_CONFIGS = [cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8), cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32)]
_INTERPRET_CONFIG = cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)
# Unaligned launches (common.aligned): (tensor-core dots, exact fp32 dots), the configs that compile without
# spills there for every flag under Triton 3.6 and 3.9 (compile_check.py): 32 columns on 8 warps. The others
# spill up to 720 bytes (forward) and 1 KB (backward); exact fp32 dots in the backward need 16-deep steps too.
_NARROW = cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8)
_NARROW_STEP16 = cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=8)
_UNALIGNED = ([_NARROW, _NARROW_STEP16], [_NARROW])
_BWD_UNALIGNED = ([_NARROW, _NARROW_STEP16], [_NARROW_STEP16])
MAX_TASKS = 4  # task accumulators one forward program holds; more tasks run as several task groups


def _fits_registers(configs, named_args, **kwargs):
    """Keep configs whose fp32 tiles (TASKS accumulators and the pre-activation) fit a thread's registers
    beside the rest of the kernel (255 is the most a thread has; compile_check.py, Triton 3.6 and 3.9):
    <= 160 registers of tiles with 16-bit inputs, which reach the tensor cores from shared memory (128x64 and
    64x128 tiles up to four tasks), <= 90 with fp32 inputs, whose tf32 rounding passes through registers.
    Exact fp32 dots take ``_FMA_CONFIGS`` (the last ones) instead."""
    if fp32_fma(kwargs):
        return configs[-len(_FMA_CONFIGS):]
    configs = configs[:-len(_FMA_CONFIGS)]
    tiles = (kwargs["TASKS"] + 1) * (2 if kwargs["ACC"] == tl.float64 else 1)
    budget = 160 if kwargs.get("DOT") in (tl.bfloat16, tl.float16) else 90
    fit = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * tiles <= budget * 32 * c.num_warps]
    return fit or configs[:1]


def _bwd_fits(configs, named_args, **kwargs):
    """Exact fp32 dots: only the first config compiles without spills for every flag (compile_check.py)."""
    return configs[:1] if fp32_fma(kwargs) else configs


@triton.jit
def _gate_column(g_ptr, rows, t, B, T, E, e, ACC: tl.constexpr):
    """G[rows, t, e] as a [BLOCK_M] vector (0 outside the batch); a task t >= T reads task T - 1's gates,
    never stored. (A scalar term in a load mask breaks the interpreter, so t is clamped instead.)"""
    t = tl.minimum(t, T - 1)
    return tl.load(g_ptr + rows.to(tl.int64) * (T * E) + t * E + e, mask=rows < B, other=0.0).to(ACC)


@triton.jit
def _store_task(m_ptr, acc, t, T, B, N, rows, cols):
    """m[t, rows, cols] = acc, for t < T."""
    if t < T:
        tl.store(m_ptr + (t.to(tl.int64) * B + rows[:, None]) * N + cols[None, :], acc.to(m_ptr.dtype.element_ty),
                 mask=(rows < B)[:, None] & (cols < N)[None, :])


@autotune(_CONFIGS + _FMA_CONFIGS, _INTERPRET_CONFIG, key=["B_BUCKET", "S_BUCKET", "K", "N", "E", "T"],
          prune=_fits_registers, unaligned=_UNALIGNED, aligned_args=SIZES_BUT_E)
@triton.jit
def expert_mixture_fwd(a_ptr, w_ptr, bias_ptr, g_ptr, m_ptr, B, K, N, E, T, stride_ab, stride_ae,
                       stride_ar, stride_wr, stride_br, stride_gr, stride_mr, B_BUCKET, S_BUCKET,
                       ACT: tl.constexpr, HAS_BIAS: tl.constexpr, TASKS: tl.constexpr,
                       DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """m[T, B, N] = sum_e G[:, t, e] * act(a_e @ W[e] + b[e]); G is [B, T, E].

    Grid ((rows, task groups, cols), replicas); a program holds TASKS (<= MAX_TASKS) 2-D accumulators, as
    separate tensors: a 3-D [rows, tasks, cols] accumulator takes a register layout that spills.
    """
    a_ptr = replica(a_ptr, stride_ar, 1)
    w_ptr = replica(w_ptr, stride_wr, 1)
    bias_ptr = replica(bias_ptr, stride_br, 1)
    g_ptr = replica(g_ptr, stride_gr, 1)
    m_ptr = replica(m_ptr, stride_mr, 1)
    # The column tiles of one row block are neighbours in launch order: they share a's rows in L2.
    n_tiles = tl.cdiv(N, BLOCK_N)
    groups = tl.cdiv(T, TASKS)
    pid = tl.program_id(0)
    t0 = ((pid // n_tiles) % groups) * TASKS
    rows = (pid // (n_tiles * groups)) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), ACC)  # the accumulators a program does not use are compiled away
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for e in range(0, E):
        f = act(pre_tile(a_ptr, w_ptr, bias_ptr, e, rows, cols, B, K, N, stride_ab, stride_ae,
                         HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT, ACC, PREC), ACT)
        acc0 += _gate_column(g_ptr, rows, t0, B, T, E, e, ACC)[:, None] * f
        if TASKS > 1:
            acc1 += _gate_column(g_ptr, rows, t0 + 1, B, T, E, e, ACC)[:, None] * f
        if TASKS > 2:
            acc2 += _gate_column(g_ptr, rows, t0 + 2, B, T, E, e, ACC)[:, None] * f
        if TASKS > 3:
            acc3 += _gate_column(g_ptr, rows, t0 + 3, B, T, E, e, ACC)[:, None] * f
    _store_task(m_ptr, acc0, t0, T, B, N, rows, cols)
    if TASKS > 1:
        _store_task(m_ptr, acc1, t0 + 1, T, B, N, rows, cols)
    if TASKS > 2:
        _store_task(m_ptr, acc2, t0 + 2, T, B, N, rows, cols)
    if TASKS > 3:
        _store_task(m_ptr, acc3, t0 + 3, T, B, N, rows, cols)


@autotune(_BWD_CONFIGS, _INTERPRET_CONFIG, key=["B_BUCKET", "S_BUCKET", "K", "N", "E", "T"], prune=_bwd_fits,
          unaligned=_BWD_UNALIGNED, aligned_args=SIZES_BUT_E)
@triton.jit
def expert_mixture_bwd_rows(dm_ptr, a_ptr, w_ptr, bias_ptr, g_ptr, dpre_ptr, dg_ptr, B, K, N, E, T,
                            stride_ab, stride_ae, stride_mr, stride_ar, stride_wr, stride_br, stride_gr,
                            stride_dpr, stride_dgr, B_BUCKET, S_BUCKET,
                            ACT: tl.constexpr, HAS_BIAS: tl.constexpr, T_PAD: tl.constexpr,
                            DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dpre[B, E, N] and dG[B, T, E] from dm[T, B, N]; grid ((rows, experts), replicas): one owner per
    element."""
    dm_ptr = replica(dm_ptr, stride_mr, 1)
    a_ptr = replica(a_ptr, stride_ar, 1)
    w_ptr = replica(w_ptr, stride_wr, 1)
    bias_ptr = replica(bias_ptr, stride_br, 1)
    g_ptr = replica(g_ptr, stride_gr, 1)
    dpre_ptr = replica(dpre_ptr, stride_dpr, 1)
    dg_ptr = replica(dg_ptr, stride_dgr, 1)
    # The experts of one row block are neighbours in launch order: they share dm's and a's rows in L2.
    e = tl.program_id(0) % E
    rows = (tl.program_id(0) // E) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    row_ok = rows < B
    ts = tl.arange(0, T_PAD)
    dg = tl.zeros((BLOCK_M, T_PAD), ACC)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < N)[None, :]
        pre = pre_tile(a_ptr, w_ptr, bias_ptr, e, rows, cols, B, K, N, stride_ab, stride_ae,
                       HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT, ACC, PREC)
        f = act(pre, ACT)
        df = tl.zeros((BLOCK_M, BLOCK_N), ACC)
        for t in range(0, T):
            dm = tl.load(dm_ptr + (t * B + rows64[:, None]) * N + cols[None, :], mask=mask, other=0.0).to(ACC)
            df += tl.load(g_ptr + rows64 * (T * E) + t * E + e, mask=row_ok, other=0.0).to(ACC)[:, None] * dm
            dg += tl.where(ts[None, :] == t, tl.sum(dm * f, axis=1)[:, None], 0.0)
        dpre = df * act_grad(pre, ACT)
        tl.store(dpre_ptr + rows64[:, None] * (E * N) + e * N + cols[None, :], dpre.to(dpre_ptr.dtype.element_ty),
                 mask=mask)
    g_offs = rows64[:, None] * (T * E) + ts[None, :] * E + e
    tl.store(dg_ptr + g_offs, dg.to(dg_ptr.dtype.element_ty), mask=row_ok[:, None] & (ts < T)[None, :])
