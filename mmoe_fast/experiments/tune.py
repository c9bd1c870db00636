"""``tune``: a grid over experts x hidden units per expert x learning rate, selected on the main task."""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..checkpoint import save
from ..data import load_splits
from .census import census_data_spec
from .common import fmt, main_score, markdown_table, output_dir, text_color, train_run, write_outputs
from .synthetic import synthetic_data_spec


def tune(args: argparse.Namespace) -> int:
    """``tune``: every (experts, hidden units, lr) within ``--max-units``, selected on the main task's validation."""
    out = output_dir(args, "results/tune")
    spec = census_data_spec(args) if args.data == "census" else synthetic_data_spec(args, args.correlation, args.seed)
    splits = load_splits(spec)  # missing data: FileNotFoundError saying what to run, reported by the CLI
    main = splits["task_names"][0]
    grid = [(e, h, lr) for e in args.experts for h in args.expert_hidden for lr in args.lr if e * h <= args.max_units]
    skipped = [(e, h) for e in args.experts for h in args.expert_hidden if e * h > args.max_units]
    if skipped:
        print(f"skipped (more than {args.max_units} expert units): {skipped}")
    if not grid:
        raise ValueError(f"no configuration within --max-units {args.max_units}")
    runs, best, start = [], None, time.perf_counter()
    for i, (e, h, lr) in enumerate(grid, 1):
        kwargs = {"num_experts": e, "expert_hidden": h}
        model, rec = train_run(args.model, splits, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                               lr=lr, progress=args.progress, model_kwargs=kwargs)
        rec.update(num_experts=e, expert_hidden=h, lr=lr, score=main_score(rec["val"][0]))
        runs.append(rec)
        print(f"[{i}/{len(grid)}] experts={e} hidden={h} lr={lr}: {main} validation score {rec['score']:.4f} "
              f"({rec['seconds']:.1f} s)", flush=True)
        if best is None or rec["score"] > best["score"]:
            best = rec
            save(model, out / "best.pt", data=spec)
    seconds = time.perf_counter() - start

    metric = "AUC" if splits["task_types"][0] == "binary" else "MSE"

    def shown(metrics):
        return fmt(metrics["auc"] if "auc" in metrics else metrics["mse"])

    rows = []
    for r in sorted(runs, key=lambda r: -r["score"]):
        rows.append(["**best**" if r is best else "", r["num_experts"], r["expert_hidden"], r["lr"],
                     shown(r["val"][0]), shown(r["test"][0]) if "test" in r else "",
                     shown(r["test"][1]) if "test" in r else ""])
    table = (f"{args.model} on {args.data}: {len(grid)} configurations (experts x hidden units <= {args.max_units}), "
             f"{args.epochs} epochs each, selected on {main} validation {metric}:\n\n"
             + markdown_table(["", "experts", "hidden/expert", "lr", f"{main} val {metric}", f"{main} test {metric}",
                               f"{splits['task_names'][1]} test {metric}"], rows))
    table += f"\n{len(runs)} runs in {seconds:.0f} s; best model saved to {out / 'best.pt'}.\n"

    def draw(plt):
        # Best score over learning rates for each (experts, hidden) cell.
        grid_scores = np.full((len(args.experts), len(args.expert_hidden)), np.nan)
        for r in runs:
            i, j = args.experts.index(r["num_experts"]), args.expert_hidden.index(r["expert_hidden"])
            value = r["score"] if metric == "AUC" else -r["score"]
            better = max if metric == "AUC" else min
            grid_scores[i, j] = value if np.isnan(grid_scores[i, j]) else better(grid_scores[i, j], value)
        fig, ax = plt.subplots(figsize=(1.2 * len(args.expert_hidden) + 2.5, 0.8 * len(args.experts) + 1.5))
        im = ax.imshow(grid_scores, cmap="viridis" if metric == "AUC" else "viridis_r")
        for (i, j), v in np.ndenumerate(grid_scores):
            ax.text(j, i, fmt(v), ha="center", va="center", color=text_color(im, v), fontsize=8)
        ax.set_xticks(range(len(args.expert_hidden)), args.expert_hidden)
        ax.set_yticks(range(len(args.experts)), args.experts)
        ax.set_xlabel("hidden units per expert")
        ax.set_ylabel("experts")
        ax.set_title(f"{main} validation {metric} (best over lr)", fontsize=9)
        fig.colorbar(im, ax=ax)
        return fig

    result = {"command": "tune", "settings": {"model": args.model, "data": spec, "experts": args.experts,
              "expert_hidden": args.expert_hidden, "lr": args.lr, "max_units": args.max_units,
              "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed},
              "best": {k: best[k] for k in ("num_experts", "expert_hidden", "lr", "score", "val")} | (
                  {"test": best["test"]} if "test" in best else {}),
              "runs": runs, "seconds": seconds}
    write_outputs(out, result, table, draw)
    return 0
