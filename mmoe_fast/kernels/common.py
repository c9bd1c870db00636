"""Pieces shared by the kernels: activations, the expert pre-activation tile, the dot, autotune configs.

``pre_tile`` is the one GEMM every expert kernel runs (forward, and the backward's recompute):
``a_e[rows] @ W[e][:, cols] + b[e][cols]`` accumulated in ``ACC`` (fp32, fp64 for fp64 inputs).
``replica`` moves a kernel's pointers to its program's replica: every kernel takes a grid axis of S replicas
(the ops' vmap rules run S independent models in one launch) and each pointer a replica stride: 0 for a
tensor the replicas share, and for every tensor when S = 1, so a single model's launch keeps the alignment
Triton proves for a stride of 0 (divisible by 16).
``mma`` is every kernel's ``tl.dot``: with ``PREC="tf32"`` it rounds fp32 operands to tf32 (nearest, ties
away) first; the tensor cores would truncate them, about doubling the error.
"""

import json
import os
from pathlib import Path

import triton
import triton.language as tl

# Triton reads this when a kernel is decorated, so the kernels' mode is fixed at import.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# MMOE_FAST_TRITON_AUTOTUNE=0: each kernel's first GPU config that fits (quick start: a correctness run).
AUTOTUNE = os.environ.get("MMOE_FAST_TRITON_AUTOTUNE", "1") != "0"
# Configs tuned on a GPU (benchmarks/bench_gpu.py --tuned-out writes them), by kernel and tuning key: an
# autotuned kernel starts with them in its cache, so a first run need not tune the shapes they cover.
TUNED_FILE = Path(__file__).with_name("tuned_configs.json")
KERNELS: dict = {}  # name -> the autotuned (or FirstFit) kernel, for tuned_table()
GPU_CONFIGS: dict = {}  # name -> every config a GPU launch may run (aligned, then unaligned), interpreter too
# Constexprs that change the code a config runs, so tuning keys carry them (tensor dtypes are added by Triton).
TUNE_CONSTEXPRS = ("ACT", "PREC", "HAS_BIAS", "TASKS", "T_PAD", "E_BLOCK", "GATE", "WRITE_DX")


def tuning_key(keys, arg_names, args, kwargs) -> tuple:
    """The key Triton's autotuner (3.6 to 3.9) files a launch under: the ``keys`` arguments' values, then
    the dtype of every tensor argument, in argument order."""
    named = {k: v for k, v in {**dict(zip(arg_names, args)), **kwargs}.items() if k in arg_names}
    return (*(named[k] for k in keys if k in named), *(str(v.dtype) for v in named.values() if hasattr(v, "dtype")))


def _config(entry: dict) -> triton.Config:
    return triton.Config(entry["kwargs"], num_warps=entry["num_warps"], num_stages=entry["num_stages"])


def load_tuned(path: Path = TUNED_FILE) -> dict:
    """{kernel name: {tuning key: Config}} from a table ``tuned_table`` wrote; {} when there is none."""
    if not path.exists():
        return {}
    table = json.loads(path.read_text())
    return {name: {tuple(key): _config(entry) for key, entry in rows} for name, rows in table["kernels"].items()}


def tuned_table(**about) -> dict:
    """Every autotuned kernel's picks so far, as JSON for ``load_tuned`` (``about``: where they came from)."""
    kernels = {}
    for name, kernel in KERNELS.items():
        cache = getattr(kernel, "cache", {})
        kernels[name] = [[list(key), dict(kwargs=c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)]
                         for key, c in cache.items()]
    return dict(about, triton=triton.__version__, kernels=kernels)


class FirstFit:
    """A kernel launched with its tuned config for this key when the table has one, else the first of its
    configs that ``prune`` keeps; never timed.

    ``triton.autotune`` benchmarks whenever it holds more than one config, even when the prune leaves one
    (Triton 3.6), so ``MMOE_FAST_TRITON_AUTOTUNE=0`` launches through this instead. ``kernel[grid](...)``
    as for an autotuned kernel; ``configs``/``early_config_prune``/``fn``/``keys`` as the autotuner has them.
    """

    def __init__(self, fn, configs, keys, prune=None, tuned=None):
        self.fn, self.configs, self.keys, self.early_config_prune = fn, configs, keys, prune
        self.arg_names = fn.arg_names
        self.tuned = tuned or {}

    def config(self, args, kwargs):
        named = dict(zip(self.arg_names, args))
        tuned = self.tuned.get(tuning_key(self.keys, self.arg_names, args, kwargs))
        if tuned is not None:
            return tuned, named
        kept = self.early_config_prune(self.configs, named, **kwargs) if self.early_config_prune else self.configs
        return kept[0], named

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            cfg, named = self.config(args, kwargs)
            meta = {**named, **kwargs, **cfg.kwargs}
            return self.fn[grid(meta) if callable(grid) else grid](
                *args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return launch


# The integer arguments (sizes, row strides) that make a launch aligned when each of a kernel's is a multiple
# of 16, as Triton then specializes it: its loads and async copies move 16 bytes at a time. With any one not
# (the paper's D = 100, an odd H) they move one element at a time, each with its own address and predicate
# registers, and the aligned configs spill; such a launch runs the kernel's unaligned configs instead.
# The expert count E strides only the gate kernels' loads (and input_grad's gate share): the other kernels
# take ``SIZES_BUT_E``. compile_check.py compiles both sets for sm_90 (nothing known for the second).
ALIGNED_ARGS = frozenset({"K", "N", "D", "E", "stride_ab", "stride_ae", "stride_yb", "stride_ye", "stride_db",
                          "stride_de"})
SIZES_BUT_E = ALIGNED_ARGS - {"E"}


def aligned(named_args: dict, names=ALIGNED_ARGS) -> bool:
    """Whether every argument of a launch that ``names`` lists is a multiple of 16."""
    return all(named_args[name] % 16 == 0 for name in names if name in named_args)


def _choose(configs, prune, unaligned, names):
    """The autotuner's prune: at aligned launches (``names``) ``prune`` (or all) of ``configs``; at unaligned
    ones ``unaligned = (configs, exact fp32 configs)``, the second for exact fp32 dots."""

    def choose(all_configs, named_args, **kwargs):
        if unaligned is not None and not aligned({**named_args, **kwargs}, names):  # sizes by keyword too
            return list(unaligned[1] if fp32_fma(kwargs) else unaligned[0])
        kept = all_configs[:len(configs)]  # the unaligned ones follow
        return prune(kept, named_args, **kwargs) if prune else kept

    return choose


def autotune(gpu_configs, interpret_config, key, prune=None, unaligned=None, aligned_args=ALIGNED_ARGS):
    """``triton.autotune`` over ``gpu_configs`` on a GPU, its cache seeded from ``TUNED_FILE``; the
    interpreter gets one config (it cannot tune).

    ``prune(configs, named_args, **constexprs)`` narrows ``gpu_configs`` for an aligned launch;
    ``unaligned = (configs, exact fp32 configs)`` replaces them for an unaligned one (``aligned`` over
    ``aligned_args``, which the kernel gets as an attribute).
    ``key`` gets the kernel's own ``TUNE_CONSTEXPRS`` added.
    Every ``BLOCK_*`` is >= 16: a GPU's ``tl.dot`` needs that in every dimension.
    """
    extra = [c for group in unaligned or () for c in group if c not in gpu_configs]
    every = [*gpu_configs, *dict.fromkeys(extra)]
    configs = [interpret_config] if INTERPRET else every
    for cfg in configs:
        small = {k: v for k, v in cfg.kwargs.items() if k.startswith("BLOCK") and v < 16}
        assert not small, f"tl.dot blocks must be >= 16, got {small}"
    choose = _choose(gpu_configs, prune, unaligned, aligned_args) if prune or unaligned else None

    def decorate(fn):
        keys = [*key, *(name for name in TUNE_CONSTEXPRS if name in fn.arg_names)]
        GPU_CONFIGS[fn.__name__] = every
        if INTERPRET:
            return triton.autotune(configs, key=keys)(fn)
        tuned = load_tuned().get(fn.__name__, {})
        if not AUTOTUNE:
            kernel = FirstFit(fn, configs, keys, choose, tuned)
        else:
            kernel = triton.autotune(configs, key=keys,
                                     prune_configs_by={"early_config_prune": choose} if choose else None)(fn)
            kernel.cache.update(tuned)
        kernel.aligned_args = frozenset(aligned_args) & set(fn.arg_names)
        KERNELS[fn.__name__] = kernel
        return kernel

    return decorate


def fp32_fma(kwargs) -> bool:
    """Whether a launch's dot runs exact fp32 (``PREC="ieee"`` on fp32 operands): no tensor cores, so its
    operands live in registers and configs that fit a tf32/bf16 launch can spill (compile_check.py)."""
    return kwargs.get("PREC") == "ieee" and kwargs.get("DOT", kwargs.get("ACC")) == tl.float32


def without(configs, drop):
    """``configs`` less those ``drop(config)`` is true for (the first one if that leaves none)."""
    return [c for c in configs if not drop(c)] or configs[:1]


def cfg(num_warps=4, num_stages=3, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


@triton.jit
def replica(ptr, stride, AXIS: tl.constexpr):
    """``ptr`` advanced to the replica of this program, ``tl.program_id(AXIS)``: ``stride`` elements between
    two replicas' tensors (0: a tensor every replica shares). The offset is int64 whatever the stride."""
    return ptr + tl.program_id(AXIS).to(tl.int64) * stride


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
def _tf32(x):
    """fp32 ``x`` rounded to tf32's 10 mantissa bits, to nearest with ties away from zero (PTX's
    ``cvt.rna.tf32.f32``), as integer arithmetic: the same code runs under the interpreter. NaN and
    infinities stay as they are; a value that rounds past the largest finite one becomes infinite."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)  # -8192 == 0xFFFFE000
    return tl.where(x == x, rounded, x)


@triton.jit
def mma(a, b, acc, DOT: tl.constexpr, PREC: tl.constexpr):
    """``acc + a @ b`` with the operands cast to ``DOT``; tf32 rounds fp32 operands to nearest first."""
    a = a.to(DOT)
    b = b.to(DOT)
    if PREC == "tf32":
        if DOT == tl.float32:
            a = _tf32(a)
            b = _tf32(b)
    return tl.dot(a, b, acc, input_precision=PREC, out_dtype=acc.dtype)  # 3.6 assumes fp32 otherwise


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
        acc = mma(a, w, acc, DOT, PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * N + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return acc
