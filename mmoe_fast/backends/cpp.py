"""C++ backend: the kernels of ``mmoe_fast._C`` (csrc/) on CPU tensors, float32 and float64.

Forward: one C++ pass over row blocks x column panels computes the gates, the expert GEMM on register
tiles, bias, activation and the gated mixture; ``[B, E, H]`` is never written.
Backward: one C++ pass per row block recomputes the expert pre-activations and forms ``dpre`` in a
block buffer, then ``dW``, ``db``, ``da`` and ``dG`` from it on the same register tiles (``dpre`` is
never written to memory; nothing is saved by the forward). Only the gate's small GEMMs use ``torch.mm``.
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


def expert_mixture(a, W, b, G, activation):
    E, K, H = W.shape
    m = a.new_empty((G.shape[1], a.shape[0], H))
    _kernel("mixture_forward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), 0, 0, _ptr(G), _ptr(m), a.shape[0],
                                        E, K, H, G.shape[1], ACTIVATION_CODES[activation])
    return m


def mmoe(x, W, b, Wg, bg, activation):
    E, K, H = W.shape
    m = x.new_empty((Wg.shape[0], x.shape[0], H))
    _kernel("mixture_forward", x.dtype)(_ptr(x), True, _ptr(W), _ptr(b), _ptr(Wg), _ptr(bg), 0, _ptr(m), x.shape[0],
                                        E, K, H, Wg.shape[0], ACTIVATION_CODES[activation])
    return m


def _backward(a, W, b, activation, input_grad, G=None, dm=None, dout=None):
    """(da or None, dW, db, dG or None) from the one C++ pass (pre-activations recomputed, dpre never stored)."""
    E, K, N = W.shape
    da, dW, db = torch.empty_like(a) if input_grad else None, torch.empty_like(W), a.new_empty((E, N))
    dG = None if G is None else torch.empty_like(G)
    T = 0 if G is None else G.shape[1]
    _kernel("backward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), _ptr(G), _ptr(dm), _ptr(dout), _ptr(da),
                                 _ptr(dW), _ptr(db), _ptr(dG), a.shape[0], E, K, N, T, ACTIVATION_CODES[activation])
    return da, dW, db, dG


def expert_mixture_backward(dm, a, W, b, G, activation, input_grad=True):
    return _backward(a, W, b, activation, input_grad, G=G, dm=dm)


def grouped_linear(a, W, b, activation):
    E, K, N = W.shape
    out = a.new_empty((a.shape[0], E, N))
    _kernel("grouped_forward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), _ptr(out), a.shape[0], E, K, N,
                                        ACTIVATION_CODES[activation])
    return out


def grouped_linear_backward(dout, a, W, b, activation, input_grad=True):
    return _backward(a, W, b, activation, input_grad, dout=dout)[:3]
