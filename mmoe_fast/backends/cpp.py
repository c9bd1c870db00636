"""C++ backend: the kernels of ``mmoe_fast._C`` (csrc/) on CPU tensors, float32 and float64.

Forward: one C++ pass over row blocks x column panels computes the gates, the expert GEMM on register
tiles, bias, activation and the gated mixture; ``[B, E, H]`` is never written.
Backward: one C++ pass recomputes the expert pre-activations and writes ``dpre``, ``db`` and ``dG``
(nothing is saved by the forward); the weight and input gradients are then plain GEMMs (``torch.mm``).
The kernels release the GIL and keep no state, so concurrent calls are safe.
"""

from __future__ import annotations

import torch

try:
    from .. import _C
except ImportError:  # built without a compiler: the package still works, auto picks another backend
    _C = None

_ACT = {"identity": 0, "relu": 1, "silu": 2, "gelu": 3}
_SUFFIX = {torch.float32: "_f32", torch.float64: "_f64"}


def unavailable_reason() -> str | None:
    return None if _C is not None else "mmoe_fast._C was not built (no C++ compiler or pybind11 at install time)"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _SUFFIX


def _kernel(name: str, dtype: torch.dtype):
    return getattr(_C, name + _SUFFIX[dtype])


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _input_grad(dpre: torch.Tensor, W: torch.Tensor, shared: bool) -> torch.Tensor:
    """da = sum_e dpre_e @ W[e]^T: [B, K] for a shared input (one GEMM over all experts), else [B, E, K]."""
    E, K, N = W.shape
    if shared:
        return torch.mm(dpre.view(-1, E * N), W.transpose(1, 2).reshape(E * N, K))
    return torch.bmm(dpre.transpose(0, 1), W.transpose(1, 2)).transpose(0, 1).contiguous()


def _weight_grad(a: torch.Tensor, dpre: torch.Tensor) -> torch.Tensor:
    """dW[e] = a_e^T @ dpre_e: [E, K, N] (one GEMM over all experts for a shared input)."""
    B, E, N = dpre.shape
    if a.dim() == 2:
        return torch.mm(a.t(), dpre.view(B, E * N)).view(-1, E, N).transpose(0, 1).contiguous()
    return torch.bmm(a.permute(1, 2, 0), dpre.transpose(0, 1))


def gate_softmax(x, Wg, bg):
    T, D, E = Wg.shape
    G = x.new_empty((x.shape[0], T, E))
    _kernel("gate_softmax", x.dtype)(_ptr(x), _ptr(Wg), _ptr(bg), _ptr(G), x.shape[0], D, T, E)
    return G


def _gate_backward(dG, G, x, Wg):
    """(dx[B, D], dWg, dbg) through the softmax: dlogit in C++, then two GEMMs."""
    T, D, E = Wg.shape
    B = x.shape[0]
    dlogit, dbg = torch.empty_like(G), G.new_empty((T, E))
    _kernel("gate_backward", x.dtype)(_ptr(G), _ptr(dG), _ptr(dlogit), _ptr(dbg), B, T, E)
    flat = dlogit.view(B, T * E)
    dx = torch.mm(flat, Wg.transpose(1, 2).reshape(T * E, D))
    dWg = torch.mm(x.t(), flat).view(D, T, E).transpose(0, 1).contiguous()
    return dx, dWg, dbg


def gate_softmax_backward(dG, G, x, Wg):
    return _gate_backward(dG, G, x, Wg)


def expert_mixture(a, W, b, G, activation):
    E, K, H = W.shape
    m = a.new_empty((G.shape[1], a.shape[0], H))
    _kernel("mixture_forward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), 0, 0, _ptr(G), _ptr(m), a.shape[0],
                                        E, K, H, G.shape[1], _ACT[activation])
    return m


def mmoe(x, W, b, Wg, bg, activation):
    E, K, H = W.shape
    m = x.new_empty((Wg.shape[0], x.shape[0], H))
    _kernel("mixture_forward", x.dtype)(_ptr(x), True, _ptr(W), _ptr(b), _ptr(Wg), _ptr(bg), 0, _ptr(m), x.shape[0],
                                        E, K, H, Wg.shape[0], _ACT[activation])
    return m


def _backward(a, W, b, activation, G=None, dm=None, dout=None):
    """(dpre[B, E, N], db[E, N], dG[B, T, E] or None) from the C++ recompute-and-epilogue pass."""
    E, K, N = W.shape
    B = a.shape[0]
    dpre, db = a.new_empty((B, E, N)), a.new_empty((E, N))
    dG = None if G is None else torch.empty_like(G)
    T = 0 if G is None else G.shape[1]
    _kernel("backward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), _ptr(G), _ptr(dm), _ptr(dout),
                                 _ptr(dpre), _ptr(dG), _ptr(db), B, E, K, N, T, _ACT[activation])
    return dpre, db, dG


def expert_mixture_backward(dm, a, W, b, G, activation):
    dpre, db, dG = _backward(a, W, b, activation, G=G, dm=dm)
    return _input_grad(dpre, W, a.dim() == 2), _weight_grad(a, dpre), db, dG


def mmoe_backward(dm, x, W, b, Wg, bg, activation):
    G = gate_softmax(x, Wg, bg)  # recomputed: cheaper than saving [B, T, E] through autograd
    dpre, db, dG = _backward(x, W, b, activation, G=G, dm=dm)
    dx_gate, dWg, dbg = _gate_backward(dG, G, x, Wg)
    dx = _input_grad(dpre, W, True).add_(dx_gate)
    return dx, _weight_grad(x, dpre), db, dWg, dbg


def grouped_linear(a, W, b, activation):
    E, K, N = W.shape
    out = a.new_empty((a.shape[0], E, N))
    _kernel("grouped_forward", a.dtype)(_ptr(a), a.dim() == 2, _ptr(W), _ptr(b), _ptr(out), a.shape[0], E, K, N,
                                        _ACT[activation])
    return out


def grouped_linear_backward(dout, a, W, b, activation):
    dpre, db, _ = _backward(a, W, b, activation, dout=dout)
    return _input_grad(dpre, W, a.dim() == 2), _weight_grad(a, dpre), db
