"""Numba backend: the fused ops on CPU tensors through ``mmoe_fast.kernels.numba_kernels``.

Tensors are handed to the kernels as NumPy views (no copy); outputs are allocated with ``torch.empty``
and filled through their views. The kernels run on ``torch.get_num_threads()`` threads (at most
numba's pool size), so ``torch.set_num_threads`` governs both; the results do not depend on it.
``input_grad=False`` is accepted and ignored (the kernels form ``da`` anyway; ``ops.py`` drops it).
The first call in a dtype compiles (or loads from numba's on-disk
cache) every kernel of that dtype at once, so that no later call, forward or backward, pays for
compilation; the seconds it took are logged once and kept in ``compile_seconds``.
"""

from __future__ import annotations

import logging
import time

import numba
import numpy as np
import torch

from .. import forksafe
from ..contract import ACTIVATION_CODES
from ..kernels import numba_kernels as nk

_log = logging.getLogger(__name__)
_DTYPES = (torch.float32, torch.float64)
# The kernels take a (0, 0) array and a flag for a missing bias: one compiled signature, not two.
_NO_BIAS = {torch.float32: np.empty((0, 0), np.float32), torch.float64: np.empty((0, 0), np.float64)}
compile_seconds: dict[torch.dtype, float] = {}


def _launch_threads() -> None:
    """Start numba's thread pool now, keeping torch's thread count.

    With numba's OpenMP layer both libraries share one libgomp, and numba's pool sets the process's
    OpenMP thread count to its own size when it starts: a ``torch.set_num_threads`` made before
    would be silently undone.
    """
    threads = torch.get_num_threads()
    numba.get_num_threads()
    torch.set_num_threads(threads)


_launch_threads()


def unavailable_reason() -> str | None:
    return None


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _DTYPES


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _bias(b: torch.Tensor | None, dtype: torch.dtype) -> tuple[np.ndarray, bool]:
    return (_NO_BIAS[dtype], False) if b is None else (_np(b), True)


def _per_expert(a: torch.Tensor) -> torch.Tensor:
    """a[B, K] (shared) as a[B, 1, K]: the kernels index the input by expert, up to Ea = 1."""
    return a[:, None, :] if a.dim() == 2 else a


def _ready(dtype: torch.dtype) -> None:
    """Compile on first use of a dtype, and follow torch's thread count (numba's is per calling thread)."""
    forksafe.check_numba()  # a fork of a process running numba's OpenMP pool: an error, not a killed child
    if dtype not in compile_seconds:
        warmup((dtype,))
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)


def warmup(dtypes=_DTYPES) -> float:
    """Compile (or load from cache) every kernel for ``dtypes``; returns the seconds it took."""
    total = 0.0
    for dtype in dtypes:
        if dtype in compile_seconds:
            continue
        start = time.perf_counter()
        compile_seconds[dtype] = 0.0  # the calls below must not come back here
        _run_all(dtype)
        compile_seconds[dtype] = time.perf_counter() - start
        total += compile_seconds[dtype]
        _log.info("numba backend: kernels for %s ready in %.1f s", dtype, compile_seconds[dtype])
    return total


def _run_all(dtype: torch.dtype) -> None:
    """One tiny call of every kernel: numba compiles on the first call of each signature."""
    g = torch.Generator().manual_seed(0)
    B, D, E, H, T = 3, 5, 2, 4, 2
    x = torch.randn(B, D, generator=g, dtype=dtype)
    W, b = torch.randn(E, D, H, generator=g, dtype=dtype), torch.randn(E, H, generator=g, dtype=dtype)
    Wg, bg = torch.randn(T, D, E, generator=g, dtype=dtype), torch.randn(T, E, generator=g, dtype=dtype)
    G = gate_softmax(x, Wg, bg)
    gate_softmax_backward(G, G, x, Wg)
    m = expert_mixture(x, W, b, G, "relu")
    expert_mixture_backward(m, x, W, b, G, "relu")
    h = grouped_linear(x, W, b, "relu")
    grouped_linear_backward(h, x, W, b, "relu")
    mmoe(x, W, b, Wg, bg, "relu")


def gate_softmax(x, Wg, bg):
    """G[B, T, E] = softmax over e of x @ Wg[t] + bg[t]."""
    _ready(x.dtype)
    G = torch.empty(x.shape[0], Wg.shape[0], Wg.shape[2], dtype=x.dtype)
    nk.gate_softmax(_np(x), _np(Wg), *_bias(bg, x.dtype), _np(G))
    return G


def gate_softmax_backward(dG, G, x, Wg, input_grad=True):
    """(dx[B, D], dWg[T, D, E], dbg[T, E])."""
    _ready(x.dtype)
    dx, dWg = torch.empty_like(x), torch.empty_like(Wg)
    dbg = torch.empty(Wg.shape[0], Wg.shape[2], dtype=x.dtype)
    nk.gate_softmax_backward(_np(dG), _np(G), _np(x), _np(Wg), _np(dx), _np(dWg), _np(dbg))
    return dx, dWg, dbg


def expert_mixture(a, W, b, G, activation):
    """m[T, B, H] = sum_e G[:, t, e] * act(a_e @ W[e] + b[e])."""
    _ready(a.dtype)
    m = torch.empty(G.shape[1], a.shape[0], W.shape[2], dtype=a.dtype)
    nk.expert_mixture(_np(_per_expert(a)), _np(W), *_bias(b, a.dtype), _np(G), ACTIVATION_CODES[activation], _np(m))
    return m


def expert_mixture_backward(dm, a, W, b, G, activation, input_grad=True):
    """(da, dW[E, K, H], db[E, H], dG[B, T, E]); da has a's shape."""
    _ready(a.dtype)
    da, dW, dG = torch.empty_like(a), torch.empty_like(W), torch.empty_like(G)
    db = torch.empty(W.shape[0], W.shape[2], dtype=a.dtype)
    nk.expert_mixture_backward(_np(dm), _np(_per_expert(a)), _np(W), *_bias(b, a.dtype), _np(G),
                               ACTIVATION_CODES[activation], _np(_per_expert(da)), _np(dW), _np(db), _np(dG))
    return da, dW, db, dG


def grouped_linear(a, W, b, activation):
    """out[B, E, N] = act(a_e @ W[e] + b[e])."""
    _ready(a.dtype)
    out = torch.empty(a.shape[0], W.shape[0], W.shape[2], dtype=a.dtype)
    nk.grouped_linear(_np(_per_expert(a)), _np(W), *_bias(b, a.dtype), ACTIVATION_CODES[activation], _np(out))
    return out


def grouped_linear_backward(dout, a, W, b, activation, input_grad=True):
    """(da, dW[E, K, N], db[E, N]); da has a's shape."""
    _ready(a.dtype)
    da, dW = torch.empty_like(a), torch.empty_like(W)
    db = torch.empty(W.shape[0], W.shape[2], dtype=a.dtype)
    nk.grouped_linear_backward(_np(dout), _np(_per_expert(a)), _np(W), *_bias(b, a.dtype), ACTIVATION_CODES[activation],
                               _np(_per_expert(da)), _np(dW), _np(db))
    return da, dW, db


def mmoe(x, W, b, Wg, bg, activation):
    """m[T, B, H] of one layer, gates and experts in one kernel."""
    _ready(x.dtype)
    m = torch.empty(Wg.shape[0], x.shape[0], W.shape[2], dtype=x.dtype)
    nk.mmoe(_np(x), _np(W), *_bias(b, x.dtype), _np(Wg), *_bias(bg, x.dtype), ACTIVATION_CODES[activation], _np(m))
    return m
