"""Op benchmark harness: every available backend against the loop and batched references, in one run.

For each shape it times ``mmoe`` forward (no grad) and forward+backward, median of repeated runs after
warm-up, and prints ratios: against the loop reference (the peers' design), the batched reference,
and the floor (the one [B, D] x [D, E*H] GEMM the layer cannot avoid, timed with torch.mm).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from . import backends, ops, reference
from .argtypes import positive_int
from .testing import Shape, make_inputs

DEFAULT_SHAPES = (Shape(1, 128, 8, 256, 2), Shape(64, 128, 8, 256, 2), Shape(1024, 128, 8, 256, 2),
                  Shape(1024, 100, 8, 16, 2))


def time_median(
    fn: Callable[[], object], *, device: torch.device, min_time: float = 0.2, max_reps: int = 200
) -> float:
    """Median seconds of ``fn()`` over repeated runs (after warm-up), synchronizing CUDA if needed."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _contenders(device: torch.device, dtype: torch.dtype) -> list[str]:
    names = []
    for name in backends.available_backends():
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter is a correctness tool, not a contender
        try:
            backends.resolve(name, device, dtype)
        except ValueError:
            continue
        names.append(name)
    return names


def bench_shape(shape: Shape, *, device: torch.device, dtype: torch.dtype, min_time: float) -> list[dict]:
    inp = make_inputs(shape, dtype=dtype, device=device)
    x, w, b, wg, bg = inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"]
    params = [t.requires_grad_() for t in (w, b, wg, bg)]
    xg = x.clone().requires_grad_()

    def loop_fwd():
        with torch.no_grad():
            return reference.mmoe(x, w, b, wg, bg)

    def loop_train():
        reference.mmoe(xg, w, b, wg, bg).sum().backward()

    def fused(name: str):
        def fwd():
            with torch.no_grad():
                return ops.mmoe(x, w, b, wg, bg, backend=name)

        def train():
            ops.mmoe(xg, w, b, wg, bg, backend=name).sum().backward()

        return fwd, train

    w_packed = w.detach().permute(1, 0, 2).reshape(shape.D, shape.E * shape.H).contiguous()
    rows = [dict(name="gemm floor", fwd=time_median(lambda: torch.mm(x, w_packed), device=device, min_time=min_time),
                 train=None)]
    runs = [("loop reference", loop_fwd, loop_train)]
    for name in _contenders(device, dtype):
        runs.append(("batched reference" if name == "reference" else name, *fused(name)))
    for name, fwd, train in runs:
        rows.append(dict(name=name, fwd=time_median(fwd, device=device, min_time=min_time),
                         train=time_median(train, device=device, min_time=min_time)))
        for p in params + [xg]:
            p.grad = None
    return rows


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def _ratio(base: float | None, mine: float | None) -> str:
    return "-" if base is None or mine is None else f"{base / mine:.2f}x"


def report(shape: Shape, rows: list[dict]) -> str:
    by = {r["name"]: r for r in rows}
    loop, batched, floor = by["loop reference"], by.get("batched reference"), by["gemm floor"]
    lines = [f"shape {shape} (B, D, E, H, T)",
             f"  {'backend':18s} {'fwd':>10s} {'vs loop':>8s} {'vs batch':>8s} {'floor/fwd':>9s} "
             f"{'fwd+bwd':>10s} {'vs loop':>8s} {'vs batch':>8s}"]
    for r in rows:
        lines.append(
            f"  {r['name']:18s} {_fmt(r['fwd']):>10s} {_ratio(loop['fwd'], r['fwd']):>8s} "
            f"{_ratio(batched and batched['fwd'], r['fwd']):>8s} {_ratio(floor['fwd'], r['fwd']):>9s} "
            f"{_fmt(r['train']):>10s} {_ratio(loop['train'], r['train']):>8s} "
            f"{_ratio(batched and batched['train'], r['train']):>8s}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmoe-fast bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--shape", action="append", metavar="B,D,E,H,T",
                        help="a shape to time (repeatable); default: a small table")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per shape and row")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                        help="intra-op CPU threads (default: torch's); on shared cores more threads are noisier")
    args = parser.parse_args(argv)
    try:
        shapes = [Shape(*_shape(s)) for s in args.shape] if args.shape else list(DEFAULT_SHAPES)
    except ValueError:
        parser.error(f"--shape takes five positive integers B,D,E,H,T, got {args.shape}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"mmoe-fast bench on {device} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load:.1f}; medians; 'floor/fwd' = time of the one [B,D]x[D,E*H] GEMM / time of the layer "
          f"(1.00x = at the floor)")
    for shape in shapes:
        print(report(shape, bench_shape(shape, device=device, dtype=dtype, min_time=args.min_time)), flush=True)
    return 0


def _shape(text: str) -> tuple[int, ...]:
    sizes = tuple(int(v) for v in text.split(","))
    if len(sizes) != 5 or min(sizes[1:]) < 1 or sizes[0] < 0:
        raise ValueError(text)
    return sizes
