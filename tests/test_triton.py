"""What is the triton backend's own, on CPU tensors through Triton's interpreter (test_conformance.py checks
it against the oracle like every backend): poisoned buffers, sliced weight-gradient reductions, precision,
padding, autotune guards, the GPU scripts' smoke runs.

Every output and scratch buffer the backend allocates is filled with NaN first (the ``poisoned`` fixture),
so an element no program writes fails ``assert_close``'s finiteness check.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mmoe_fast as mf
from mmoe_fast import backends, ops
from mmoe_fast.activations import ACTIVATIONS
from mmoe_fast.testing import (
    SHAPES,
    Shape,
    assert_close,
    check_layer,
    make_inputs,
)

tb = pytest.importorskip("mmoe_fast.backends.triton")
if tb.unavailable_reason() is not None:
    pytest.skip(f"triton backend unavailable: {tb.unavailable_reason()}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """NaN in every buffer the backend allocates: unwritten elements cannot pass."""
    made = []

    def nan_filled(shape, dtype, device):
        made.append(shape)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tb, "_new", nan_filled)
    return made


@pytest.fixture
def sliced_weight_grads(monkeypatch):
    """Three batch slices in the weight-gradient reduction (a GPU picks several; the CPU picks one)."""
    monkeypatch.setattr(tb, "_weight_grad_splits", lambda B, tiles, device: 3)


# Every shape with one activation each (cycled), and every activation on two shapes: each axis covered
# without the whole cross product, which the interpreter is too slow for.
@pytest.mark.parametrize("shape,activation", [(s, ACTIVATIONS[i % 4]) for i, s in enumerate(SHAPES)],
                         ids=lambda v: str(v))
def test_layer_matches_reference_float32(shape, activation, poisoned):
    check_layer("triton", shape, dtype=torch.float32, activation=activation)
    assert poisoned or shape.B == 0  # the kernels ran (B = 0 never reaches a backend)


@pytest.mark.parametrize("shape", SHAPES[1:7:2], ids=str)
def test_layer_matches_reference_float64(shape, sliced_weight_grads):
    check_layer("triton", shape, dtype=torch.float64, activation="gelu")


@pytest.mark.parametrize("shape,activation", [(s, ("relu", "gelu")[i % 2]) for i, s in enumerate(SHAPES)],
                         ids=lambda v: str(v))
def test_two_layer_experts(shape, activation, sliced_weight_grads):
    check_layer("triton", shape, dtype=torch.float32, activation=activation, hidden=(9,))


def test_weight_gradients_are_deterministic(sliced_weight_grads):
    inp = make_inputs(Shape(70, 17, 3, 20, 2))
    args = (inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"])
    dm = torch.randn(2, 70, 20)
    first, second = (ops._mmoe_backward(dm, *args, "relu", "triton", True) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_a_device_the_backend_cannot_run_on_is_named():
    inp = make_inputs(Shape(5, 6, 3, 4, 2))
    x, w, b, wg, bg = inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"]
    with pytest.raises(ValueError, match="triton"):
        mf.mmoe(*(t.to("meta") for t in (x, w, b, wg, bg)), backend="triton")


def test_supports_and_availability(monkeypatch):
    cpu = torch.device("cpu")
    assert tb.supports(cpu, torch.float32) and tb.supports(cpu, torch.bfloat16) and tb.supports(cpu, torch.float64)
    assert not tb.supports(cpu, torch.int32)
    assert tb.supports(torch.device("cuda"), torch.float16)
    assert not tb.supports(torch.device("meta"), torch.float32)
    assert "triton" in backends.available_backends()
    monkeypatch.setattr(tb, "INTERPRET", False)
    assert not tb.supports(cpu, torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA" in tb.unavailable_reason()
    monkeypatch.setattr(tb, "triton", None)
    assert "not installed" in tb.unavailable_reason()
    assert not tb.supports(torch.device("cuda"), torch.float32)


def test_precision_setting(monkeypatch):
    monkeypatch.delenv(tb.PRECISION_ENV, raising=False)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert tb.precision() == "ieee"
        torch.set_float32_matmul_precision("high")
        assert tb.precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    monkeypatch.setenv(tb.PRECISION_ENV, "ieee")
    assert tb.precision() == "ieee" and tb.tolerance(torch.float32) == 1e-5
    assert tb.tolerance(torch.bfloat16) == tb.INTERPRETER_HALF_TOLERANCE
    monkeypatch.setenv(tb.PRECISION_ENV, "tf32")
    monkeypatch.setattr(tb, "INTERPRET", False)  # on a GPU, tf32 loosens the fp32 promise
    assert tb.tolerance(torch.float32) == tb.TF32_TOLERANCE and tb.tolerance(torch.bfloat16) == 1e-2
    monkeypatch.setenv(tb.PRECISION_ENV, "fast")
    with pytest.raises(ValueError, match=tb.PRECISION_ENV):
        tb.precision()


def test_weight_gradient_slices_fill_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert tb._weight_grad_splits(65536, 16, cuda) == 17  # 16 weight tiles: slices fill 2 x 132 SMs
    assert tb._weight_grad_splits(65536, 1024, cuda) == 1  # enough weight tiles already
    assert tb._weight_grad_splits(3000, 16, cuda) == 2  # >= 1024 rows a slice
    assert tb._weight_grad_splits(65536, 16, torch.device("cpu")) == 1


def test_gate_chunks_are_powers_of_two_a_dot_takes():
    from mmoe_fast.kernels import gating

    for E, block in [(1, 16), (8, 16), (17, 32), (64, 64), (65, 64), (1024, 64)]:
        assert gating.e_block(E) == block and gating.e_block(E, with_dx=True) == 16


# Gates wider than one chunk (E > 64: the online softmax's two passes) and many tasks, forward and every
# gradient; the interpreter is slow, so D and H stay small.
@pytest.mark.parametrize("shape", [Shape(3, 5, 129, 4, 2), Shape(17, 9, 300, 3, 1), Shape(2, 4, 5, 3, 40)],
                         ids=str)
def test_wide_gates_match_reference(shape):
    check_layer("triton", shape, dtype=torch.float32, activation="gelu")


def test_wide_gate_in_half_precision_keeps_fp32_logits():
    """Between the two passes the raw logits wait in fp32 scratch, not in G's bf16."""
    check_layer("triton", Shape(5, 7, 200, 4, 2), dtype=torch.bfloat16, activation="silu",
                tol=tb.tolerance(torch.bfloat16))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in the padded tile
def test_tf32_rounds_operands_to_nearest(monkeypatch):
    """With tf32, every fp32 operand is rounded to 10 mantissa bits, to nearest with ties away from zero
    (the tensor cores alone would truncate): x @ [[1]] returns round(x), exactly; ieee returns x."""
    from mmoe_fast.testing import tf32_round

    lsb = 2.0**-10
    values = [1 + 0.75 * lsb, 1 + 0.25 * lsb, 1 + 0.5 * lsb, -(1 + 0.5 * lsb), 3.0e38, -7.5, 0.0,
              float("inf"), float("-inf"), float("nan"), 1e-40]
    x = torch.tensor(values, dtype=torch.float32)[:, None]
    w = torch.ones(1, 1, 1)
    monkeypatch.setenv(tb.PRECISION_ENV, "tf32")
    out = tb.grouped_linear(x, w, None, "identity")[:, 0, 0]
    want = tf32_round(x[:, 0])
    assert want[0] == 1 + lsb and want[1] == 1 and want[2] == 1 + lsb and want[3] == -(1 + lsb)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out[~want.isnan()], want[~want.isnan()])
    monkeypatch.setenv(tb.PRECISION_ENV, "ieee")
    out = tb.grouped_linear(x, w, None, "identity")[:, 0, 0]
    assert torch.equal(out[~out.isnan()], x[:, 0][~out.isnan()])


@pytest.mark.parametrize("shape,activation", [(SHAPES[1], "gelu"), (SHAPES[3], "silu"), (SHAPES[5], "relu")],
                         ids=str)
def test_tf32_layer_meets_tf32_tolerance(shape, activation, monkeypatch):
    """The interpreter rounds the operands as a GPU would, then multiplies exactly: tf32 numerics on the CPU."""
    monkeypatch.setenv(tb.PRECISION_ENV, "tf32")
    assert tb.tolerance(torch.float32) == tb.TF32_TOLERANCE
    check_layer("triton", shape, dtype=torch.float32, activation=activation, tol=tb.TF32_TOLERANCE)


def test_autotune_keys_carry_the_code_changing_constexprs():
    from mmoe_fast.kernels import gating, linear, mixture

    assert {"ACT", "PREC", "TASKS", "HAS_BIAS"} <= set(mixture.expert_mixture_fwd.keys)
    assert {"ACT", "PREC"} <= set(linear.grouped_linear_fwd.keys)
    assert {"E_BLOCK", "WRITE_DX", "PREC"} <= set(gating.gate_softmax_bwd.keys)


def test_first_fit_launches_the_first_kept_config_untimed():
    """MMOE_FAST_TRITON_AUTOTUNE=0 on a GPU: FirstFit launches the first config the prune keeps."""
    from mmoe_fast.kernels import common, linear

    fn = linear.grouped_linear_fwd.fn
    configs = [common.cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), common.cfg(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)]
    seen = []

    def prune(configs, named_args, **kwargs):
        seen.append((named_args["B"], kwargs["ACT"]))
        return configs[1:]

    keys = ["B_BUCKET", "K", "N", "E", "ACT"]
    launcher = common.FirstFit(fn, configs, keys, prune)
    assert launcher.config((None, None, None, None, 5), {"ACT": "relu"})[0] is configs[1]
    inp = make_inputs(Shape(37, 20, 3, 18, 1), seed=3)
    x, w, b = inp["x"], inp["weights"][0], inp["biases"][0]
    out = torch.full((37, 3, 18), float("nan"))
    grids = []

    def grid(meta):
        grids.append(meta["BLOCK_M"])
        return (triton_cdiv(37, meta["BLOCK_M"]) * triton_cdiv(18, meta["BLOCK_N"]) * 3,)

    launcher[grid](x, w, b, out, 37, 20, 18, 3, 20, 0, 0, 0, 0, 0, 64, 1, ACT="gelu", HAS_BIAS=True, DOT=tl_float32(),
                   ACC=tl_float32(), PREC="ieee")
    assert grids == [32] and seen[-1] == (37, "gelu")
    want = torch.nn.functional.gelu(torch.einsum("bk,ekn->ben", x, w) + b, approximate="tanh")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_unaligned_launches_run_their_own_configs(monkeypatch):
    """A launch is aligned when every size and row stride of ``common.ALIGNED_ARGS`` it has is a multiple of 16
    (Triton then proves 16-byte loads). Aligned, the autotuner gets the kernel's prune of its aligned
    configs; otherwise its unaligned configs, the exact-fp32 ones for ieee fp32 dots (compile_check.py
    compiles both sets and fails on a spill in either). FirstFit reads the same choice from a real launch's
    arguments, and ``autotune`` lists the unaligned configs after the aligned ones, once each."""
    from mmoe_fast.kernels import common, linear

    f32, f64 = tl_float32(), importlib.import_module("triton.language").float64
    assert common.aligned(dict(K=512, N=16, E=16, stride_ab=512, stride_ae=0, B=37, T=3))
    assert common.aligned({})
    for name in ("K", "N", "E", "D", "stride_ab", "stride_yb"):
        assert not common.aligned({**dict(K=512, N=16, E=16, stride_ab=512, B=32), name: 100})
    a, b, c, d = (common.cfg(BLOCK_M=m) for m in (16, 32, 64, 128))
    seen = []

    def prune(configs, named_args, **kwargs):
        seen.append(configs)
        return configs[1:]

    choose = common._choose([a, b], prune, ([c, d], [b]), common.ALIGNED_ARGS)
    every = [a, b, c, d]
    assert choose(every, dict(K=32, N=16), PREC="tf32", ACC=f32) == [b] and seen == [[a, b]]
    assert choose(every, dict(K=20, N=16), PREC="tf32", ACC=f32) == [c, d]
    assert choose(every, dict(K=20, N=16), PREC="ieee", ACC=f32) == [b]  # exact fp32 dots
    assert choose(every, dict(K=20, N=16), PREC="ieee", ACC=f64) == [c, d]  # fp64 is not an fp32 FMA dot
    assert choose(every, dict(K=32), N=20, PREC="tf32", ACC=f32) == [c, d]  # a size passed by keyword
    assert len(seen) == 1

    # E strides only the gate kernels' loads: the expert GEMMs decide on the other sizes (SIZES_BUT_E)
    fn = linear.grouped_linear_fwd.fn
    keys = ["B_BUCKET", "K", "N", "E", "ACT"]
    gemm = common.FirstFit(fn, every, keys, common._choose([a, b], prune, ([c, d], [b]), common.SIZES_BUT_E))
    gate_like = common.FirstFit(fn, every, keys, choose)
    x, w = torch.ones(3, 32), torch.ones(16, 32, 16)
    flags = dict(ACT="relu", HAS_BIAS=True, PREC="tf32", ACC=f32)
    for launcher in (gemm, gate_like):
        assert launcher.config((x, w, w, x, 3, 32, 16, 16, 32, 0, 0, 0, 0, 0, 4, 1), flags)[0] is b
        assert launcher.config((x, w, w, x, 3, 20, 16, 16, 20, 0, 0, 0, 0, 0, 4, 1), flags)[0] is c  # K = 20
    assert gemm.config((x, w, w, x, 3, 32, 16, 8, 32, 0, 0, 0, 0, 0, 4, 1), flags)[0] is b  # E = 8
    assert gate_like.config((x, w, w, x, 3, 32, 16, 8, 32, 0, 0, 0, 0, 0, 4, 1), flags)[0] is c

    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(common, "KERNELS", {})
    monkeypatch.setattr(common, "GPU_CONFIGS", {})  # the fake kernel would replace grouped_linear_fwd's list
    kernel = common.autotune([a, b], a, key=["K"], prune=prune, unaligned=([c, a], [d, c]),
                             aligned_args=common.SIZES_BUT_E)(fn)
    assert kernel.configs == [a, b, c, d] and common.KERNELS == {fn.__name__: kernel}
    assert kernel.early_config_prune(kernel.configs, dict(K=20), PREC="ieee", ACC=f32) == [d, c]
    assert kernel.early_config_prune(kernel.configs, dict(K=32, E=8), PREC="tf32", ACC=f32) == [b]
    assert kernel.aligned_args == {"K", "N", "stride_ab", "stride_ae"}  # compile_check marks these


def test_mixture_forward_keeps_128_row_tiles_for_16_bit_inputs():
    """The forward's register prune counts its fp32 task tiles against what a thread can hold beside the
    rest: 16-bit inputs go to the tensor cores from shared memory, so 128-row tiles fit up to four tasks
    (compile_check.py: no spill under Triton 3.6 or 3.9); fp32 inputs round to tf32 in registers and keep
    64x64 tiles from two tasks up; exact fp32 dots take their own configs."""
    from mmoe_fast.kernels import mixture

    tl = importlib.import_module("triton.language")
    configs = mixture._CONFIGS + mixture._FMA_CONFIGS

    def tiles(tasks, dot, prec="tf32", acc=tl.float32):  # (rows, columns, depth, warps, stages) of each kept
        kept = mixture._fits_registers(configs, {}, TASKS=tasks, ACC=acc, DOT=dot, PREC=prec)
        return {(*(c.kwargs[f"BLOCK_{d}"] for d in "MNK"), c.num_warps, c.num_stages) for c in kept}

    square = {(64, 64, 32, 4, 3), (64, 64, 32, 8, 3), (64, 64, 64, 8, 4)}
    tall = {(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 64, 64, 8, 3)}
    for dtype in (tl.bfloat16, tl.float16):
        for tasks in (1, 2, 3, 4):
            assert tiles(tasks, dtype) == square | tall, (dtype, tasks)
    assert tiles(1, tl.float32) == square | tall
    assert tiles(2, tl.float32) == tiles(3, tl.float32) == square - {(64, 64, 32, 4, 3)}
    assert tiles(3, tl.float32, "ieee") == {(64, 32, 32, 8, 3), (32, 64, 32, 4, 3)}
    assert tiles(4, tl.float64, acc=tl.float64) == {(64, 64, 32, 4, 3)}


_KERNEL_OPS = {  # kernel -> (its module, the backend ops that launch it)
    "expert_mixture_fwd": ("mixture", "expert_mixture"), "expert_mixture_bwd_rows": ("mixture", "mmoe_backward"),
    "grouped_linear_fwd": ("linear", "grouped_linear"),
    "grouped_linear_bwd_rows": ("linear", "grouped_linear_backward"),
    "input_grad": ("linear", "mmoe_backward", "grouped_linear_backward"), "weight_grad": ("linear", "mmoe_backward"),
    "gate_softmax_fwd": ("gating", "gate_softmax"), "gate_softmax_bwd": ("gating", "mmoe_backward"),
}


@pytest.mark.parametrize("kernel", sorted(_KERNEL_OPS))
def test_every_gpu_config_computes_the_reference(kernel, monkeypatch):
    """The interpreter runs one config per kernel; a GPU runs any its autotuner keeps (aligned, unaligned,
    exact fp32: ``common.GPU_CONFIGS``). Each is launched here alone, in float64, at sizes past two tiles of
    every block and multiples of none (B=130, D=70, H=133), every output against the reference backend."""
    from mmoe_fast.backends import reference as ref
    from mmoe_fast.kernels import common

    B, D, E, H, T = 130, 70, 2, 133, 3
    g = torch.Generator().manual_seed(1)
    x, W, b, Wg, bg, dm, dout, logits = (torch.randn(*s, generator=g, dtype=torch.float64) for s in (
        (B, D), (E, D, H), (E, H), (T, D, E), (T, E), (T, B, H), (B, E, H), (B, T, E)))
    W, Wg, G = W / 8, Wg / 8, torch.softmax(logits, -1)
    args = {"expert_mixture": (x, W, b, G, "gelu"), "mmoe_backward": (dm, x, W, b, Wg, bg, "gelu"),
            "grouped_linear": (x, W, b, "gelu"), "grouped_linear_backward": (dout, x, W, b, "gelu"),
            "gate_softmax": (x, Wg, bg)}

    def reference(op):
        if op != "mmoe_backward":
            out = getattr(ref, op)(*args[op])
            return out if isinstance(out, tuple) else (out,)
        G = ref.gate_softmax(x, Wg, bg)
        da, dW, db, dG = ref.expert_mixture_backward(dm, x, W, b, G, "gelu")
        dx, dWg, dbg = ref.gate_softmax_backward(dG, G, x, Wg)
        return da + dx, dW, db, dWg, dbg

    module, *op_names = _KERNEL_OPS[kernel]
    launcher = getattr(importlib.import_module(f"mmoe_fast.kernels.{module}"), kernel)
    configs = common.GPU_CONFIGS[kernel]
    assert len(configs) >= 3
    for cfg in configs:
        monkeypatch.setattr(launcher, "configs", [cfg])  # the interpreter's autotuner runs a lone config
        launcher.cache.clear()
        for op in op_names:
            got = getattr(tb, op)(*args[op])
            for i, (o, w) in enumerate(zip(got if isinstance(got, tuple) else (got,), reference(op), strict=True)):
                assert_close(o, w, 1e-12, f"{kernel} {cfg.kwargs} w{cfg.num_warps} {op}[{i}]")


def test_tuned_table_round_trips_and_seeds_first_fit(tmp_path, monkeypatch):
    """A table of GPU picks (bench_gpu.py --tuned-out) is read back by tuning key; FirstFit takes a hit over
    its first config; the shipped table parses."""
    from mmoe_fast.kernels import common, linear

    assert isinstance(common.load_tuned(), dict)
    fn = linear.grouped_linear_fwd.fn
    keys = ["B_BUCKET", "K", "N", "E", "ACT"]
    x, w = torch.ones(3, 20), torch.ones(2, 20, 18)
    args = (x, w, w, x, 3, 20, 18, 2, 20, 0, 0, 0, 0, 0, 4, 1)
    key = common.tuning_key(keys, fn.arg_names, args, dict(ACT="relu", HAS_BIAS=True))
    assert key == (4, 20, 18, 2, "relu", "torch.float32", "torch.float32", "torch.float32", "torch.float32")
    picked = common.cfg(BLOCK_M=128, BLOCK_N=32, BLOCK_K=16, num_warps=8, num_stages=2)
    monkeypatch.setattr(common, "KERNELS", {"grouped_linear_fwd": SimpleNamespace(cache={key: picked})})
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(common.tuned_table(device="test")))
    table = common.load_tuned(path)
    got = table["grouped_linear_fwd"][key]
    assert (got.kwargs, got.num_warps, got.num_stages) == (picked.kwargs, 8, 2)
    first = common.cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
    launcher = common.FirstFit(fn, [first], keys, None, table["grouped_linear_fwd"])
    assert launcher.config(args, dict(ACT="relu", HAS_BIAS=True))[0] is got
    assert launcher.config(args, dict(ACT="gelu", HAS_BIAS=True))[0] is first  # another key: the first config


def triton_cdiv(a, b):
    return -(-a // b)


def tl_float32():
    return importlib.import_module("triton.language").float32


def test_autotune_configs_refuse_small_dot_blocks():
    from mmoe_fast.kernels import common

    with pytest.raises(AssertionError, match=">= 16"):
        common.autotune([common.cfg(BLOCK_M=8)], common.cfg(BLOCK_M=8), key=[])


def test_gpu_benchmark_smoke_mode_runs(tmp_path):
    """benchmarks/bench_gpu.py --smoke: the GPU script's both parts, tiny, on the interpreter, with its files."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--json",
                           str(tmp_path / "t.json"), "--tuned-out", str(tmp_path / "tuned.json")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "correctness: all passed" in proc.stdout and "| dtype |" in proc.stdout  # the summary table
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["failures"] == [] and result["rows"][0]["B"] == 17
    assert "kernels" in json.loads((tmp_path / "tuned.json").read_text())


def test_kernels_compile_for_a_gpu_without_spills():
    """The interpreter never compiles: lower each kernel to an sm_90 cubin (Triton's bundled ptxas) with
    no spill and shared memory within the limit, the main GEMMs on wgmma and pipelined (tf32, bf16)."""
    bin_dir = Path(importlib.import_module("triton").__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists():
        pytest.skip("this triton has no bundled NVIDIA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--quick",
                           "--dtypes", "fp32,bf16,fp64"], env=env, capture_output=True, text=True, timeout=600)
    failed = [line for line in proc.stdout.splitlines() if line.split(" ", 1)[0] not in ("ok", "command:", "triton")]
    assert proc.returncode == 0, "\n".join(failed)[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("all ") and " variants compiled for sm_90 with triton " in summary, summary
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("ok ")]

    def wgmma_pipelined(kernel, mode, alignment="aligned"):  # the (wgmma, pipelined) answers of these lines
        return {(f[f.index("wgmma") + 1], f[f.index("pipelined") + 1]) for f in rows
                if f[1:4] == [kernel, mode, alignment] and "DOT=ACC" not in f}  # not the gate's dWg

    for kernel in ("expert_mixture_fwd", "expert_mixture_bwd_rows", "grouped_linear_fwd", "grouped_linear_bwd_rows",
                   "input_grad", "weight_grad"):
        for mode in ("fp32-tf32", "bf16"):
            assert wgmma_pipelined(kernel, mode) == {("yes", "yes")}, (kernel, mode)
        assert {w for w, _ in wgmma_pipelined(kernel, "fp32-ieee")} == {"no"}, kernel  # ieee fp32: no wgmma
    assert wgmma_pipelined("expert_mixture_fwd", "bf16", "unaligned")
    # unaligned launches compile their own configs (common.aligned), and fail the check on a spill too:
    # the mixture forward's is 64 x 32, where its first aligned one is 64 x 64
    assert " aligned and unaligned without spills" in summary
    mixture = [f for f in rows if f[1:4] == ["expert_mixture_fwd", "bf16", "unaligned"]]
    assert mixture and all("N32" in f for f in mixture), mixture
    gate = [f for f in rows if f[1].startswith("gate_softmax")]
    assert {f"E_BLOCK={e}" for e in (16, 64)} <= {w for f in gate for w in f}
