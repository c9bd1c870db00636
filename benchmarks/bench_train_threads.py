"""Training step time of the `mmoe-fast train` default model at 1 vs 2 intra-op threads, interleaved in one process.

Run: python benchmarks/bench_train_threads.py [--rounds 6] [--steps 40]
"""

import argparse
import sys

import torch

from mmoe_fast import models, timing
from mmoe_fast.data import make_synthetic
from mmoe_fast.timing import format_ratio
from mmoe_fast.train import task_losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    timing.raise_priority()
    x, y = make_synthetic(128, d=100, seed=0)  # the CLI's defaults: batch 128, D=100, 8 experts x 16
    model = models.MMoE(100, 2, task_types=("regression", "regression"))
    opt = torch.optim.Adam(model.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        task_losses(model(x), y, model.task_types).sum().backward()
        opt.step()

    def steps(threads: int):
        def run() -> None:
            torch.set_num_threads(threads)
            for _ in range(args.steps):
                step()

        return run

    for _ in range(10):
        step()
    # one timed call a turn: `steps` steps at that thread count; both see the same machine load
    times = timing.interleaved({threads: steps(threads) for threads in (1, 2)}, passes=args.rounds, min_time=0.0,
                               min_reps=1, max_reps=1, warmup=0)
    print(f"command: python benchmarks/bench_train_threads.py --rounds {args.rounds} --steps {args.steps}")
    print(timing.conditions())
    for threads, t in times.items():
        print(f"{threads} thread(s): median {t.median / args.steps * 1e3:.2f} ms/step  (rounds: "
              + ", ".join(f"{v / args.steps * 1e3:.1f}" for v in t.passes) + ")")
    print(f"2 threads / 1 thread: {format_ratio(times[2].median, times[1].median)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
