"""Op benchmark harness: every available backend against the loop and batched references, in one run.

For each shape it times ``mmoe`` forward (no grad) and forward+backward, median of repeated runs after
warm-up (``timing.median_time``), and prints ratios: against the loop reference (the peers' design), the
batched reference, and the floor (the one [B, D] x [D, E*H] GEMM the layer cannot avoid, timed with torch.mm).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from . import backends, ops, reference, timing
from .argtypes import positive_int
from .testing import Shape, make_inputs
from .timing import format_ratio, format_time

DEFAULT_SHAPES = (Shape(1, 128, 8, 256, 2), Shape(64, 128, 8, 256, 2), Shape(1024, 128, 8, 256, 2),
                  Shape(1024, 100, 8, 16, 2))


def contenders(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The backends worth timing on ``device`` in ``dtype``: every one that runs there, but the Triton
    interpreter on the CPU."""
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
    """One row a contender: name, median seconds of the forward (``fwd``) and of forward+backward (``train``,
    None for the GEMM floor), for ``mmoe`` on x[B, D], W[E, D, H], Wg[T, D, E] of ``shape``."""
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

    def median(fn: Callable[[], object]) -> float:
        return timing.median_time(fn, device=device, min_time=min_time, max_reps=200)

    w_packed = w.detach().permute(1, 0, 2).reshape(shape.D, shape.E * shape.H).contiguous()
    rows = [dict(name="gemm floor", fwd=median(lambda: torch.mm(x, w_packed)), train=None)]
    runs = [("loop reference", loop_fwd, loop_train)]
    for name in contenders(device, dtype):
        runs.append(("batched reference" if name == "reference" else name, *fused(name)))
    for name, fwd, train in runs:
        rows.append(dict(name=name, fwd=median(fwd), train=median(train)))
        for p in params + [xg]:
            p.grad = None
    return rows


def report(shape: Shape, rows: list[dict]) -> str:
    """The printed table of ``bench_shape``'s rows, with the ratios against the loop, batched and floor rows."""
    by = {r["name"]: r for r in rows}
    loop, batched, floor = by["loop reference"], by.get("batched reference"), by["gemm floor"]
    lines = [f"shape {shape} (B, D, E, H, T)",
             f"  {'backend':18s} {'fwd':>10s} {'vs loop':>8s} {'vs batch':>8s} {'floor/fwd':>9s} "
             f"{'fwd+bwd':>10s} {'vs loop':>8s} {'vs batch':>8s}"]
    for r in rows:
        lines.append(
            f"  {r['name']:18s} {format_time(r['fwd']):>10s} {format_ratio(loop['fwd'], r['fwd']):>8s} "
            f"{format_ratio(batched and batched['fwd'], r['fwd']):>8s} {format_ratio(floor['fwd'], r['fwd']):>9s} "
            f"{format_time(r['train']):>10s} {format_ratio(loop['train'], r['train']):>8s} "
            f"{format_ratio(batched and batched['train'], r['train']):>8s}"
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
    print(f"mmoe-fast bench on {device} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{timing.conditions()}; medians; 'floor/fwd' = time of the one [B,D]x[D,E*H] GEMM / time of the layer "
          f"(1.00x = at the floor)")
    for shape in shapes:
        print(report(shape, bench_shape(shape, device=device, dtype=dtype, min_time=args.min_time)), flush=True)
    return 0


def _shape(text: str) -> tuple[int, ...]:
    sizes = tuple(int(v) for v in text.split(","))
    if len(sizes) != 5 or min(sizes[1:]) < 1 or sizes[0] < 0:
        raise ValueError(text)
    return sizes
