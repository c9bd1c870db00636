"""What the GPU check (benchmarks/bench_gpu.py, run by gpu_check.sh on a lent GPU) relies on, checked on the CPU:
every ReLU case has a kink-free seed, its cases cover every mode, and its tf32 tolerance is honest for the
operand rounding the kernels do (an emulation of tensor-core tf32 at the check's full shapes)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mmoe_fast.contract import TF32_TOLERANCE
from mmoe_fast.testing import kink_free_seed, tf32_layer_errors, tf32_round

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_gpu", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("smoke", [False, True])
def test_every_relu_case_has_a_kink_free_seed(bench_gpu, smoke):
    cases = bench_gpu.correctness_cases(smoke)
    relu = [c for c in cases if c[3] == "relu"]
    assert relu, "the check would no longer cover relu"
    for dtype, prec, shape, _, hidden in relu:
        assert prec in ("ieee", None) and dtype in (torch.float32, torch.float64), "relu only where exact enough"
        kink_free_seed(shape, dtype=dtype, hidden=hidden)  # raises when none of 100 seeds is clear


def test_correctness_cases_cover_every_mode(bench_gpu):
    cases = bench_gpu.correctness_cases(False)
    modes = {(dtype, prec) for dtype, prec, *_ in cases}
    assert modes == {(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, None),
                     (torch.float16, None), (torch.float64, None)}
    shapes = {shape for _, _, shape, _, _ in cases}
    assert any(s.B == 1 for s in shapes) and any(s.E == 1 for s in shapes) and any(s.E > 64 for s in shapes)
    assert any(s.T > 4 for s in shapes) and any(h for *_, h in cases)  # task groups; hidden expert layers
    assert len(cases) <= 24  # each case compiles kernels on a fresh GPU: the check must end within minutes


def test_tf32_rounding_emulation():
    lsb = 2.0**-10
    x = torch.tensor([1 + 0.75 * lsb, 1 + 0.5 * lsb, -(1 + 0.5 * lsb), 1 + 0.25 * lsb, float("inf"), float("nan")])
    assert tf32_round(x).tolist()[:5] == [1 + lsb, 1 + lsb, -(1 + lsb), 1.0, float("inf")]
    assert tf32_round(x, "truncate").tolist()[:5] == [1.0, 1.0, -1.0, 1.0, float("inf")]
    assert tf32_round(x)[5].isnan()
    with pytest.raises(ValueError, match="nearest"):
        tf32_round(x, "up")


def test_tf32_tolerance_is_honest_at_the_checks_shapes(bench_gpu):
    """Every tf32 case of the GPU check, emulated at full size: with the operands rounded to nearest (what
    the kernels do) each output and gradient stays within TF32_TOLERANCE with a margin; truncated (what
    the tensor cores do alone) some would not, which is why the kernels round. Single-layer experts: a
    hidden layer adds GEMMs of the same kind."""
    cases = [(shape, act) for dtype, prec, shape, act, _ in bench_gpu.correctness_cases(False) if prec == "tf32"]
    assert len(cases) >= 3
    worst_truncated = 0.0
    for shape, activation in cases:
        rounded = tf32_layer_errors(shape, activation, "nearest")
        assert max(rounded.values()) <= 0.7 * TF32_TOLERANCE, (shape, rounded)
        worst_truncated = max(worst_truncated, *tf32_layer_errors(shape, activation, "truncate").values())
    assert worst_truncated > TF32_TOLERANCE
