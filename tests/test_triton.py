"""What is the triton backend's own, on CPU tensors through Triton's interpreter (test_conformance.py checks
it against the oracle like every backend): poisoned buffers, sliced weight-gradient reductions, precision,
padding, autotune guards, the GPU scripts' smoke runs.

Every output and scratch buffer the backend allocates is filled with NaN first (the ``poisoned`` fixture),
so an element no program writes fails ``assert_close``'s finiteness check.
"""

import importlib
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


def test_gate_columns_are_padded_for_tl_dot():
    for T, E in [(1, 1), (3, 1), (1, 3), (2, 8), (3, 16), (5, 33)]:
        t_pad, e_pad = tb._pads(T, E)
        assert t_pad * e_pad >= 16 and t_pad >= T and e_pad >= E


def test_autotune_configs_refuse_small_dot_blocks():
    from mmoe_fast.kernels import common

    with pytest.raises(AssertionError, match=">= 16"):
        common.autotune([common.cfg(BLOCK_M=8)], common.cfg(BLOCK_M=8), key=[])


def test_gpu_benchmark_smoke_mode_runs():
    """benchmarks/bench_gpu.py --smoke: the GPU script's correctness pass, tiny, on the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "correctness: all passed" in proc.stdout


def test_kernels_compile_for_a_gpu_without_spills():
    """The interpreter never compiles: lower each kernel to an sm_90 cubin (Triton's bundled ptxas)."""
    bin_dir = Path(importlib.import_module("triton").__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists():
        pytest.skip("this triton has no bundled NVIDIA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--quick",
                           "--dtypes", "fp32,bf16"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all compiled" in proc.stdout
