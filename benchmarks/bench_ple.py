"""CGC/PLE mixture strategies: one ``expert_mixture`` call over all experts vs one call per expert group.

"one-call" runs every expert once with zero gates outside each task's experts (inner PLE levels gather
a per-expert input ``[B, E, K]``); "per-group" calls ``expert_mixture`` once per task group and once for
the shared experts. Prints medians of interleaved runs (inference under no_grad, and forward+backward)
and the ratio per-group / one-call (> 1: one-call is faster).

Run: python benchmarks/bench_ple.py [--device cuda] [--min-time 0.3] [--rounds 3] [--threads N]
(on a shared, loaded CPU, --threads 1 avoids the stalls of intra-op threads waiting for each other)
"""

from __future__ import annotations

import argparse
import sys

import torch

from mmoe_fast import PLE, timing
from mmoe_fast.bench import contenders

# (B, D, num_levels, num_specific_experts, num_shared_experts, expert_hidden, T)
SHAPES = (
    (1, 100, 1, 3, 2, 16, 2),       # CGC, paper scale, one request
    (1024, 100, 1, 3, 2, 16, 2),    # CGC, paper scale, a training batch
    (1024, 100, 2, 2, 2, 16, 2),    # PLE, paper scale
    (1, 128, 2, 2, 4, 256, 2),      # PLE, wide experts, more shared than specific
    (1024, 128, 2, 2, 4, 256, 2),
    (256, 128, 2, 1, 2, 64, 6),     # PLE, many tasks
)


def bench(shape: tuple, backend: str, device: torch.device, min_time: float, rounds: int) -> dict:
    """Median over ``rounds`` interleaved passes of each pass's median seconds, keyed (mixture, phase)."""
    B, D, levels, S, Sh, H, T = shape
    torch.manual_seed(0)
    models = {}
    for mixture in ("one-call", "per-group"):
        torch.manual_seed(0)
        models[mixture] = PLE(D, T, num_levels=levels, num_specific_experts=S, num_shared_experts=Sh,
                              expert_hidden=H, backend=backend, mixture=mixture).to(device)
    x = torch.randn(B, D, device=device)
    fns = {}
    for mixture, model in models.items():
        def infer(model=model):
            with torch.no_grad():
                return model(x)

        def train(model=model):
            model(x).sum().backward()

        fns[mixture, "infer"], fns[mixture, "train"] = infer, train
    # interleaved, so drifts of a noisy machine hit both strategies alike
    times = timing.interleaved(fns, passes=rounds, device=device, min_time=min_time, min_reps=5, max_reps=200)
    return {key: t.median for key, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per timing (median of its runs)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    timing.raise_priority()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"command: python benchmarks/bench_ple.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, float32, "
          f"{timing.conditions()}")
    print(f"{'backend':10s} {'B':>5s} {'D':>4s} {'L':>2s} {'S':>2s} {'Sh':>3s} {'H':>4s} {'T':>2s} | "
          f"{'infer 1-call':>12s} {'per-group':>10s} {'ratio':>6s} | {'train 1-call':>12s} {'per-group':>10s} "
          f"{'ratio':>6s}")
    for backend in contenders(device, torch.float32):
        for shape in SHAPES:
            t = bench(shape, backend, device, args.min_time, args.rounds)
            cells = []
            for phase in ("infer", "train"):
                one, grouped = t[("one-call", phase)], t[("per-group", phase)]
                cells.append(f"{one * 1e6:10.0f}us {grouped * 1e6:8.0f}us {grouped / one:6.2f}")
            sizes = " ".join(f"{v:>{w}d}" for v, w in zip(shape, (5, 4, 2, 2, 3, 4, 2)))
            print(f"{backend:10s} {sizes} | {cells[0]} | {cells[1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
