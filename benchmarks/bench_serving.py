"""Serving every model: ``InferenceSession`` (packed C++ for MMoE/OMoE/Shared-Bottom, the traced graph on
onnxruntime for the others) against the model's own forward under ``torch.inference_mode``.

    python benchmarks/bench_serving.py [--models ple,cgc] [--batches 1,64,1024] [--threads 2]

Interleaved passes, medians, one process; raise this process's priority to steady the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import warnings
from pathlib import Path

import torch

import mmoe_fast as mf
from mmoe_fast.features import Categorical, Dense, Multi
from mmoe_fast.inference import _Lookups
from mmoe_fast.models import MODELS, build_model
from mmoe_fast.timing import conditions, format_ratio, format_time, interleaved, raise_priority, write_section


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,64,1024")
    parser.add_argument("--d", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.2)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--column-models", default="mmoe,ple", help="models built on feature columns to time")
    parser.add_argument("--write", default=None, help="also write the table into this markdown file's section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    raise_priority()
    warnings.filterwarnings("ignore")
    lines = [f"{args.threads} threads, torch {torch.__version__}, {conditions()}; D={args.d}, T=2, each model's "
             f"defaults; best of {args.passes} interleaved passes' medians\n",
             "| model | session backend | B | forward (inference_mode) | session | forward / session |\n"
             "|---|---|---|---:|---:|---:|"]
    print("\n".join(lines))
    for name in args.models.split(","):
        types = ("binary", "binary")
        torch.manual_seed(0)
        model = build_model(name, args.d, 2, task_types=types).eval()
        session = mf.InferenceSession(model)
        for B in (int(b) for b in args.batches.split(",")):
            x = torch.randn(B, args.d)

            def forward(model=model, x=x):
                with torch.inference_mode():
                    model(x)

            t = interleaved({"forward": forward, "session": lambda session=session, x=x: session.run(x)},
                            passes=args.passes, min_time=args.min_time)
            a, b = t["forward"].best, t["session"].best
            lines.append(f"| {name} | {session.backend} | {B} | {format_time(a)} | {format_time(b)} | "
                         f"{format_ratio(a, b)} |")
            print(lines[-1])
    lines += _columns(args)
    if args.write:
        command = "python benchmarks/bench_serving.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
        write_section(Path(args.write), "bench_serving", f"## CPU: serving every model (bench_serving.py, "
                      f"{datetime.date.today()})\n\nCommand: `{command}`  \n" + "\n".join(lines) + "\n")
    return 0


def _columns(args) -> list[str]:
    """Models on feature columns (two ids, a history of 5 ids sharing a table, a number): the lookups alone
    (the encoder against the session's) and the whole model against its session."""
    columns = [Categorical("user", 500, 8), Categorical("item", 300, 8), Multi("history", 300, 8, table="item"),
               Dense("price", 1, 30.0, 10.0)]
    lines = ["", "Models on feature columns (user and item ids, a history of 5 item ids, a price):", "",
             "| model | B | encoder | session's lookups | forward (inference_mode) | session | forward / session |",
             "|---|---|---:|---:|---:|---:|---:|"]
    print("\n".join(lines))
    for name in args.column_models.split(","):
        torch.manual_seed(0)
        model = build_model(name, columns, 2, task_types=("binary", "binary")).eval()
        session = mf.InferenceSession(model)
        lookups = _Lookups(model.encoder)
        for B in (int(b) for b in args.batches.split(",")):
            g = torch.Generator().manual_seed(B)
            batch = {"user": torch.randint(0, 500, (B,), generator=g),
                     "item": torch.randint(0, 300, (B,), generator=g),
                     "history": torch.randint(-1, 300, (B, 5), generator=g),
                     "price": 30 + 10 * torch.randn(B, generator=g)}

            def under_inference(fn, batch=batch):
                def run():
                    with torch.inference_mode():
                        fn(batch)
                return run

            t = interleaved({"encoder": under_inference(model.encoder), "lookups": lambda b=batch, f=lookups: f(b),
                             "forward": under_inference(model), "session": lambda b=batch, s=session: s.run(b)},
                            passes=args.passes, min_time=args.min_time)
            e, lk, a, b = (t[k].best for k in ("encoder", "lookups", "forward", "session"))
            lines.append(f"| {name} ({session.backend}) | {B} | {format_time(e)} | {format_time(lk)} | "
                         f"{format_time(a)} | {format_time(b)} | {format_ratio(a, b)} |")
            print(lines[-1])
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
