"""CPU benchmark: fit_many on the models other than MMoE, OMoE and Shared-Bottom against one run at a time.

For each model kind (D=100, 2 regression tasks, B=128, the synthetic study's 10,000 rows) and each number of runs
S: ``fit_many`` on S models against ``fit_many(packed=False)`` (``fit`` one run after another) on 4 of them. PLE,
Cross-Stitch, Tensor-Factorization, a two-layer Single-Task and a two-layer-expert MMoE do not pack: ``engine``
"vmapped" from ``VMAP_MIN_RUNS`` on (the weights stacked, ``vmap(grad(...))`` of the model's forward, the fused
ops on their C++ replica kernels); Single-Task and L2-Constrained with one task layer pack as replicas at any S
(``engine`` "packed"). Both train
``--steps`` steps per run, setup included; the figure is the time per run and step, each contender's best of
``--passes`` interleaved passes' medians.

Run: python benchmarks/bench_fit_many_models.py [--runs 8,64] [--steps 30] [--passes 3] [--write benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path

import torch

import mmoe_fast as mf
from mmoe_fast import timing, train_many
from mmoe_fast.timing import format_ratio, format_time

D, T, B, N_ROWS = 100, 2, 128, 10_000
TYPES = ("regression",) * T
KINDS = {
    "ple": lambda: mf.build_model("ple", D, T, task_types=TYPES),
    "cross-stitch": lambda: mf.build_model("cross-stitch", D, T, task_types=TYPES),
    "tensor-factorization": lambda: mf.build_model("tensor-factorization", D, T, task_types=TYPES),
    "single-task, layers [64, 32]": lambda: mf.build_model("single-task", D, T, task_hidden=(64, 32),
                                                           task_types=TYPES),
    "mmoe, experts [16, 16]": lambda: mf.MMoE(D, T, num_experts=8, expert_hidden=(16, 16), task_types=TYPES),
    "single-task": lambda: mf.build_model("single-task", D, T, task_types=TYPES),
    "l2-constrained": lambda: mf.build_model("l2-constrained", D, T, task_types=TYPES),
}
PACKED = ("single-task", "l2-constrained")  # the kinds the replicas pack (at any S)
ONE_BY_ONE = 4  # runs timed one after another (per run-step, like the others)


def contenders(sizes: list[int], steps: int) -> tuple[dict, dict, dict]:
    """``({name: fn}, {name: run-steps per call}, {name: engine})``."""
    x, y = torch.randn(N_ROWS, D), torch.randn(N_ROWS, T)
    quiet = dict(steps=steps, batch_size=B, progress=False, log=lambda _: None)
    fns, per_call, engines = {}, {}, {}
    for kind, make in KINDS.items():
        torch.manual_seed(0)
        models = [make() for _ in range(max(sizes))]
        fns[(kind, "one by one")] = lambda m=models: mf.fit_many(copy.deepcopy(m[:ONE_BY_ONE]), x, y, packed=False,
                                                                 **quiet)
        per_call[(kind, "one by one")] = steps * ONE_BY_ONE
        for S in sizes:
            def run(m=models[:S], kind=kind, S=S):
                engines[(kind, S)] = mf.fit_many(copy.deepcopy(m), x, y, **quiet)[0]["engine"]
            fns[(kind, S)] = run
            per_call[(kind, S)] = steps * S
    return fns, per_call, engines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="8,64", help="numbers of runs trained at once (comma-separated)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run and call (setup included)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", type=Path, help="replace this benchmark's section of that markdown file")
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.runs.split(",")]
    timing.raise_priority()
    torch.set_num_threads(args.threads)
    fns, per_call, engines = contenders(sizes, args.steps)
    for fn in fns.values():  # warm caches and vmap's first traces
        fn()
    times = timing.interleaved(fns, passes=args.passes, min_time=0.0, min_reps=1, warmup=0)
    per_step = {name: t.best / per_call[name] for name, t in times.items()}
    command = "python benchmarks/bench_fit_many_models.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = " | ".join(f"S={S}: fit_many" for S in sizes)
    lines = [f"## CPU: fit_many on other models (bench_fit_many_models.py, {datetime.date.today()})", "",
             f"Command: `{command.strip()}`  ",
             f"{args.threads} threads, torch {torch.__version__}, {timing.conditions()}; D={D}, T={T} regression, "
             f"B={B}, float32, {args.steps} steps per run and call, setup included; per run-step, best of "
             f"{args.passes} interleaved passes' medians; VMAP_MIN_RUNS = {train_many.VMAP_MIN_RUNS} (fewer runs: "
             "one by one; the packed kinds pack at any S). In brackets: the engine that ran, and one-by-one's "
             "time over this. Against fit run by run only: these models have no hand-stacked form here, and no "
             "GEMM limit is computed (bench_fit_many.py has both for the packable MMoE).", "",
             f"| model | one by one ({ONE_BY_ONE} runs) | {header} |", "|---|---|" + "---|" * len(sizes)]
    for kind in KINDS:
        alone = per_step[(kind, "one by one")]
        cells = [f"{format_time(per_step[(kind, S)], us_digits=0)} ({engines[(kind, S)]}, "
                 f"{format_ratio(alone, per_step[(kind, S)])})" for S in sizes]
        lines.append(f"| {kind} | {format_time(alone, us_digits=0)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        timing.write_section(args.write, "bench_fit_many_models", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
