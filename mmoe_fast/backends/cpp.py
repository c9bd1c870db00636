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

import torch

from .. import forksafe
from ..contract import ACTIVATION_CODES

try:
    from .. import _C
except ImportError:  # built without a compiler: the package still works, auto picks another backend
    _C = None

_SUFFIX = {torch.float32: "_f32", torch.float64: "_f64"}


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


def isa() -> str | None:
    """The instruction set the kernels run (``"avx512"``, ``"avx2"``, ``"base"``); None without ``_C``."""
    return None if _C is None else _C.isa()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


_HUGE = 4 << 20


def _fresh(like: torch.Tensor, shape: tuple) -> torch.Tensor:
    """An uninitialized output; a large one gets transparent huge pages before its first touch (first-touch
    page faults on tens of MB per training step otherwise cost as much as the kernel's work)."""
    t = like.new_empty(shape)
    if t.numel() * t.element_size() >= _HUGE:
        _C.advise_huge_pages(t.data_ptr(), t.numel() * t.element_size())
    return t


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


def _mixture(a, W, b, Wg, bg, G, T, activation, save):
    """m[T, B, H] and, when ``save``, pre[B, E, H] and (gates computed here: Wg given) G[B, T, E]."""
    E, K, H = W.shape
    B = a.shape[0]
    m = _fresh(a, (T, B, H))
    pre = _fresh(a, (B, E, H)) if save else None
    G_out = a.new_empty((B, T, E)) if save and Wg is not None else None
    _kernel("mixture_forward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), _ptr(Wg), _ptr(bg), _ptr(G), _ptr(m),
                                        _ptr(pre), _ptr(G_out), B, E, K, H, T, ACTIVATION_CODES[activation])
    return m, pre, G_out


def expert_mixture(a, W, b, G, activation):
    return _mixture(a, W, b, None, None, G, G.shape[1], activation, False)[0]


def expert_mixture_train(a, W, b, G, activation):
    """(m, (pre,)): the forward, keeping the pre-activations for ``expert_mixture_backward(saved=...)``."""
    m, pre, _ = _mixture(a, W, b, None, None, G, G.shape[1], activation, True)
    return m, (pre,)


def mmoe(x, W, b, Wg, bg, activation):
    return _mixture(x, W, b, Wg, bg, None, Wg.shape[0], activation, False)[0]


def mmoe_train(x, W, b, Wg, bg, activation):
    """(m, (pre, G)): the forward, keeping the pre-activations and gates for ``mmoe_backward(saved=...)``."""
    m, pre, G = _mixture(x, W, b, Wg, bg, None, Wg.shape[0], activation, True)
    return m, (pre, G)


def _backward(a, W, b, activation, input_grad, pre, G=None, dm=None, dout=None, Wg=None, bg=None):
    """(da or None, dW, db, dG or None, dWg or None, dbg or None) from the one C++ call (pre None: recomputed)."""
    E, K, N = W.shape
    da, dW, db = _fresh(a, a.shape) if input_grad else None, torch.empty_like(W), a.new_empty((E, N))
    fused = Wg is not None
    T = Wg.shape[0] if fused else (0 if G is None else G.shape[1])
    dG = torch.empty_like(G) if G is not None and not fused else None
    dWg, dbg = (torch.empty_like(Wg), a.new_empty((T, E))) if fused else (None, None)
    _kernel("backward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), _ptr(pre), _ptr(G), _ptr(dm), _ptr(dout),
                                 _ptr(Wg), _ptr(bg), _ptr(da), _ptr(dW), _ptr(db), _ptr(dG), _ptr(dWg), _ptr(dbg),
                                 a.shape[0], E, K, N, T, ACTIVATION_CODES[activation])
    return da, dW, db, dG, dWg, dbg


def expert_mixture_backward(dm, a, W, b, G, activation, input_grad=True, saved=()):
    return _backward(a, W, b, activation, input_grad, *saved[:1] or (None,), G=G, dm=dm)[:4]


def mmoe_backward(dm, x, W, b, Wg, bg, activation, input_grad=True, saved=()):
    pre, G = saved or (None, None)
    dx, dW, db, _, dWg, dbg = _backward(x, W, b, activation, input_grad, pre, G=G, dm=dm, Wg=Wg, bg=bg)
    return dx, dW, db, dWg, dbg


def grouped_linear(a, W, b, activation):
    E, K, N = W.shape
    out = _fresh(a, (a.shape[0], E, N))
    _kernel("grouped_forward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), _ptr(out), 0, a.shape[0], E, K, N,
                                        ACTIVATION_CODES[activation])
    return out


def grouped_linear_train(a, W, b, activation):
    """(out, (pre,)): the forward, keeping the pre-activations for ``grouped_linear_backward(saved=...)``."""
    E, K, N = W.shape
    out, pre = _fresh(a, (a.shape[0], E, N)), _fresh(a, (a.shape[0], E, N))
    _kernel("grouped_forward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), _ptr(out), _ptr(pre), a.shape[0], E,
                                        K, N, ACTIVATION_CODES[activation])
    return out, (pre,)


def grouped_linear_backward(dout, a, W, b, activation, input_grad=True, saved=()):
    return _backward(a, W, b, activation, input_grad, *saved[:1] or (None,), dout=dout)[:3]
