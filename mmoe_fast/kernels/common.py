"""Pieces shared by the kernels: activations, the expert pre-activation tile, autotune configs.

``pre_tile`` is the one GEMM every expert kernel runs (forward, and the backward's recompute):
``a_e[rows] @ W[e][:, cols] + b[e][cols]`` accumulated in ``ACC`` (fp32, fp64 for fp64 inputs).
"""

import os

import triton
import triton.language as tl

# Triton reads this when a kernel is decorated, so the kernels' mode is fixed at import.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# MMOE_FAST_TRITON_AUTOTUNE=0: each kernel's first GPU config that fits (quick start: a correctness run).
AUTOTUNE = os.environ.get("MMOE_FAST_TRITON_AUTOTUNE", "1") != "0"



def autotune(gpu_configs, interpret_config, key, prune=None):
    """``triton.autotune`` over ``gpu_configs`` on a GPU; the interpreter gets one config (it cannot tune).

    Every ``BLOCK_*`` is >= 16: a GPU's ``tl.dot`` needs that in every dimension.
    """
    configs = [interpret_config] if INTERPRET else gpu_configs
    for cfg in configs:
        small = {k: v for k, v in cfg.kwargs.items() if k.startswith("BLOCK") and v < 16}
        assert not small, f"tl.dot blocks must be >= 16, got {small}"
    if INTERPRET:
        return triton.autotune(configs, key=key)

    def keep(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs) if prune is not None else configs
        return kept if AUTOTUNE else kept[:1]  # without tuning: the first config that fits

    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": keep})


def cfg(num_warps=4, num_stages=3, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gelu_2u(x):
    """2u of gelu's tanh form 0.5 x (1 + tanh(u)) == x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).

    The constants are literals: a compiled kernel reads only constexpr globals, and constexpr arithmetic
    with tensors breaks the interpreter."""
    return 1.5957691216057308 * (x + 0.044715 * x * x * x)


@triton.jit
def act(pre, ACT: tl.constexpr):
    """act(pre) for ACT in relu, silu, gelu (tanh form), identity; NaN stays NaN."""
    if ACT == "relu":
        out = tl.where(pre < 0, 0.0, pre)
    elif ACT == "silu":
        out = pre * _sigmoid(pre)
    elif ACT == "gelu":
        out = pre * _sigmoid(_gelu_2u(pre))
    else:
        out = pre
    return out


@triton.jit
def act_grad(pre, ACT: tl.constexpr):
    """d act(pre) / d pre, elementwise."""
    if ACT == "relu":
        out = tl.where(pre > 0, 1.0, 0.0).to(pre.dtype)
    elif ACT == "silu":
        s = _sigmoid(pre)
        out = s * (1.0 + pre * (1.0 - s))
    elif ACT == "gelu":
        s = _sigmoid(_gelu_2u(pre))
        # d/dx x * sigmoid(2u) = s + x * s * (1 - s) * 2u', with 2u' = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        out = s + pre * s * (1.0 - s) * (1.5957691216057308 * (1.0 + 0.134145 * pre * pre))
    else:
        out = tl.full(pre.shape, 1.0, pre.dtype)
    return out


@triton.jit
def pre_tile(a_ptr, w_ptr, bias_ptr, e, rows, cols, B, K, N, stride_ab, stride_ae,
             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """pre[BLOCK_M, BLOCK_N] = a[rows, e, :] @ W[e][:, cols] + bias[e, cols]; zero where out of range.

    ``a[b, e, k]`` lives at ``a_ptr + b * stride_ab + e * stride_ae + k`` (stride_ae = 0: shared input),
    ``W`` is ``[E, K, N]`` and ``bias`` ``[E, N]``, both contiguous. Loads are cast to ``DOT`` (the input
    dtype on a GPU; fp32 under the interpreter, whose bf16 arithmetic is wrong).
    """
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < B
    col_ok = cols < N
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_ab + e * stride_ae
    w_cols = w_ptr + e * K * N + cols[None, :]  # weights stay well under 2**31 elements
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a = tl.load(a_rows + k[None, :], mask=row_ok[:, None] & (k[None, :] < K), other=0.0)
        w = tl.load(w_cols + k[:, None] * N, mask=(k[:, None] < K) & col_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DOT), w.to(DOT), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * N + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return acc
