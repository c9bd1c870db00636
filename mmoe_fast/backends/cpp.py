"""C++ backend: the kernels of ``mmoe_fast._C`` (csrc/) on CPU tensors, float32 and float64.

Forward: one C++ pass over row blocks x column panels computes the gates, the expert GEMM on register
tiles, bias, activation and the gated mixture; ``[B, E, H]`` is never written, unless a training forward
(``*_train``) saves the pre-activations there for its backward.
Backward: one C++ call takes the saved pre-activations (or recomputes them: one more GEMM), forms ``dpre``
(and, for ``mmoe``, the gates' ``dlogit``) row by row into packed panels, then every weight gradient in one
GEMM over those panels (``dW``, ``db``, ``dWg``, ``dbg`` at once for ``mmoe``) and ``da`` only when wanted.
The kernels release the GIL and keep no state, so concurrent calls are safe.
"""

from __future__ import annotations

import math
import os

import torch

from .. import forksafe
from ..contract import ACTIVATION_CODES

try:
    from .. import _C
except ImportError:  # built without a compiler: the package still works, auto picks another backend
    _C = None

_SUFFIX = {torch.float32: "_f32", torch.float64: "_f64"}
DTYPES = tuple(_SUFFIX)  # what the kernels take


def unavailable_reason() -> str | None:
    return None if _C is not None else "mmoe_fast._C was not built (no C++ compiler or pybind11 at install time)"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _SUFFIX


def _kernel(name: str, dtype: torch.dtype):
    forksafe.mark_openmp_used()
    return getattr(_C, name + _SUFFIX[dtype])


def session_class(dtype: torch.dtype):
    """The packed-model class of ``_C`` for ``dtype`` (``InferenceSession``'s engine)."""
    return _kernel("Session", dtype)


def live_class(dtype: torch.dtype):
    """The class of ``_C`` for ``dtype`` that runs a model's forward on its parameters read in place."""
    return _kernel("Live", dtype)


def train_step_class(dtype: torch.dtype):
    """The class of ``_C`` for ``dtype`` that runs a one-layer MMoE's whole training step in one call."""
    return _kernel("TrainStep", dtype)


def isa() -> str | None:
    """The instruction set the kernels run (``"avx512"``, ``"avx2"``, ``"base"``); None without ``_C``."""
    return None if _C is None else _C.isa()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# A hidden expert layer's output as the one-node training path keeps it for the next layer (``grouped_linear_train``
# with ``expert_major``): ``out[B, E, N]`` as a view of an expert-major ``[E, B, N]`` block, which the next layer's
# batched GEMMs read in place (read row by row, a[B, E, K]'s experts lie E * K apart: MKL's weight gradient took
# 20% longer). The entry points here read such views (``READS_EXPERT_MAJOR``); the own kernels get rows.
READS_EXPERT_MAJOR = True


def is_expert_major(t: torch.Tensor | None) -> bool:
    """Whether ``t[B, E, K]`` lies expert by expert in memory (a transposed ``[E, B, K]`` block), not row by row."""
    return t is not None and t.dim() == 3 and not t.is_contiguous() and t.transpose(0, 1).is_contiguous()


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` row-major, as the own kernels read it (an expert-major view copied)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


_LARGE = 1 << 20


def fresh(like: torch.Tensor, shape: tuple) -> torch.Tensor:
    """An uninitialized tensor like ``like``. A large one on the CPU comes from ``_C``'s pool of kept blocks (huge
    pages, returned to the pool when the tensor dies): a fresh buffer of tens of MB per training step costs its
    page faults and zeroing, as much as the kernel that writes it."""
    numel = math.prod(shape)
    nbytes = numel * like.element_size()
    if nbytes < _LARGE or _C is None or like.device.type != "cpu":
        return like.new_empty(shape)
    return torch.frombuffer(_C.Block(nbytes), dtype=like.dtype, count=numel).view(shape)


def release_cached_memory() -> int:
    """Free the blocks the C++ backend keeps for large outputs (none in use is touched); the bytes freed.
    At most 16 blocks and 2 GiB are kept between training steps."""
    return 0 if _C is None else _C.release_blocks()


def gate_softmax(x, Wg, bg):
    T, D, E = Wg.shape
    G = x.new_empty((x.shape[0], T, E))
    _kernel("gate_softmax", x.dtype)(_ptr(x), _ptr(Wg), _ptr(bg), _ptr(G), x.shape[0], D, T, E)
    return G


def gate_softmax_backward(dG, G, x, Wg, input_grad=True):
    """(dx[B, D], dWg, dbg) through the softmax: dlogit in C++, then two small GEMMs."""
    T, D, E = Wg.shape
    B = x.shape[0]
    dlogit, dbg = torch.empty_like(G), G.new_empty((T, E))
    _kernel("gate_backward", x.dtype)(_ptr(G), _ptr(dG), _ptr(dlogit), _ptr(dbg), B, T, E)
    flat = dlogit.view(B, T * E)
    dx = torch.mm(flat, Wg.transpose(1, 2).reshape(T * E, D)) if input_grad else None
    dWg = torch.mm(x.t(), flat).view(D, T, E).transpose(0, 1).contiguous()
    return dx, dWg, dbg


# Where a training step's GEMMs run: "own" (the register-tile kernels of _C, bitwise the same for any thread
# count) or "blas" (torch's: MKL, which outruns ours by 1.2-1.6x on Intel CPUs, while on AMD ours outrun it).
GEMMS = ("auto", "own", "blas")


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def training_gemm() -> str:
    """``"own"`` or ``"blas"``: ``MMOE_FAST_CPU_GEMM`` (``auto``, ``own``, ``blas``; auto: blas where torch's BLAS
    is MKL on an Intel CPU). Read at every call, so that a test or a user may switch it."""
    wanted = os.environ.get("MMOE_FAST_CPU_GEMM", "auto")
    if wanted not in GEMMS:
        raise ValueError(f"MMOE_FAST_CPU_GEMM must be one of {GEMMS}, got {wanted!r}")
    if wanted != "auto":
        return wanted
    return _AUTO_GEMM


_AUTO_GEMM = "blas" if torch.backends.mkl.is_available() and _cpu_vendor() == "GenuineIntel" else "own"

# Under "blas", GEMMs smaller than this (B x E x K x N multiply-adds) still run on _C's kernels: one C++ call in
# place of several torch ops, whose Python and dispatch costs outweigh MKL's speed there (the paper's model at
# B = 128: 2.5M multiply-adds).
BLAS_MIN_MACS = 1 << 22


def _blas(a: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether a training GEMM of ``a`` and ``W[E, K, N]`` runs on torch's BLAS (see ``training_gemm``)."""
    return training_gemm() == "blas" and a.shape[0] * W.numel() >= BLAS_MIN_MACS


# A one-layer MMoE's whole training step runs as one C++ call (``TrainStep``: the own kernels, no Python
# between them) where the own kernels run anyway, and under "auto" also up to this many expert multiply-adds
# (B x E x K x N) for experts of at most STEP_MAX_WEIGHTS weights, though the layers would take torch's BLAS
# there: the Python and the buffers saved outweigh MKL's faster GEMMs. Measured per step on a 2-core Xeon (MKL),
# one call against the layers' path: paper size (E x K x N = 12.8k) B=1024 1.12 vs 1.60 ms; D=128, 8 experts of
# 256, B=64 1.31 vs 1.76 ms, but B=128 2.30 vs 2.04; 16 experts of 512 on D=512 (4.2M weights), B=8 7.6 vs 4.7
# ms. (The paper size at B=2048, 1.91 vs 2.40 ms, is left out by these limits and the towers': kept on the
# safe side.)
STEP_MAX_MACS = 1 << 24
STEP_MAX_WEIGHTS = 1 << 20


def step_in_one_call(rows: int, W: torch.Tensor) -> bool:
    """Whether a one-layer model's training step on ``rows`` rows and expert weights ``W[E, K, N]`` runs as one
    C++ call (see ``STEP_MAX_MACS``)."""
    macs = rows * W.numel()
    gemm = training_gemm()  # checks the variable
    if gemm == "own" or macs < BLAS_MIN_MACS:
        return True
    return (os.environ.get("MMOE_FAST_CPU_GEMM", "auto") == "auto" and macs <= STEP_MAX_MACS
            and W.numel() <= STEP_MAX_WEIGHTS)


def _mixture(a, W, b, Wg, bg, G, T, activation, save):
    """m[T, B, H] and, when ``save``, pre[E, B, H] and (gates computed here: Wg given) G[B, T, E]."""
    E, K, H = W.shape
    B = a.shape[0]
    a = _rows(a)
    m = fresh(a, (T, B, H))
    pre = fresh(a, (E, B, H)) if save else None
    G_out = a.new_empty((B, T, E)) if save and Wg is not None else None
    _kernel("mixture_forward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), _ptr(Wg), _ptr(bg), _ptr(G), _ptr(m),
                                        _ptr(pre), _ptr(G_out), B, E, K, H, T, ACTIVATION_CODES[activation])
    return m, pre, G_out


def _per_expert(a: torch.Tensor, E: int) -> torch.Tensor:
    """a as [E, B, K]: the shared x expanded, or a[B, E, K] transposed (views)."""
    return a.expand(E, *a.shape) if a.dim() == 2 else a.transpose(0, 1)


def _side_by_side(W: torch.Tensor) -> torch.Tensor:
    """W[E, K, N] as one [K, E * N] matrix, every expert's columns side by side (a copy: K x E x N values)."""
    E, K, N = W.shape
    return W.permute(1, 0, 2).reshape(K, E * N)


# Experts at most this wide share one GEMM (``_blas_pre``); wider ones run MKL's batched GEMM at its full rate,
# where copying the weights side by side and back (16 MB each way at E=16, K=N=512) cost 10% of a step.
SIDE_BY_SIDE_MAX_N = 64


def _blas_pre(a, W):
    """The pre-activations less the bias by torch's GEMMs, into a kept block: for a shared x[B, K] and narrow
    experts, one GEMM against every expert's weights side by side, ``pre[B, E * N]`` (row-major: rows b, then
    experts; one well-shaped GEMM where E narrow ones run at a third of MKL's rate); else one batched GEMM,
    ``pre[E, B, N]``. The bias is added by ``from_pre`` (a GEMM given it first copies it into every row)."""
    E, K, N = W.shape
    if a.dim() == 2 and N <= SIDE_BY_SIDE_MAX_N:
        return torch.mm(a, _side_by_side(W), out=fresh(a, (a.shape[0], E * N)))
    return torch.bmm(_per_expert(a, E), W, out=fresh(a, (E, a.shape[0], N)))


def _blas_gates(x, Wg, bg):
    """G[B, T, E]: every task's logits in one torch GEMM (Wg side by side), then the softmax in C++ (torch's
    takes 200 us over 2048 rows of 8 experts, ten times this)."""
    T, D, E = Wg.shape
    logits = torch.mm(x, _side_by_side(Wg)) if bg is None else torch.addmm(bg.reshape(T * E), x, _side_by_side(Wg))
    G = x.new_empty((x.shape[0], T, E))
    _kernel("softmax_rows", x.dtype)(logits.data_ptr(), G.data_ptr(), x.shape[0] * T, E)
    return G


def _blas_train(a, W, b, G, T, activation, out_expert_major=False):
    """(m[T, B, N] or, G None, out[B, E, N]; pre as ``_blas_pre``): the GEMM by torch, the rest in one C++ pass.
    ``out_expert_major``: out as a view of an [E, B, N] block where pre is one too."""
    E, K, N = W.shape
    B = a.shape[0]
    pre = _blas_pre(a, W)
    rowmajor = pre.dim() == 2
    if G is None:
        em = out_expert_major and not rowmajor
        out = fresh(a, (E, B, N) if em else (B, E, N))
        _kernel("from_pre", a.dtype)(_ptr(pre), rowmajor, _ptr(b), 0, 0, _ptr(out), em, B, E, N, 0,
                                     ACTIVATION_CODES[activation])
        return (out.transpose(0, 1) if em else out), pre
    m = fresh(a, (T, B, N))
    _kernel("from_pre", a.dtype)(_ptr(pre), rowmajor, _ptr(b), _ptr(G), _ptr(m), 0, False, B, E, N, T,
                                 ACTIVATION_CODES[activation])
    return m, pre


def _blas_backward(a, W, pre, activation, input_grad, G=None, dm=None, dout=None, Wg=None):
    """(da, dW, db, dG, dWg, dbg) from the saved pre (``_blas_pre``'s layouts, or the kernels' [E, B, N]): the
    elementwise step in C++, the GEMMs by torch."""
    E, K, N = W.shape
    B = a.shape[0]
    fused = Wg is not None
    T = Wg.shape[0] if fused else (0 if G is None else G.shape[1])
    rowmajor = pre.dim() == 2  # pre[B, E * N], from a shared x
    dp = fresh(a, tuple(pre.shape))
    dlogit = a.new_empty((B, T, E)) if fused else None
    dG = torch.empty_like(G) if G is not None and not fused else None
    if not is_expert_major(dout):
        dout = _rows(dout)
    db = a.new_empty((E, N))  # summed with dp's rows while they are in cache
    _kernel("backward_rows", a.dtype)(_ptr(pre), rowmajor, _ptr(G), _ptr(dm), _ptr(dout), is_expert_major(dout),
                                      _ptr(dp), _ptr(dlogit), _ptr(dG), _ptr(db), B, E, N, T,
                                      ACTIVATION_CODES[activation])
    da = None
    if rowmajor:
        dW = torch.mm(a.t(), dp).view(K, E, N).transpose(0, 1).contiguous()
        if input_grad:
            da = torch.mm(dp, _side_by_side(W).t())
    else:
        em = is_expert_major(a)
        if a.dim() == 2:
            dW = torch.bmm(a.t().expand(E, K, B), dp)
        elif em:  # a_e^T, each expert's rows contiguous
            dW = torch.bmm(a.transpose(0, 1).transpose(1, 2), dp)
        else:  # dW[e]^T = dp[e]^T a_e, written through a transposed view: a's strided rows need no copy that way
            dW = W.new_empty((E, K, N))
            torch.bmm(dp.transpose(1, 2), a.transpose(0, 1), out=dW.transpose(1, 2))
        if input_grad and a.dim() == 2:
            da = torch.bmm(dp, W.transpose(1, 2)).sum(0)
        elif input_grad and em:  # expert-major as a: the layer below reads it so (backward_rows' dout_em)
            da = torch.bmm(dp, W.transpose(1, 2), out=fresh(a, (E, B, K))).transpose(0, 1)
        elif input_grad:  # straight into a[B, E, K]'s layout
            da = fresh(a, a.shape)
            torch.bmm(dp, W.transpose(1, 2), out=da.transpose(0, 1))
    dWg = dbg = None
    if fused:
        flat = dlogit.view(B, T * E)
        dWg = torch.mm(a.t(), flat).view(K, T, E).transpose(0, 1).contiguous()
        dbg = flat.sum(0).view(T, E)
        if input_grad:
            da = da + torch.mm(flat, Wg.transpose(1, 2).reshape(T * E, K))
    return da, dW, db, dG, dWg, dbg


def expert_mixture(a, W, b, G, activation):
    return _mixture(a, W, b, None, None, G, G.shape[1], activation, False)[0]


def expert_mixture_train(a, W, b, G, activation):
    """(m, (pre,)): the forward, keeping the pre-activations for ``expert_mixture_backward(saved=...)``."""
    if _blas(a, W):
        m, pre = _blas_train(a, W, b, G, G.shape[1], activation)
        return m, (pre,)
    m, pre, _ = _mixture(a, W, b, None, None, G, G.shape[1], activation, True)
    return m, (pre,)


def mmoe(x, W, b, Wg, bg, activation):
    return _mixture(x, W, b, Wg, bg, None, Wg.shape[0], activation, False)[0]


def mmoe_train(x, W, b, Wg, bg, activation):
    """(m, (pre, G)): the forward, keeping the pre-activations and gates for ``mmoe_backward(saved=...)``."""
    if _blas(x, W):
        G = _blas_gates(x, Wg, bg)
        m, pre = _blas_train(x, W, b, G, Wg.shape[0], activation)
        return m, (pre, G)
    m, pre, G = _mixture(x, W, b, Wg, bg, None, Wg.shape[0], activation, True)
    return m, (pre, G)


def _backward(a, W, b, activation, input_grad, pre, G=None, dm=None, dout=None, Wg=None, bg=None):
    """(da or None, dW, db, dG or None, dWg or None, dbg or None) from the one C++ call (pre None: recomputed)."""
    E, K, N = W.shape
    a, dout = _rows(a), _rows(dout)
    da, dW, db = fresh(a, a.shape) if input_grad else None, torch.empty_like(W), a.new_empty((E, N))
    fused = Wg is not None
    T = Wg.shape[0] if fused else (0 if G is None else G.shape[1])
    dG = torch.empty_like(G) if G is not None and not fused else None
    dWg, dbg = (torch.empty_like(Wg), a.new_empty((T, E))) if fused else (None, None)
    _kernel("backward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), _ptr(pre), _ptr(G), _ptr(dm), _ptr(dout),
                                 _ptr(Wg), _ptr(bg), _ptr(da), _ptr(dW), _ptr(db), _ptr(dG), _ptr(dWg), _ptr(dbg),
                                 a.shape[0], E, K, N, T, ACTIVATION_CODES[activation])
    return da, dW, db, dG, dWg, dbg


def _backward_from(a, W, b, activation, input_grad, saved, **kw):
    """The backward from what a training forward saved: torch's GEMMs for a pre torch's GEMM wrote (row-major,
    a shared input's) or under ``blas``, else the one C++ call (which also recomputes when nothing was saved)."""
    pre = saved[0] if saved else None
    if pre is not None and (pre.dim() == 2 or _blas(a, W)):  # a row-major pre came from torch's GEMM
        kw.pop("bg", None)
        return _blas_backward(a, W, pre, activation, input_grad, **kw)
    return _backward(a, W, b, activation, input_grad, pre, **kw)


def expert_mixture_backward(dm, a, W, b, G, activation, input_grad=True, saved=()):
    return _backward_from(a, W, b, activation, input_grad, saved, G=G, dm=dm)[:4]


def mmoe_backward(dm, x, W, b, Wg, bg, activation, input_grad=True, saved=()):
    G = saved[1] if saved else None
    dx, dW, db, _, dWg, dbg = _backward_from(x, W, b, activation, input_grad, saved, G=G, dm=dm, Wg=Wg, bg=bg)
    return dx, dW, db, dWg, dbg


def grouped_linear(a, W, b, activation):
    E, K, N = W.shape
    a = _rows(a)
    out = fresh(a, (a.shape[0], E, N))
    _kernel("grouped_forward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), _ptr(out), 0, a.shape[0], E, K, N,
                                        ACTIVATION_CODES[activation])
    return out


def grouped_linear_train(a, W, b, activation, expert_major=False):
    """(out, (pre,)): the forward, keeping the pre-activations for ``grouped_linear_backward(saved=...)``;
    ``expert_major``: out may be an expert-major view (see ``READS_EXPERT_MAJOR``)."""
    if _blas(a, W):
        out, pre = _blas_train(a, W, b, None, 0, activation, expert_major)
        return out, (pre,)
    a = _rows(a)
    E, K, N = W.shape
    out, pre = fresh(a, (a.shape[0], E, N)), fresh(a, (E, a.shape[0], N))
    _kernel("grouped_forward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), _ptr(out), _ptr(pre), a.shape[0], E,
                                        K, N, ACTIVATION_CODES[activation])
    return out, (pre,)


def grouped_linear_backward(dout, a, W, b, activation, input_grad=True, saved=()):
    return _backward_from(a, W, b, activation, input_grad, saved, dout=dout)[:3]


def _tower_layout(h, num_layers, params):
    """``(T, B, widths, w, b)`` of the towers: widths ``[K0, N0, ..., 1]`` and each of ``params``' weight and bias
    pointers (``params`` layer by layer, the T weights ``[N, K]`` then the T biases ``[N]``) in the kernels'
    order, layer by layer, task by task."""
    T = len(params) // (2 * num_layers)
    widths = [h.shape[-1]] + [params[2 * T * layer].shape[0] for layer in range(num_layers)]
    return T, h.shape[-2], widths, *_weights_biases(params, num_layers, T)


def _weights_biases(params, num_layers, T):
    """The pointers of ``params`` (layer by layer, the T weights then the T biases) as the kernels take them: the
    weights, layer by layer and task by task, and the biases likewise."""
    ptrs = [p.data_ptr() for p in params]
    w = [ptrs[2 * T * layer + t] for layer in range(num_layers) for t in range(T)]
    b = [ptrs[2 * T * layer + T + t] for layer in range(num_layers) for t in range(T)]
    return w, b


def towers_forward(h, num_layers, params):
    """Every task's tower in one call: ``(out[B, T], save)``. ``h[T, B, K]`` or shared ``[B, K]`` (contiguous);
    ``params`` as ``_tower_layout``'s, contiguous."""
    T, B, widths, w, b = _tower_layout(h, num_layers, params)
    out = h.new_empty((B, T))
    save = h.new_empty((T, B, sum(widths[1:-1])))
    _kernel("towers_forward", h.dtype)(h.data_ptr(), h.dim() == 2, B, T, widths, w, b, out.data_ptr(),
                                       save.data_ptr())
    return out, save


def towers_backward(dout, h, num_layers, params, save, input_grad):
    """``(dh or None, grads)`` of ``towers_forward``: ``grads`` one per parameter, in ``params``' order; ``dh``
    (when ``input_grad``) as ``h``: a shared input's gradient is the sum of the tasks'."""
    T, B, widths, w, _ = _tower_layout(h, num_layers, params)
    grads = [torch.empty_like(p) for p in params]
    _, _, _, dw, db = _tower_layout(h, num_layers, grads)
    dh = h.new_empty((T, B, widths[0])) if input_grad else None
    dout = dout.resolve_neg().contiguous()  # kept alive through the call
    _kernel("towers_backward", h.dtype)(h.data_ptr(), h.dim() == 2, B, T, widths, w, save.data_ptr(),
                                        dout.data_ptr(), _ptr(dh), dw, db)
    if dh is not None and h.dim() == 2:
        dh = dh.sum(0) if T > 1 else dh[0]
    return dh, grads


def loss_grad(out, y, binary, coef, w):
    """``(sums, dz)``: per-task loss sums (a list of floats, summed in double) of ``out[B, T]`` against ``y``
    (``binary[t]``: BCE with logits, else squared error), rows weighted by ``w[B, T]`` (None: ones; a weight <= 0
    skips the row, whose target may then be NaN), and ``dz = coef[t] * w * dloss/dout``."""
    out, y = out.resolve_neg().contiguous(), y.to(out.dtype).resolve_neg().contiguous()
    coef = coef.to(out.dtype).resolve_neg().contiguous()
    w = None if w is None else w.to(out.dtype).resolve_neg().contiguous()
    dz = torch.empty_like(out)
    sums = _kernel("loss_grad", out.dtype)(out.data_ptr(), y.data_ptr(), [bool(b) for b in binary], coef.data_ptr(),
                                           _ptr(w), dz.data_ptr(), out.shape[0])
    return sums, dz


def first_non_finite(tensors) -> int | None:
    """The index of the first of ``tensors`` (contiguous, float32 or float64 on the CPU) holding a NaN or an
    infinity, or None: one pass over their memory per dtype, no copy."""
    found = []
    for dtype in _SUFFIX:
        picked = [(i, t) for i, t in enumerate(tensors) if t.dtype == dtype]
        if picked:
            k = _kernel("first_non_finite", dtype)([t.data_ptr() for _, t in picked], [t.numel() for _, t in picked])
            if k >= 0:
                found.append(picked[k][0])
    return min(found) if found else None


def _check_replicas(x, W, bias, E, H, num_gates, tower_params, num_layers, y, coef, weight, active, adam, rows):
    """``replicas_step``'s arguments checked (the kernel reads raw buffers): ``(S, D, C, B, T, widths)``."""
    S, D, C = W.shape
    B = x.shape[-2] if rows is None else rows[0].shape[-1]
    T = len(tower_params) // (2 * num_layers)
    widths = [H] + [tower_params[2 * T * layer].shape[1] for layer in range(num_layers)]
    if rows is not None and (y is None or x.dim() != 2 or y.dim() != 2):  # the rows themselves: the caller's
        raise ValueError("replicas_step: rows need y, and x[N, D] and y[M, T] to pick them from")
    expect = [(x, (S, B, D) if x.dim() == 3 else (B, D) if rows is None else (x.shape[0], D)),
              (W, (S, D, E * H + num_gates * E))]
    expect += [] if bias is None else [(bias, (S, C))]
    expect += [(tower_params[2 * T * layer + k], (S, widths[layer + 1], widths[layer]) if k < T else
                (S, widths[layer + 1])) for layer in range(num_layers) for k in range(2 * T)]
    if y is not None:
        expect += [(y, (S, B, T) if rows is None else (y.shape[0], T)), (coef, (T,))]
        expect += [] if weight is None else [(weight, (S, B, T))]
    for t, shape in expect:
        if tuple(t.shape) != shape or (t is not coef and (t.dtype != W.dtype or not t.is_contiguous())):
            raise ValueError(f"replicas_step: a tensor of shape {tuple(t.shape)}, {t.dtype} where a contiguous "
                             f"{shape} {W.dtype} belongs")
    if len(tower_params) != 2 * T * num_layers or widths[-1] != 1:
        raise ValueError("replicas_step: tower_params must be num_layers x (T weights, T biases), ending in one output")
    if active is not None and tuple(active.shape) != (S,):
        raise ValueError(f"replicas_step: active must be [{S}], got {tuple(active.shape)}")
    if adam is not None:
        params = [W, bias, *tower_params]
        if y is None or bias is None or any(len(a) != len(params) for a in adam[:2]) or any(
                a.shape != p.shape or a.dtype != p.dtype or not a.is_contiguous() for m in adam[:2]
                for a, p in zip(m, params)) or tuple(adam[2].shape) != (S,) or adam[2].dtype != torch.float64:
            raise ValueError("replicas_step: Adam needs y, a bias, moments shaped as [W, bias, *tower_params] and "
                             f"lr[{S}] float64")
    return S, D, C, B, T, widths


def replicas_step(x, W, bias, E, H, num_gates, tower_params, num_layers, activation, y=None, binary=(), coef=None,
                  weight=None, active=None):
    """S replicas' outputs ``out[S, B, T]`` on their rows ``x[S, B, D]`` (or the same rows ``x[B, D]`` for all):
    the first layer ``x @ W[S, D, C] + bias[S, C]`` (``C = E * H + num_gates * E``: the experts side by side, then
    the gates' logits; ``bias`` None: none), then the model (see ``ReplicaStep`` in csrc/kernels.h);
    ``tower_params`` as ``_tower_layout``'s, each stacked ``[S, ...]``. With ``y[S, B, T]`` also ``(sums[S, T]
    float64, dW[S, D, C], dbias[S, C], tower grads)`` of the loss ``loss_grad`` forms (``coef[T]``, ``weight[S, B,
    T]`` or None). ``active[S]`` (bool, or None: all): the replicas to run; the others' outputs and gradients are
    zero. Every tensor contiguous. ``ReplicaTrainer``: the same step with each replica's Adam update in its thread."""
    S, D, C, B, T, widths = _check_replicas(x, W, bias, E, H, num_gates, tower_params, num_layers, y, coef, weight,
                                            active, None, None)
    w, b = _weights_biases(tower_params, num_layers, T)
    if B == 0:  # no rows: nothing to compute (an empty tensor's data pointer is null, read as "no y" by the kernel)
        out = W.new_zeros((S, 0, T))
        if y is None:
            return out
        return (out, torch.zeros((S, T), dtype=torch.float64), W.new_zeros((S, D, C)), W.new_zeros((S, C)),
                [W.new_zeros(p.shape) for p in tower_params])
    zeros = active is not None and not bool(active.all())
    out = (W.new_zeros if zeros else W.new_empty)((S, B, T))
    act = None if active is None else active.to(torch.uint8).contiguous()
    args = [S, B, D, E, H, num_gates, T, widths, ACTIVATION_CODES[activation], x.data_ptr(),
            B * D if x.dim() == 3 else 0, 0, 0, 0, 0, W.data_ptr(), _ptr(bias), w, b, out.data_ptr(), _ptr(act)]
    if y is None:
        _kernel("replicas_step", W.dtype)(*args, 0, [], 0, 0, 0, 0, 0, [], [], [], [], [], 0, [], False, 0)
        return out
    new = W.new_zeros if zeros else W.new_empty
    sums = torch.zeros((S, T), dtype=torch.float64)
    dW, dbias = fresh(W, (S, D, C)), new((S, C))
    if zeros:
        dW.zero_()
    grads = [new(p.shape) for p in tower_params]
    dw, db = _weights_biases(grads, num_layers, T)
    coef = coef.to(W.dtype).contiguous()
    weight = None if weight is None else weight.to(W.dtype).contiguous()
    _kernel("replicas_step", W.dtype)(*args, y.data_ptr(), [bool(v) for v in binary], coef.data_ptr(), _ptr(weight),
                                      sums.data_ptr(), dW.data_ptr(), dbias.data_ptr(), dw, db, [], [], [], 0, [],
                                      False, 0)
    return out, sums, dW, dbias, grads


class ReplicaTrainer:
    """``replicas_step`` with Adam for many steps of the same stacks (fit_many's loop): the checks of everything
    but the step's rows, the pointer lists and the outputs are made once per batch size, so a step costs the
    kernel and a few microseconds. ``x[N, D]``, ``y[M, T]``: the data the rows pick from; the rest as
    ``replicas_step``'s (``moments``: ``(exp_avgs, exp_avg_sqs)``). It keeps the addresses of the data, the
    weights and the moments: update those in place (a tensor put in their stead needs a new trainer)."""

    def __init__(self, x, y, W, bias, E, H, num_gates, tower_params, num_layers, activation, binary, moments,
                 betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adamw=False):
        self.x, self.y, self.W, self.bias, self.towers = x, y, W, bias, list(tower_params)
        self.model = (E, H, num_gates, num_layers, activation)
        self.binary = [bool(v) for v in binary]
        self.moments = moments
        self.hyper = (*betas, eps, weight_decay)
        self.adamw = bool(adamw)
        self._calls: dict = {}

    def __call__(self, xrow, yrow, coef, lr, step: int, active=None):
        """One step on the rows ``x[xrow[s]]``, ``y[yrow[s]]`` (int64 ``[S, B]``; ``coef[T]``, ``lr[S]`` float64,
        ``step`` counted from 1): ``(sums[S, T] float64, failed, overflowed)``: each replica's loss sums; None and
        None where every replica run was updated to finite weights, else ``[S]`` bool masks: ``failed`` True for a
        replica run whose loss or bias gradient was not finite (nothing of it changed), ``overflowed`` True for
        one whose update made a weight non-finite (the update was applied)."""
        E, H, nG, L, activation = self.model
        S, B = self.W.shape[0], xrow.shape[-1]
        if B == 0:
            raise ValueError("ReplicaTrainer: a step needs at least one row per replica")
        adam = (*self.moments, lr, (*self.hyper, step), self.adamw)
        call = self._calls.get(B)
        if call is None:  # every argument checked once, through replicas_step's checks
            _, _, _, _, T, widths = _check_replicas(self.x, self.W, self.bias, E, H, nG, self.towers, L, self.y,
                                                    coef, None, None, adam, (xrow, yrow))
            ok = torch.zeros(S, dtype=torch.uint8)
            grads = [torch.empty_like(p) for p in self.towers]
            dbias = self.W.new_empty((S, self.W.shape[2]))
            towers = _weights_biases(self.towers, L, T)
            call = self._calls[B] = dict(
                out=self.W.new_empty((S, B, T)), ok=ok, dbias=dbias, grads=grads, coef=None, lr=None,
                head=[S, B, self.W.shape[1], E, H, nG, T, widths, ACTIVATION_CODES[activation]],
                towers=towers, dtowers=_weights_biases(grads, L, T),
                opt=[[self.W.data_ptr(), self.bias.data_ptr(), *towers[0], *towers[1]]]
                + [[m[0].data_ptr(), m[1].data_ptr(), *sum(_weights_biases(m[2:], L, T), [])] for m in self.moments])
        for r, name in ((xrow, "x"), (yrow, "y")):  # their values: checked against the data by the kernel's binding
            if r.dtype != torch.int64 or tuple(r.shape) != (S, B) or not r.is_contiguous():
                raise ValueError(f"ReplicaTrainer: {name}'s rows must be contiguous int64 [{S}, {B}]")
        if coef is not call["coef"] or lr is not call["lr"]:
            T = len(self.binary)
            if tuple(coef.shape) != (T,) or coef.dtype != self.W.dtype or not coef.is_contiguous():
                raise ValueError(f"ReplicaTrainer: coef must be a contiguous [{T}] {self.W.dtype}")
            if tuple(lr.shape) != (S,) or lr.dtype != torch.float64 or not lr.is_contiguous():
                raise ValueError(f"ReplicaTrainer: lr must be a contiguous [{S}] float64")
            call["coef"], call["lr"] = coef, lr
        if active is not None and tuple(active.shape) != (S,):
            raise ValueError(f"ReplicaTrainer: active must be [{S}], got {tuple(active.shape)}")
        sums, ok = torch.zeros((S, len(self.binary)), dtype=torch.float64), call["ok"]
        act = None if active is None else active.to(torch.uint8).contiguous()
        beta1, beta2, eps, decay = self.hyper
        failed = _kernel("replicas_step", self.W.dtype)(
            *call["head"], self.x.data_ptr(), 0, xrow.data_ptr(), yrow.data_ptr(), self.x.shape[0], self.y.shape[0],
            self.W.data_ptr(),
            self.bias.data_ptr(), *call["towers"], call["out"].data_ptr(), _ptr(act), self.y.data_ptr(), self.binary,
            coef.data_ptr(), 0, sums.data_ptr(), 0, call["dbias"].data_ptr(), *call["dtowers"], *call["opt"],
            lr.data_ptr(), [beta1, beta2, eps, decay, 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)], self.adamw,
            ok.data_ptr())
        if not failed:
            return sums, None, None
        run = torch.ones(S, dtype=torch.bool) if act is None else act.bool()
        return sums, (ok == 0) & run, (ok == 2) & run


# ---- S replicas at once (the ops' vmap rules): every tensor either [S, ...] (``per``: that replica's at s) or
# one all replicas share; the outputs are [S, ...]. One C++ call runs the S kernel calls, one replica per thread.


def _at(t: torch.Tensor, batched: bool) -> tuple:
    """The shape of one replica's ``t``."""
    return tuple(t.shape[1:]) if batched else tuple(t.shape)


def _replicas(kernel: str, S: int, tensors: tuple, per: tuple, *sizes) -> None:
    strides = [t.numel() // S if batched and t is not None else 0 for t, batched in zip(tensors, per)]
    dtype = next(t.dtype for t in tensors if t is not None)
    _kernel(kernel + "_replicas", dtype)(S, [_ptr(t) for t in tensors], strides, *sizes)


def gate_softmax_replicas(S, per, x, Wg, bg):
    B, D = _at(x, per[0])
    T, _, E = _at(Wg, per[1])
    G = x.new_empty((S, B, T, E))
    _replicas("gate_softmax", S, (x, Wg, bg, G), (*per, True), B, D, T, E)
    return G


def gate_softmax_backward_replicas(S, per, dG, x, Wg, bg, G, input_grad):
    B, D = _at(x, per[1])
    T, _, E = _at(Wg, per[2])
    dlogit, dbg = x.new_empty((S, B, T, E)), x.new_empty((S, T, E))
    _replicas("gate_backward", S, (G, dG, dlogit, dbg), (per[4], per[0], True, True), B, T, E)
    flat = dlogit.view(S, B, T * E)
    Wt = Wg.transpose(-1, -2).reshape(*Wg.shape[:-3], T * E, D)  # [S?, T * E, D]
    dx = torch.matmul(flat, Wt) if input_grad else x.new_empty((S, 0))
    dWg = torch.matmul(x.transpose(-1, -2), flat).view(S, D, T, E).transpose(1, 2).contiguous()
    return dx, dWg, dbg


def _experts(a, W, per_a, per_W):
    """(B, E, K, N, shared) of one replica's ``a`` and ``W[E, K, N]``."""
    shape = _at(a, per_a)
    E, K, N = _at(W, per_W)
    return shape[0], E, K, N, len(shape) == 2


def expert_mixture_replicas(S, per, a, W, b, G, activation):
    B, E, K, N, shared = _experts(a, W, per[0], per[1])
    T = G.shape[-2]
    m = a.new_empty((S, T, B, N))
    _replicas("mixture_forward", S, (a, W, b, None, None, G, m), (*per[:3], False, False, per[3], True), shared, B,
              E, K, N, T, ACTIVATION_CODES[activation])
    return m


def mmoe_replicas(S, per, x, W, b, Wg, bg, activation):
    B, E, K, N, _ = _experts(x, W, per[0], per[1])
    T = Wg.shape[-3]
    m = x.new_empty((S, T, B, N))
    _replicas("mixture_forward", S, (x, W, b, Wg, bg, None, m), (*per, False, True), True, B, E, K, N, T,
              ACTIVATION_CODES[activation])
    return m


def grouped_linear_replicas(S, per, a, W, b, activation):
    B, E, K, N, shared = _experts(a, W, per[0], per[1])
    out = a.new_empty((S, B, E, N))
    _replicas("grouped_forward", S, (a, W, b, out), (*per, True), shared, B, E, K, N, ACTIVATION_CODES[activation])
    return out


def _backward_replicas(S, a, W, per_a, per_W, activation, input_grad, T, tensors, per):
    """(da, dW, db, dG, dWg, dbg) of S replicas: ``tensors`` = (b, G, dm, dout, Wg, bg), ``per`` theirs."""
    B, E, K, N, shared = _experts(a, W, per_a, per_W)
    b, G, dm, dout, Wg, bg = tensors
    da = a.new_empty((S, *_at(a, per_a))) if input_grad else a.new_empty((S, 0))
    dW, db = a.new_empty((S, E, K, N)), a.new_empty((S, E, N))
    dG = a.new_empty((S, B, T, E)) if G is not None else None
    dWg, dbg = (a.new_empty((S, T, K, E)), a.new_empty((S, T, E))) if Wg is not None else (None, None)
    outs = (da if input_grad else None, dW, db, dG, dWg, dbg)
    _replicas("backward", S, (a, W, *tensors, *outs), (per_a, per_W, *per, *(True,) * 6), shared, B, E, K, N, T,
              ACTIVATION_CODES[activation])
    return da, dW, db, dG, dWg, dbg


def expert_mixture_backward_replicas(S, per, dm, a, W, b, G, activation, input_grad):
    return _backward_replicas(S, a, W, per[1], per[2], activation, input_grad, G.shape[-2],
                              (b, G, dm, None, None, None), (per[3], per[4], per[0], False, False, False))[:4]


def mmoe_backward_replicas(S, per, dm, x, W, b, Wg, bg, activation, input_grad):
    da, dW, db, _, dWg, dbg = _backward_replicas(S, x, W, per[1], per[2], activation, input_grad, Wg.shape[-3],
                                                 (b, None, dm, None, Wg, bg), (per[3], False, per[0], False, per[4],
                                                                                per[5]))
    return da, dW, db, dWg, dbg


def grouped_linear_backward_replicas(S, per, dout, a, W, b, activation, input_grad):
    return _backward_replicas(S, a, W, per[1], per[2], activation, input_grad, 0,
                              (b, None, None, dout, None, None), (per[3], False, False, per[0], False, False))[:3]
