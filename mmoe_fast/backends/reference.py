"""Reference backend: the fused ops as batched plain-PyTorch code (a few GEMMs, no Python loop).

Forward:  G = softmax_t(x @ Wg[t] + bg[t]);  m[t] = sum_e G[:, t, e] * act(a_e @ W[e] + b[e]).
Backward: recomputes pre = a_e @ W[e] + b[e] (nothing but the inputs is saved), then the
formulas of docs/design.md. Half-precision inputs are computed in float32 and cast back.
This is readable and runs anywhere; ``mmoe_fast.reference`` (the loop form) is its oracle.
"""

from __future__ import annotations

import torch

from .. import activations

_LOW = (torch.float16, torch.bfloat16)


def unavailable_reason() -> str | None:
    return None


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _up(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None and t.dtype in _LOW else t


def _pre(a: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """pre[B, E, N] = a_e @ W[e] + b[e]; a is [B, K] (shared) or [B, E, K] (per expert)."""
    E, K, N = W.shape
    if a.dim() == 2:  # one GEMM for all experts: [B, K] @ [K, E*N]
        pre = (a @ W.permute(1, 0, 2).reshape(K, E * N)).view(a.shape[0], E, N)
    else:
        pre = torch.bmm(a.transpose(0, 1), W).transpose(0, 1)
    return pre if b is None else pre + b


def _input_grad(dpre: torch.Tensor, W: torch.Tensor, shared: bool) -> torch.Tensor:
    """da = sum_e dpre_e @ W[e]^T: [B, K] for a shared input, else [B, E, K]."""
    E, K, N = W.shape
    if shared:
        return dpre.reshape(dpre.shape[0], E * N) @ W.permute(0, 2, 1).reshape(E * N, K)
    return torch.bmm(dpre.transpose(0, 1), W.transpose(1, 2)).transpose(0, 1)


def _out(out_dtype: torch.dtype, *ts: torch.Tensor | None) -> tuple:
    """The results in the input dtype, contiguous; a skipped input gradient stays None."""
    return tuple(None if t is None else t.to(out_dtype).contiguous() for t in ts)


def _weight_grad(a: torch.Tensor, dpre: torch.Tensor) -> torch.Tensor:
    """dW[e] = a_e^T @ dpre_e: [E, K, N]."""
    if a.dim() == 2:  # one GEMM: [K, B] @ [B, E*N]
        B, E, N = dpre.shape
        return (a.t() @ dpre.reshape(B, E * N)).view(-1, E, N).transpose(0, 1)
    return torch.bmm(a.permute(1, 2, 0), dpre.transpose(0, 1))


def gate_softmax(x, Wg, bg):
    """G[B, T, E] = softmax over e of x @ Wg[t] + bg[t], in float32 or better."""
    out_dtype = x.dtype
    x, Wg, bg = _up(x), _up(Wg), _up(bg)
    T, D, E = Wg.shape
    logits = (x @ Wg.permute(1, 0, 2).reshape(D, T * E)).view(x.shape[0], T, E)
    if bg is not None:
        logits = logits + bg
    return torch.softmax(logits, dim=-1).to(out_dtype).contiguous()


def gate_softmax_backward(dG, G, x, Wg, input_grad=True):
    """(dx[B, D], dWg[T, D, E], dbg[T, E]) from dG[B, T, E] and the forward's G."""
    out_dtype = x.dtype
    dG, G, x, Wg = _up(dG), _up(G), _up(x), _up(Wg)
    T, D, E = Wg.shape
    dlogit = G * (dG - (G * dG).sum(-1, keepdim=True))
    dx = dlogit.reshape(-1, T * E) @ Wg.permute(0, 2, 1).reshape(T * E, D) if input_grad else None
    dWg = (x.t() @ dlogit.reshape(-1, T * E)).view(D, T, E).transpose(0, 1)
    dbg = dlogit.sum(0)
    return _out(out_dtype, dx, dWg, dbg)


def expert_mixture(a, W, b, G, activation):
    """m[T, B, H] = sum_e G[:, t, e] * act(a_e @ W[e] + b[e])."""
    out_dtype = a.dtype
    f = activations.apply(_pre(_up(a), _up(W), _up(b)), activation)
    m = torch.bmm(_up(G), f)  # [B, T, H]
    return m.transpose(0, 1).to(out_dtype).contiguous()


def expert_mixture_backward(dm, a, W, b, G, activation, input_grad=True):
    """(da, dW[E, K, H], db[E, H], dG[B, T, E]) from dm[T, B, H]; da has a's shape."""
    out_dtype = a.dtype
    dm, a, W, b, G = _up(dm), _up(a), _up(W), _up(b), _up(G)
    pre = _pre(a, W, b)
    f = activations.apply(pre, activation)
    dmb = dm.transpose(0, 1)  # [B, T, H]
    dG = torch.bmm(dmb, f.transpose(1, 2))
    dpre = torch.bmm(G.transpose(1, 2), dmb) * activations.grad(pre, activation)
    da = _input_grad(dpre, W, a.dim() == 2) if input_grad else None
    return _out(out_dtype, da, _weight_grad(a, dpre), dpre.sum(0), dG)


def grouped_linear(a, W, b, activation):
    """out[B, E, N] = act(a_e @ W[e] + b[e]) (hidden expert layers)."""
    out_dtype = a.dtype
    out = activations.apply(_pre(_up(a), _up(W), _up(b)), activation)
    return out.to(out_dtype).contiguous()


def grouped_linear_backward(dout, a, W, b, activation, input_grad=True):
    """(da, dW[E, K, N], db[E, N]) from dout[B, E, N]; da has a's shape."""
    out_dtype = a.dtype
    dout, a, W, b = _up(dout), _up(a), _up(W), _up(b)
    pre = _pre(a, W, b)
    dpre = dout * activations.grad(pre, activation)
    da = _input_grad(dpre, W, a.dim() == 2) if input_grad else None
    return _out(out_dtype, da, _weight_grad(a, dpre), dpre.sum(0))
