"""The ``mmoe-fast`` command: ``train``, ``bench`` and ``backends``."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import backends, bench, experiments, models
from .data import make_synthetic
from .train import fit


def _train(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    x, y = make_synthetic(args.n_train + args.n_val, d=args.d, correlation=args.correlation, seed=args.seed)
    x_tr, y_tr, x_val, y_val = x[: args.n_train], y[: args.n_train], x[args.n_train :], y[args.n_train :]
    task_types = ("regression", "regression")
    if args.model == "shared-bottom":
        model = models.SharedBottom(args.d, 2, bottom_hidden=args.bottom_hidden, task_types=task_types)
    else:
        model = models.MODELS[args.model](args.d, 2, num_experts=args.experts, expert_hidden=args.expert_hidden,
                                          task_types=task_types, backend=args.backend)
    used = "none (no fused op in this model)" if args.model == "shared-bottom" else backends.backend_name(
        backends.resolve(args.backend, torch.device("cpu"), torch.float32))
    print(f"model {args.model}: {models.count_parameters(model)} parameters; backend {used}; "
          f"synthetic data, correlation {args.correlation}, {args.n_train} train / {args.n_val} validation rows")
    start = time.perf_counter()
    fit(model, x_tr, y_tr, x_val=x_val, y_val=y_val, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, progress=not args.no_progress)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmoe-fast", description="Fused MMoE: train, benchmark, inspect backends.")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a multi-task model on the paper's synthetic data")
    tr.add_argument("--data", choices=["synthetic"], default="synthetic")
    tr.add_argument("--correlation", type=float, default=0.5, help="task correlation p in [-1, 1]")
    tr.add_argument("--model", choices=sorted(models.MODELS), default="mmoe")
    tr.add_argument("--backend", default="auto", choices=["auto", *backends.BACKENDS])
    tr.add_argument("--n-train", type=int, default=10000)
    tr.add_argument("--n-val", type=int, default=2000)
    tr.add_argument("--d", type=int, default=100, help="input dimension")
    tr.add_argument("--experts", type=int, default=8)
    tr.add_argument("--expert-hidden", type=int, default=16)
    tr.add_argument("--bottom-hidden", type=int, default=113, help="Shared-Bottom width (size-matched to MMoE)")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--batch-size", type=int, default=128)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_train)

    be = sub.add_parser("bench", help="time every backend against the references", add_help=False)
    be.set_defaults(func=None)

    bk = sub.add_parser("backends", help="list backends, why one cannot run, and what auto picks")
    bk.set_defaults(func=lambda args: print(backends.describe()) or 0)
    experiments.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
