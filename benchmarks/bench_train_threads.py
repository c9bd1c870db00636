"""Training step time of the `mmoe-fast train` default model at 1 vs 2 intra-op threads, interleaved in one process.

Run: python benchmarks/bench_train_threads.py [--rounds 6] [--steps 40]
"""

import argparse
import statistics
import sys
import time

import torch

from mmoe_fast import models
from mmoe_fast.data import make_synthetic
from mmoe_fast.train import task_losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    x, y = make_synthetic(128, d=100, seed=0)  # the CLI's defaults: batch 128, D=100, 8 experts x 16
    model = models.MMoE(100, 2, task_types=("regression", "regression"))
    opt = torch.optim.Adam(model.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        task_losses(model(x), y, model.task_types).sum().backward()
        opt.step()

    for _ in range(10):
        step()
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):  # interleaved, so both see the same machine load
        for threads in times:
            torch.set_num_threads(threads)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[threads].append((time.perf_counter() - start) / args.steps * 1e3)
    print(f"command: python benchmarks/bench_train_threads.py --rounds {args.rounds} --steps {args.steps}")
    for threads, ms in times.items():
        print(f"{threads} thread(s): median {statistics.median(ms):.2f} ms/step  (rounds: "
              + ", ".join(f"{v:.1f}" for v in ms) + ")")
    print(f"2 threads / 1 thread: {statistics.median(times[2]) / statistics.median(times[1]):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
