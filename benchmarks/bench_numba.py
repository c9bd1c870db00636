"""The numba backend against the batched reference and the loop reference, in one process.

Inference (``no_grad``) at B = 1, 64, 4096 and one training step (forward + backward) at B = 1024,
for one MMoE layer at D=128, E=8, H=256, T=2, ReLU, float32. Medians of interleaved runs, so that
the machine's noise hits every contender alike; the numba kernels are compiled (or loaded from
numba's cache) before any timing, and that one-time cost is printed on its own.

    python benchmarks/bench_numba.py [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time

import numba
import torch

import mmoe_fast as mf
from mmoe_fast import reference, timing
from mmoe_fast.backends import numba as numba_backend
from mmoe_fast.testing import Shape, assert_close, make_inputs
from mmoe_fast.timing import format_ratio

D, E, H, T = 128, 8, 256, 2


def _layer(B: int, grad: bool):
    inp = make_inputs(Shape(B, D, E, H, T), dtype=torch.float32)
    args = [inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"]]
    return [t.requires_grad_(grad) for t in args]


def _contenders(args, train: bool):
    dm = torch.randn(T, args[0].shape[0], H)

    def run(fn):
        def step():
            if not train:
                with torch.no_grad():
                    return fn(*args)
            for t in args:
                t.grad = None
            out = fn(*args)
            out.backward(dm)
            return out
        return step

    return {
        "numba": run(lambda *a: mf.mmoe(*a, backend="numba")),
        "reference (batched)": run(lambda *a: mf.mmoe(*a, backend="reference")),
        "loop reference": run(reference.mmoe),
    }


def _median(fns: dict, repeats: int) -> dict:
    """Median seconds per call; the contenders take turns, one call each, so that noise hits them alike."""
    for fn in fns.values():
        fn()  # once, outside the timing: first-call costs (allocations, autograd graph) are not the figure
    times = timing.interleaved(fns, passes=repeats, min_time=0.0, min_reps=1, max_reps=1, warmup=0)
    return {name: t.median for name, t in times.items()}


def _row(label: str, med: dict) -> str:
    base = med["numba"]
    cells = "  ".join(f"{name} {sec * 1e3:9.3f} ms ({format_ratio(sec, base):>6s})" for name, sec in med.items())
    return f"{label:22s} {cells}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per contender (default: by size)")
    parser.add_argument("--threads", type=int, default=0, help="threads (default: all cores)")
    opts = parser.parse_args()
    timing.raise_priority()
    if opts.threads:
        torch.set_num_threads(opts.threads)  # the numba backend follows torch's thread count
    print("command: python " + " ".join(sys.argv))
    start = time.perf_counter()
    numba_backend.warmup()
    print(f"numba compile (or cache load), float32 + float64, once per process: {time.perf_counter() - start:.1f} s")
    print(f"torch {torch.__version__}, numba {numba.__version__} ({numba.threading_layer()} threading layer), "
          f"{torch.get_num_threads()} threads, {timing.conditions()}")
    print(f"MMoE layer D={D} E={E} H={H} T={T} relu float32; median time, (x) = time / numba's time")
    for B, train, repeats in ((1, False, 400), (64, False, 200), (4096, False, 15), (1024, True, 20)):
        args = _layer(B, train)
        fns = _contenders(args, train)
        with torch.no_grad():
            assert_close(mf.mmoe(*args, backend="numba"), reference.mmoe(*args), 1e-5, "numba forward")
        med = _median(fns, opts.repeats or repeats)
        print(_row(f"{'train fwd+bwd' if train else 'inference'} B={B}", med), flush=True)


if __name__ == "__main__":
    main()
