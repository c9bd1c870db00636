"""Numba CPU kernels of the fused MMoE ops: NumPy arrays in, preallocated NumPy arrays filled.

Forward:  per block of rows, every expert's pre-activation is formed a tile of H at a time, activated
and mixed into ``m[t, b, :]`` at once, so ``[B, E, H]`` is never written.
Backward: pass 1 (parallel over rows) recomputes ``pre``, writes ``dpre[E, B, H]``, ``dG`` and the
input gradient; pass 2 (parallel over weight rows) forms ``dW[e] = a_e^T dpre_e`` and the biases.
Every output element has one owner and sums in a fixed order, so results are bitwise reproducible
whatever the number of threads. Every product goes through ``_accumulate`` (``c += x @ M``), written so
that LLVM vectorizes it over the output columns.

Shapes: ``a[B, Ea, K]`` with ``Ea = 1`` (one input shared by the experts) or ``Ea = E``; biases are
``[E, N]`` arrays, or ``(0, 0)`` arrays with ``has_bias`` False. Arrays are C-contiguous, float32 or
float64, and sums run in that dtype (the softmax in float64).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

# Absolute: a test imports a copy of this file on its own, outside the package.
from mmoe_fast.contract import GELU, RELU, SILU  # identity: the fall-through case

# No nnan/ninf: NaN in must stay NaN out. reassoc lets LLVM vectorize the reductions.
FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
ROWS = 8  # rows of the batch (or of a weight) per parallel work item
CHUNK = 256  # batch rows per pass over dpre in the weight gradients, to keep it in L2
_ITEMS = 16  # parallel work items wanted at least, when the batch is small
_MIN_TILE = 32
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _jit(parallel: bool = False):
    """njit with an on-disk cache, or without one where no cache directory is writable.

    Numba tries NUMBA_CACHE_DIR, then ``__pycache__`` beside this file, then the user's cache
    directory; when none can be written (a read-only install and a read-only home) it raises
    RuntimeError at decoration, and the kernels then compile on first use in every process.
    """

    def wrap(fn):
        try:
            return numba.njit(parallel=parallel, fastmath=FASTMATH, cache=True)(fn)
        except RuntimeError:
            return numba.njit(parallel=parallel, fastmath=FASTMATH, cache=False)(fn)

    return wrap


@_jit()
def _cdiv(n, d):
    return (n + d - 1) // d


# ---- building blocks (serial; called inside the parallel loops) ---------------------------------


@_jit()
def _accumulate(x0, x1, two, M, j0, j1, h0, c0, c1):
    """c0[i] += sum_{j0 <= j < j1} x0[j] * M[j, h0 + i] for i < len(c0); likewise c1 from x1 if ``two``.

    Four j per pass and two rows at once: each load and store of c feeds four FMAs per row, and
    each row of M loaded serves both rows. The inner loops index views from 0: an index that numba
    cannot prove non-negative gets a wraparound check, which stops LLVM from vectorizing.
    """
    n = c0.shape[0]
    j4 = j0 + (j1 - j0) // 4 * 4
    if two:
        for j in range(j0, j4, 4):
            m0, m1, m2, m3 = M[j, h0:h0 + n], M[j + 1, h0:h0 + n], M[j + 2, h0:h0 + n], M[j + 3, h0:h0 + n]
            p0, p1, p2, p3 = x0[j], x0[j + 1], x0[j + 2], x0[j + 3]
            q0, q1, q2, q3 = x1[j], x1[j + 1], x1[j + 2], x1[j + 3]
            for i in range(n):
                u0, u1, u2, u3 = m0[i], m1[i], m2[i], m3[i]
                c0[i] += p0 * u0 + p1 * u1 + p2 * u2 + p3 * u3
                c1[i] += q0 * u0 + q1 * u1 + q2 * u2 + q3 * u3
        for j in range(j4, j1):
            mj, p, q = M[j, h0:h0 + n], x0[j], x1[j]
            for i in range(n):
                c0[i] += p * mj[i]
                c1[i] += q * mj[i]
    else:
        for j in range(j0, j4, 4):
            m0, m1, m2, m3 = M[j, h0:h0 + n], M[j + 1, h0:h0 + n], M[j + 2, h0:h0 + n], M[j + 3, h0:h0 + n]
            p0, p1, p2, p3 = x0[j], x0[j + 1], x0[j + 2], x0[j + 3]
            for i in range(n):
                c0[i] += p0 * m0[i] + p1 * m1[i] + p2 * m2[i] + p3 * m3[i]
        for j in range(j4, j1):
            mj, p = M[j, h0:h0 + n], x0[j]
            for i in range(n):
                c0[i] += p * mj[i]


@_jit()
def _fill_bias(c, bias, has_bias, e, h0):
    """c[:] = bias[e, h0:h0 + len(c)], or 0."""
    if has_bias:
        c[:] = bias[e, h0:h0 + c.shape[0]]
    else:
        c[:] = 0


@_jit()
def _activate(c, code):
    """c[:] = act(c) in place; silu and gelu are evaluated in float64."""
    if code == RELU:
        for i in range(c.shape[0]):
            v = c[i]
            c[i] = 0 if v < 0 else v  # a NaN stays NaN
    elif code == SILU:
        for i in range(c.shape[0]):
            v = float(c[i])
            c[i] = v / (1.0 + math.exp(-v))
    elif code == GELU:
        for i in range(c.shape[0]):
            v = float(c[i])
            c[i] = 0.5 * v * (1.0 + math.tanh(_GELU_C * (v + _GELU_A * v * v * v)))


@_jit()
def _activate_with_grad(c, f, code):
    """f[:] = act(c) and c[:] = act'(c)."""
    n = c.shape[0]
    if code == RELU:
        for i in range(n):
            v = c[i]
            f[i] = 0 if v < 0 else v
            c[i] = 1 if v > 0 else 0
    elif code == SILU:
        for i in range(n):
            v = float(c[i])
            s = 1.0 / (1.0 + math.exp(-v))
            f[i] = v * s
            c[i] = s * (1.0 + v * (1.0 - s))
    elif code == GELU:
        for i in range(n):
            v = float(c[i])
            th = math.tanh(_GELU_C * (v + _GELU_A * v * v * v))
            f[i] = 0.5 * v * (1.0 + th)
            c[i] = 0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * _GELU_C * (1.0 + 3.0 * _GELU_A * v * v)
    else:
        for i in range(n):
            f[i] = c[i]
            c[i] = 1


@_jit()
def _tiles(B, H):
    """(row blocks, H tiles, tile width): split H too when the batch alone gives too few work items.

    The split depends on the shapes only, never on the thread count, so neither do the results.
    """
    blocks = _cdiv(B, ROWS)
    tiles = 1
    if blocks < _ITEMS:
        tiles = max(1, min(_cdiv(_ITEMS, blocks), H // _MIN_TILE))
    width = _cdiv(_cdiv(H, tiles), 16) * 16
    return blocks, _cdiv(H, width), width


@_jit()
def _transpose_rows(a):
    """aT[ea, k, b] = a[b, ea, k]: the batch becomes the summed axis of the weight gradients."""
    B, Ea, K = a.shape
    aT = np.empty((Ea, K, B), dtype=a.dtype)
    for ea in range(Ea):
        for k in range(K):
            for b in range(B):
                aT[ea, k, b] = a[b, ea, k]
    return aT


@_jit()
def _transpose_experts(W):
    """WT[e, n, k] = W[e, k, n]: the input gradient reads W[e] by output column."""
    E, K, N = W.shape
    WT = np.empty((E, N, K), dtype=W.dtype)
    for e in range(E):
        for k in range(K):
            for j in range(N):
                WT[e, j, k] = W[e, k, j]
    return WT


@_jit()
def _gate_matrices(Wg):
    """(WgF[D, T*E], WgT[T*E, D]) from Wg[T, D, E]: one product gives every task's logits."""
    T, D, E = Wg.shape
    WgF = np.empty((D, T * E), dtype=Wg.dtype)
    WgT = np.empty((T * E, D), dtype=Wg.dtype)
    for t in range(T):
        for d in range(D):
            for e in range(E):
                WgF[d, t * E + e] = Wg[t, d, e]
                WgT[t * E + e, d] = Wg[t, d, e]
    return WgF, WgT


@_jit()
def _softmax_row(logit, Grow):
    """Grow[t, :] = softmax(logit[t*E:(t+1)*E]), max-subtracted, in float64."""
    T, E = Grow.shape
    for t in range(T):
        mx = float(logit[t * E])
        for e in range(1, E):
            if logit[t * E + e] > mx:
                mx = float(logit[t * E + e])
        s = 0.0
        for e in range(E):
            s += math.exp(logit[t * E + e] - mx)
        for e in range(E):
            Grow[t, e] = math.exp(logit[t * E + e] - mx) / s


@_jit()
def _gate_rows(x, b0, nb, WgF, bg, has_bias, G, g0):
    """G[g0 + r] = every task's gate of row b0 + r, for r < nb."""
    T, E = G.shape[1], G.shape[2]
    TE = T * E
    logit = np.empty((2, TE), dtype=x.dtype)
    bgf = bg.reshape(bg.size)
    for r in range(0, nb, 2):
        two = r + 1 < nb
        b = b0 + r
        b1 = b + 1 if two else b
        for i in range(TE):
            logit[0, i] = bgf[i] if has_bias else 0
            logit[1, i] = bgf[i] if has_bias else 0
        _accumulate(x[b], x[b1], two, WgF, 0, WgF.shape[0], 0, logit[0], logit[1])
        _softmax_row(logit[0], G[g0 + r])
        if two:
            _softmax_row(logit[1], G[g0 + r + 1])


@_jit()
def _mixture_tile(a, W, bias, has_bias, G, g0, code, b0, nb, h0, n, m):
    """m[:, b0:b0+nb, h0:h0+n] = sum_e G[g0 + r, :, e] * act(a_e[b] @ W[e] + bias[e]) over that tile."""
    E = W.shape[0]
    T = m.shape[0]
    per_expert = a.shape[1] > 1
    c = np.empty((2, n), dtype=W.dtype)
    m[:, b0:b0 + nb, h0:h0 + n] = 0
    for e in range(E):
        ea = e if per_expert else 0
        for r in range(0, nb, 2):
            two = r + 1 < nb
            b = b0 + r
            b1 = b + 1 if two else b
            _fill_bias(c[0], bias, has_bias, e, h0)
            _fill_bias(c[1], bias, has_bias, e, h0)
            _accumulate(a[b, ea], a[b1, ea], two, W[e], 0, W.shape[1], h0, c[0], c[1])
            for s in range(2 if two else 1):
                f = c[s]
                _activate(f, code)
                Grow = G[g0 + r + s]
                for t in range(T):
                    g = Grow[t, e]
                    mrow = m[t, b + s, h0:h0 + n]
                    for i in range(n):
                        mrow[i] += g * f[i]


@_jit()
def _input_grad_rows(dpre, e, b, two, WT, ea, da):
    """da[b(, b + 1), ea] += dpre[e, b] @ W[e]^T."""
    b1 = b + 1 if two else b
    _accumulate(dpre[e, b], dpre[e, b1], two, WT[e], 0, WT.shape[1], 0, da[b, ea], da[b1, ea])


@_jit()
def _mixture_backward_rows(dm, a, W, WT, bias, has_bias, G, code, b0, nb, da, dpre, dG):
    """Rows b0..b0+nb of the mixture's backward: dG[b], dpre[:, b] and da[b] (overwritten)."""
    E, K, H = W.shape
    T = dm.shape[0]
    per_expert = a.shape[1] > 1
    c = np.empty((2, H), dtype=W.dtype)
    f = np.empty(H, dtype=W.dtype)
    for r in range(nb):
        da[b0 + r, :, :] = 0
    for e in range(E):
        ea = e if per_expert else 0
        for r in range(0, nb, 2):
            two = r + 1 < nb
            b = b0 + r
            b1 = b + 1 if two else b
            _fill_bias(c[0], bias, has_bias, e, 0)
            _fill_bias(c[1], bias, has_bias, e, 0)
            _accumulate(a[b, ea], a[b1, ea], two, W[e], 0, K, 0, c[0], c[1])
            for s in range(2 if two else 1):
                dact = c[s]
                _activate_with_grad(dact, f, code)
                Grow, dGrow, dp = G[b + s], dG[b + s], dpre[e, b + s]
                for t in range(T):
                    dmt = dm[t, b + s]
                    acc = 0.0
                    for i in range(H):
                        acc += dmt[i] * f[i]
                    dGrow[t, e] = acc
                for i in range(H):
                    dp[i] = 0
                for t in range(T):
                    g = Grow[t, e]
                    dmt = dm[t, b + s]
                    for i in range(H):
                        dp[i] += g * dmt[i]
                for i in range(H):
                    dp[i] *= dact[i]
            _input_grad_rows(dpre, e, b, two, WT, ea, da)


@_jit()
def _gate_backward_rows(dG, G, b0, nb, WgT, dlogit, dx):
    """dlogit[b] = G * (dG - sum_e G dG) for rows b0..b0+nb, and dx[b] += dlogit[b] @ WgT."""
    T, E = G.shape[1], G.shape[2]
    for r in range(nb):
        Grow, dGrow, dl = G[b0 + r], dG[b0 + r], dlogit[b0 + r]
        for t in range(T):
            s = 0.0
            for e in range(E):
                s += Grow[t, e] * dGrow[t, e]
            for e in range(E):
                dl[t * E + e] = Grow[t, e] * (dGrow[t, e] - s)
    for r in range(0, nb, 2):
        two = r + 1 < nb
        b = b0 + r
        b1 = b + 1 if two else b
        _accumulate(dlogit[b], dlogit[b1], two, WgT, 0, T * E, 0, dx[b], dx[b1])


# ---- weight gradients (parallel over weight rows; the batch is summed inside, in order) ---------


@_jit(parallel=True)
def _expert_weight_grads(a, dpre, dW, db):
    """dW[e] = a_e^T @ dpre[e] and db[e] = sum_b dpre[e, b] (overwritten)."""
    E, K, H = dW.shape
    B = a.shape[0]
    per_expert = a.shape[1] > 1
    aT = _transpose_rows(a)
    kblocks = _cdiv(K, ROWS)
    for item in prange(E * kblocks):
        e = item // kblocks
        k0 = (item % kblocks) * ROWS
        nk = min(ROWS, K - k0)
        ea = e if per_expert else 0
        dW[e, k0:k0 + nk, :] = 0
        for j0 in range(0, B, CHUNK):
            j1 = min(B, j0 + CHUNK)
            for r in range(0, nk, 2):
                two = r + 1 < nk
                k = k0 + r
                k1 = k + 1 if two else k
                _accumulate(aT[ea, k], aT[ea, k1], two, dpre[e], j0, j1, 0, dW[e, k], dW[e, k1])
    ones = np.ones(B, dtype=dpre.dtype)
    for e in prange(E):
        db[e, :] = 0
        _accumulate(ones, ones, False, dpre[e], 0, B, 0, db[e], db[e])


@_jit(parallel=True)
def _gate_weight_grads(x, dlogit, dWg, dbg):
    """dWg[t, d, e] = sum_b x[b, d] dlogit[b, t*E + e] and dbg[t, e] = sum_b dlogit[b, t*E + e]."""
    T, D, E = dWg.shape
    B = x.shape[0]
    TE = T * E
    xT = _transpose_rows(x.reshape((B, 1, D)))[0]
    prod = np.zeros((D, TE), dtype=x.dtype)
    for blk in prange(_cdiv(D, ROWS)):
        d0 = blk * ROWS
        nd = min(ROWS, D - d0)
        for r in range(0, nd, 2):
            two = r + 1 < nd
            d = d0 + r
            d1 = d + 1 if two else d
            _accumulate(xT[d], xT[d1], two, dlogit, 0, B, 0, prod[d], prod[d1])
    for t in range(T):
        for d in range(D):
            for e in range(E):
                dWg[t, d, e] = prod[d, t * E + e]
    ones = np.ones(B, dtype=x.dtype)
    dbgf = dbg.reshape(TE)
    dbgf[:] = 0
    _accumulate(ones, ones, False, dlogit, 0, B, 0, dbgf, dbgf)


# ---- the kernels of the backend contract ---------------------------------------------------------


@_jit(parallel=True)
def gate_softmax(x, Wg, bg, has_bias, G):
    """G[B, T, E] = softmax_e(x[B, D] @ Wg[t] + bg[t])."""
    B = x.shape[0]
    WgF, _ = _gate_matrices(Wg)
    for blk in prange(_cdiv(B, ROWS)):
        b0 = blk * ROWS
        _gate_rows(x, b0, min(ROWS, B - b0), WgF, bg, has_bias, G, b0)


@_jit(parallel=True)
def gate_softmax_backward(dG, G, x, Wg, dx, dWg, dbg):
    """dx[B, D], dWg[T, D, E], dbg[T, E] from dG[B, T, E] and the forward's G."""
    B, D = x.shape
    T, _, E = Wg.shape
    _, WgT = _gate_matrices(Wg)
    dlogit = np.empty((B, T * E), dtype=x.dtype)
    for blk in prange(_cdiv(B, ROWS)):
        b0 = blk * ROWS
        nb = min(ROWS, B - b0)
        dx[b0:b0 + nb, :] = 0
        _gate_backward_rows(dG, G, b0, nb, WgT, dlogit, dx)
    _gate_weight_grads(x, dlogit, dWg, dbg)


@_jit(parallel=True)
def expert_mixture(a, W, bias, has_bias, G, code, m):
    """m[T, B, H] = sum_e G[:, t, e] * act(a_e @ W[e] + bias[e])."""
    B, H = a.shape[0], W.shape[2]
    blocks, tiles, width = _tiles(B, H)
    for item in prange(blocks * tiles):
        b0 = item // tiles * ROWS
        h0 = item % tiles * width
        _mixture_tile(a, W, bias, has_bias, G, b0, code, b0, min(ROWS, B - b0), h0, min(width, H - h0), m)


@_jit(parallel=True)
def expert_mixture_backward(dm, a, W, bias, has_bias, G, code, da, dW, db, dG):
    """da (a's shape), dW[E, K, H], db[E, H], dG[B, T, E] from dm[T, B, H]."""
    E, _, H = W.shape
    B = a.shape[0]
    WT = _transpose_experts(W)
    dpre = np.empty((E, B, H), dtype=W.dtype)
    for blk in prange(_cdiv(B, ROWS)):
        b0 = blk * ROWS
        _mixture_backward_rows(dm, a, W, WT, bias, has_bias, G, code, b0, min(ROWS, B - b0), da, dpre, dG)
    _expert_weight_grads(a, dpre, dW, db)


@_jit(parallel=True)
def grouped_linear(a, W, bias, has_bias, code, out):
    """out[B, E, N] = act(a_e @ W[e] + bias[e])."""
    B, E, N = out.shape
    K = W.shape[1]
    per_expert = a.shape[1] > 1
    blocks, tiles, width = _tiles(B, N)
    for item in prange(blocks * tiles):
        b0 = item // tiles * ROWS
        nb = min(ROWS, B - b0)
        h0 = item % tiles * width
        n = min(width, N - h0)
        for e in range(E):
            ea = e if per_expert else 0
            for r in range(0, nb, 2):
                two = r + 1 < nb
                b = b0 + r
                b1 = b + 1 if two else b
                c0, c1 = out[b, e, h0:h0 + n], out[b1, e, h0:h0 + n]
                _fill_bias(c0, bias, has_bias, e, h0)
                _fill_bias(c1, bias, has_bias, e, h0)
                _accumulate(a[b, ea], a[b1, ea], two, W[e], 0, K, h0, c0, c1)
                _activate(c0, code)
                if two:
                    _activate(c1, code)


@_jit(parallel=True)
def grouped_linear_backward(dout, a, W, bias, has_bias, code, da, dW, db):
    """da (a's shape), dW[E, K, N], db[E, N] from dout[B, E, N]."""
    E, K, N = W.shape
    B = a.shape[0]
    per_expert = a.shape[1] > 1
    WT = _transpose_experts(W)
    dpre = np.empty((E, B, N), dtype=W.dtype)
    for blk in prange(_cdiv(B, ROWS)):
        b0 = blk * ROWS
        nb = min(ROWS, B - b0)
        c = np.empty((2, N), dtype=W.dtype)
        f = np.empty(N, dtype=W.dtype)  # act(pre), not needed here
        da[b0:b0 + nb, :, :] = 0
        for e in range(E):
            ea = e if per_expert else 0
            for r in range(0, nb, 2):
                two = r + 1 < nb
                b = b0 + r
                b1 = b + 1 if two else b
                _fill_bias(c[0], bias, has_bias, e, 0)
                _fill_bias(c[1], bias, has_bias, e, 0)
                _accumulate(a[b, ea], a[b1, ea], two, W[e], 0, K, 0, c[0], c[1])
                for s in range(2 if two else 1):
                    _activate_with_grad(c[s], f, code)
                    dp, do = dpre[e, b + s], dout[b + s, e]
                    for i in range(N):
                        dp[i] = do[i] * c[s, i]
                _input_grad_rows(dpre, e, b, two, WT, ea, da)
    _expert_weight_grads(a, dpre, dW, db)


@_jit(parallel=True)
def mmoe(x, W, bias, has_bias, Wg, bg, has_gate_bias, code, m):
    """m[T, B, H] of one MMoE layer: the gates of each row block are formed beside its experts."""
    B, D = x.shape
    T, _, E = Wg.shape
    H = W.shape[2]
    a = x.reshape((B, 1, D))
    WgF, _ = _gate_matrices(Wg)
    blocks, tiles, width = _tiles(B, H)
    for item in prange(blocks * tiles):
        b0 = item // tiles * ROWS
        nb = min(ROWS, B - b0)
        h0 = item % tiles * width
        G = np.empty((ROWS, T, E), dtype=x.dtype)
        _gate_rows(x, b0, nb, WgF, bg, has_gate_bias, G, 0)
        _mixture_tile(a, W, bias, has_bias, G, 0, code, b0, nb, h0, min(width, H - h0), m)
