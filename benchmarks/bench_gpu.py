"""GPU check of the triton backend: correctness first, then timings against the eager and compiled forms.

Correctness: forward and every gradient of a layer against the float64 loop reference, for fp32 with
tf32 and with ieee dots, bf16, fp16 (and fp64 on small shapes), at the tolerance the backend promises.
Timings (``triton.testing.do_bench`` medians through ``mmoe_fast.timing.kernel_time``, one process, ratios):
one MMoE layer, forward (no_grad) and forward+backward, for the triton backend, the loop form
(``mmoe_fast.reference``), the batched eager form (``backend="reference"``) and ``torch.compile`` of the
batched math, next to the ceilings measured in the same run (a big ``torch.mm`` for FLOP/s, a big copy
for bytes/s).

    benchmarks/gpu_check.sh           # on a GPU: the two parts below, within 5 minutes on an H200
    MMOE_FAST_TRITON_AUTOTUNE=0 python benchmarks/bench_gpu.py --part correctness
    python benchmarks/bench_gpu.py --part timings
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --smoke   # both parts, tiny shapes, CPU, interpreter
The correctness part runs each kernel's first config (autotuning every shape would compile hundreds of
kernels); the timings part autotunes.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_package():
    """mmoe_fast from an install, or from this source tree (a lent GPU runs it without installing)."""
    if importlib.util.find_spec("mmoe_fast") is None:
        sys.path.insert(0, str(ROOT))


_import_package()
import mmoe_fast as mf  # noqa: E402
from mmoe_fast import reference, timing  # noqa: E402
from mmoe_fast.backends import reference as batched  # noqa: E402
from mmoe_fast.backends import triton as tb  # noqa: E402
from mmoe_fast.testing import SHAPES, Shape, check_layer, make_inputs  # noqa: E402

# (dtype, fp32 dot precision) pairs of the correctness pass.
MODES = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, None), (torch.float16, None)]
BIG = (512, 16, 512, 3)  # D, E, H, T of the headline GPU timing shape
PAPER = (100, 8, 16, 2)  # the paper's synthetic-data layer


def _set_precision(precision: str | None) -> None:
    if precision is None:
        os.environ.pop(tb.PRECISION_ENV, None)
    else:
        os.environ[tb.PRECISION_ENV] = precision


def correctness(device: str, smoke: bool) -> list[str]:
    """Run every check; return the failures (one line each)."""
    if smoke:
        shapes, modes = [SHAPES[1], SHAPES[6]], MODES[:1] + MODES[2:3]
    else:
        # Few shapes: every new shape and flag combination compiles kernels (~1 s each).
        shapes = [SHAPES[1], SHAPES[3], SHAPES[5], Shape(1000, 64, 8, 96, 5), Shape(2049, 512, 16, 512, 3)]
        modes = MODES
    cases = [(dtype, prec, shape) for dtype, prec in modes for shape in shapes]
    cases += [(torch.float64, None, shape) for shape in shapes[:3]]
    failures = []
    for i, (dtype, prec, shape) in enumerate(cases):
        _set_precision(prec)
        tol = tb.tolerance(dtype)
        activation = ("relu", "gelu", "silu")[i % 3]
        hidden = (33,) if i % 2 else ()
        what = f"{str(dtype)[6:]:9s} {prec or '':5s} {shape} {activation} hidden={hidden} tol={tol:.0e}"
        try:
            check_layer("triton", shape, dtype=dtype, device=device, activation=activation, hidden=hidden, tol=tol)
        except AssertionError as exc:
            failures.append(f"{what}: {exc}")
            print(f"FAIL {what}: {exc}", flush=True)
        else:
            print(f"ok   {what}", flush=True)
    _set_precision(None)
    print("correctness: all passed" if not failures else f"correctness: {len(failures)} FAILED", flush=True)
    return failures


def ceilings(device: str, dtype: torch.dtype, smoke: bool) -> tuple[float, float]:
    """(FLOP/s of a big torch.mm in dtype, bytes/s of a big copy), measured now."""
    n = 256 if smoke else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / timing.kernel_time(lambda: torch.mm(a, b), device=device)
    src = torch.empty(2**22 if smoke else 2**28, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / timing.kernel_time(lambda: dst.copy_(src), device=device)
    return flops, bandwidth


def _batched_math(x, W, b, Wg, bg):
    """The reference backend's math called directly (no custom op), so torch.compile sees through it."""
    return batched.expert_mixture(x, W, b, batched.gate_softmax(x, Wg, bg), "relu")


def layer_costs(B, D, E, H, T, itemsize) -> dict:
    """Model FLOPs and least bytes of one layer; fwd+bwd counts 3x the forward FLOPs (no recompute)."""
    flops = 2 * B * E * H * (D + T) + 2 * B * D * T * E
    weights = E * D * H + E * H + T * D * E + T * E
    fwd_bytes = itemsize * (B * D + weights + T * B * H)
    # backward: read dm, x and the weights, write dx and the weight gradients
    bwd_bytes = itemsize * (T * B * H + 2 * B * D + 2 * weights)
    return dict(fwd=(flops, fwd_bytes), fwdbwd=(3 * flops, fwd_bytes + bwd_bytes))


def time_layer(device, dtype, B, dims, peak, compiled) -> list[str]:
    D, E, H, T = dims
    inp = make_inputs(Shape(B, D, E, H, T), dtype=dtype, device=device, seed=1)
    params = [inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"]]
    impls = {
        "triton": lambda *p: mf.mmoe(*p, activation="relu", backend="triton"),
        "loop eager": lambda *p: reference.mmoe(*p, activation="relu"),
        "batched eager": lambda *p: mf.mmoe(*p, activation="relu", backend="reference"),
    }
    if compiled is not None:
        impls["torch.compile"] = compiled
    costs = layer_costs(B, D, E, H, T, params[0].element_size())
    grads = [p.detach().requires_grad_() for p in params]
    dm = torch.randn(T, B, H, device=device, dtype=dtype)
    times = {}
    for name, fn in impls.items():
        with torch.no_grad():
            fwd = timing.kernel_time(lambda fn=fn: fn(*params), device=device)
        fwdbwd = timing.kernel_time(lambda fn=fn: torch.autograd.grad(fn(*grads), grads, dm), device=device)
        times[name] = (fwd, fwdbwd)
    lines = []
    for name, (fwd, fwdbwd) in times.items():
        cells = [f"{B:6d}", f"{name:14s}"]
        for i, (kind, sec) in enumerate((("fwd", fwd), ("fwdbwd", fwdbwd))):
            flops, nbytes = costs[kind]
            roof = max(flops / peak[0], nbytes / peak[1])
            cells.append(f"{sec * 1e3:9.3f} ms {flops / sec / 1e12:7.1f} TF/s {nbytes / sec / 1e9:7.1f} GB/s "
                         f"{100 * roof / sec:5.1f}% roof  x{sec / times['triton'][i]:5.2f}")
        lines.append(" | ".join(cells))
    if (B, dims) == (8192, BIG) and "torch.compile" in times:
        flops, nbytes = costs["fwd"]
        roof = max(flops / peak[0], nbytes / peak[1])
        tri = times["triton"]
        lines.append(f"  issue targets at B=8192: fwd+bwd {times['batched eager'][1] / tri[1]:.2f}x batched eager "
                     f"(>= 2), {times['torch.compile'][1] / tri[1]:.2f}x torch.compile (>= 1.3); forward at "
                     f"{100 * roof / tri[0]:.0f}% of the roof that binds (>= 70%)")
    return lines


def timings(device: str, smoke: bool, deadline: float) -> None:
    if smoke:
        plan = [(torch.float32, None, (16, 3, 16, 2), [17])]
    else:
        # The headline target first (bf16, B = 8192), in case the time budget runs out.
        plan = [(torch.bfloat16, None, BIG, [8192, 65536, 1024]), (torch.bfloat16, None, PAPER, [1024, 65536]),
                (torch.float32, "tf32", BIG, [8192]), (torch.float32, "ieee", BIG, [8192])]
    print("\nlayer timings: medians; TF/s and GB/s are model FLOPs and least bytes over the time; "
          "roof = the bound of the measured ceilings; xN = time / triton's time", flush=True)
    # dynamic=True: one compile serves every shape of a dtype (a recompile per B would not fit the budget)
    compiled = None if smoke else torch.compile(_batched_math, dynamic=True)
    start = time.monotonic()
    for dtype, prec, dims, batches in plan:
        _set_precision(prec)
        torch.set_float32_matmul_precision("high" if prec == "tf32" else "highest")  # torch.mm's fp32 too
        peak = ceilings(device, dtype, smoke)
        print(f"\n{str(dtype)[6:]} {prec or ''} D,E,H,T={dims}: torch.mm {peak[0] / 1e12:.1f} TFLOP/s, "
              f"copy {peak[1] / 1e9:.0f} GB/s", flush=True)
        print(f"{'B':>6s} | {'impl':14s} | {'forward':^55s} | {'forward + backward':^55s}")
        for B in batches:
            if time.monotonic() > deadline:
                print(f"time budget spent: skipped B={B} and what follows", flush=True)
                return
            for line in time_layer(device, dtype, B, dims, peak, compiled):
                print(line, flush=True)
            print(f"  ({time.monotonic() - start:.0f} s into the timings: autotuning and compiling included)")
    _set_precision(None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--part", choices=("all", "correctness", "timings"), default="all")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds before timings stop")
    args = parser.parse_args()
    start = time.monotonic()
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) to check this script on the CPU")
        return 2
    if device == "cuda":
        timing.raise_priority()  # not in --smoke: the test suite runs that
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {importlib.import_module('triton').__version__}, host {timing.conditions()}", flush=True)
    failures = correctness(device, args.smoke) if args.part in ("all", "correctness") else []
    if args.part in ("all", "timings"):
        timings(device, args.smoke, start + args.budget)
    print(f"\ntotal {time.monotonic() - start:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
