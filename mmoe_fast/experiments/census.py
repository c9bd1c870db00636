"""``reproduce census``: the paper's census-income Tables 1 and 2 (test AUC of the best run and the mean)."""

from __future__ import annotations

import argparse
import time

import torch

from ..checkpoint import save
from ..data import census_spec, load_splits
from ..data.census import VOCAB
from ..features import num_rows
from .common import (
    fmt,
    main_score,
    markdown_table,
    mean_std,
    output_dir,
    paired,
    train_run,
    train_runs,
    write_outputs,
)

# Main-task test AUC of the paper's MMoE on census-income (best run, mean over runs), from its Tables 1 and 2.
PAPER_CENSUS_MAIN_AUC = {1: {"mmoe": (0.9410, 0.9359)}, 2: {"mmoe": (0.8860, 0.8826)}}
# The paper's seven methods of Tables 1 and 2, MMoE first (the others are compared with it, paired by seed).
DEFAULT_CENSUS_MODELS = ("mmoe", "omoe", "shared-bottom", "single-task", "l2-constrained", "cross-stitch",
                         "tensor-factorization")


def census_data_spec(args: argparse.Namespace) -> dict:
    """The census data the ``--group``, ``--census-path``, ``--split-seed`` and ``--train-rows`` options name."""
    return census_spec(group=args.group, path=args.census_path, split_seed=args.split_seed,
                       train_rows=args.train_rows, encoding=args.encoding, embedding_dim=args.embedding_dim)


PILOT_SEED_OFFSET = 10_000  # the pilots' initialization seed, past any study run's


def census_learning_rates(args: argparse.Namespace, splits: dict) -> tuple[dict[str, float], list[dict]]:
    """``({model: lr}, pilot runs)``: with ``--lr-grid``, each method's rate is the grid value whose pilot run (one
    per value, on a seed no study run uses) has the best main-task validation AUC: every method gets the same
    tuning budget. Without it, ``--lr`` for every method."""
    if args.lr_grid is None:
        return {name: args.lr for name in args.models}, []
    seed = args.seed + PILOT_SEED_OFFSET
    chosen, pilots = {}, []
    for name in args.models:
        for (_, rec), lr in zip(_runs(name, splits, [(seed, lr) for lr in args.lr_grid], args), args.lr_grid):
            pilots.append({"model": name, "lr": lr, "seed": seed, "val": rec["val"],
                           "score": main_score(rec["val"][0])})
            print(f"pilot {name} lr={lr:g}: main validation AUC {fmt(rec['val'][0]['auc'])}", flush=True)
        chosen[name] = max((r for r in pilots if r["model"] == name), key=lambda r: r["score"])["lr"]
    print("learning rates: " + ", ".join(f"{n} {lr:g}" for n, lr in chosen.items()), flush=True)
    return chosen, pilots


def _runs(name: str, splits: dict, runs: list[tuple[int, float]], args: argparse.Namespace,
          on_done=None) -> list[tuple]:
    """``(model, record)`` of ``name`` trained once per ``(seed, lr)`` of ``runs``: as one ``fit_many`` job where
    the inputs are one tensor (MMoE, OMoE, Shared-Bottom, Single-Task and L2-Constrained then train packed, about
    2x faster a run here than vmapped or one by one), else run by run (feature columns). A diverged run is an
    error naming it, as ``fit``'s."""
    if isinstance(splits["x_train"], dict):
        done = []
        for seed, lr in runs:
            done.append(train_run(name, splits, seed=seed, epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                                  progress=args.progress))
            if on_done is not None:
                on_done(len(done) - 1, done[-1][1])
        return done
    done = train_runs(name, [(splits, seed, lr) for seed, lr in runs], epochs=args.epochs,
                      batch_size=args.batch_size, progress=args.progress, on_done=on_done)
    for _, rec in done:
        if rec["error"]:
            raise FloatingPointError(f"{name} seed={rec['seed']}: {rec['error']}")
    return done


def census_claim(summary: dict, base: str, main: str) -> dict:
    """The paper's claim for Tables 1 and 2 (``base``, MMoE, has the best main-task AUC of the methods), judged on
    the mean paired differences to ``base``: a method is below, level with (within two standard errors) or above
    it; held when every other method is below. ``{"held": bool or None (no method to compare, or too few pairs
    for a standard error), "below"/"level"/"above": names, "text": one line}``."""
    groups: dict[str, list[str]] = {"below": [], "level": [], "above": [], "undecided": []}
    for name, entry in summary.items():
        if name == base:
            continue
        diff, se = entry[f"{main}_minus_{base}"], entry[f"{main}_minus_{base}_se"]
        key = ("undecided" if not se == se else "below" if diff < -2 * se else "above" if diff > 2 * se
               else "level")
        groups[key].append(name)
    compared = any(groups[k] for k in ("below", "level", "above"))
    held = None if groups["undecided"] or not compared else not (groups["level"] or groups["above"])
    verdict = {True: "held", False: "not held", None: "undecided (too few paired runs)"}[held]
    said = {"below": f"below {base}", "level": f"level with {base}", "above": f"above {base}",
            "undecided": "one pair only"}
    parts = [f"{said[k]}: {', '.join(v)}" for k, v in groups.items() if v]
    text = (f"Paper's claim ({base} has the best {main} AUC of the methods), by the mean paired difference and two "
            f"standard errors: {verdict}" + (f" ({'; '.join(parts)})" if parts else "") + ".")
    return {"held": held, **groups, "text": text}


def reproduce_census(args: argparse.Namespace) -> int:
    """``reproduce census`` (Tables 1 and 2): test AUCs per model, beside the paper's MMoE."""
    out = output_dir(args, f"results/census-group{args.group}")
    spec = census_data_spec(args)
    splits = load_splits(spec)  # missing data: FileNotFoundError saying what to run, reported by the CLI
    main, aux = splits["task_names"]
    columns = splits.get("columns")
    if args.threads is None and isinstance(splits["x_train"], dict):
        torch.set_num_threads(1)  # feature columns train run by run with fit: fastest on one thread (see --threads)
    width = "vocabulary" if args.embedding_dim == VOCAB else args.embedding_dim
    inputs = (f"{splits['x_train'].shape[1]} features (one-hot)" if columns is None else
              f"{len(columns)} columns ({len(columns) - 1} categorical as {width}-wide embeddings)")
    print(f"census group {args.group}: {num_rows(splits['x_train'])} train / {num_rows(splits['x_val'])} validation / "
          f"{num_rows(splits['x_test'])} test rows, {inputs}; tasks {main} (main), {aux}")
    seeds = list(range(args.seed, args.seed + args.runs))
    start = time.perf_counter()
    lrs, pilots = census_learning_rates(args, splits)
    runs = []

    def report(_, rec):
        runs.append(rec)
        print(f"[{len(runs)}/{len(seeds) * len(args.models)}] {rec['model']} seed={rec['seed']}: val AUC "
              f"{fmt(rec['val'][0]['auc'])}/{fmt(rec['val'][1]['auc'])}, test AUC "
              f"{fmt(rec['test'][0]['auc'])}/{fmt(rec['test'][1]['auc'])} ({rec['seconds']:.1f} s)", flush=True)

    for name in args.models:
        done = _runs(name, splits, [(seed, lrs[name]) for seed in seeds], args, on_done=report)
        model, _ = max(done, key=lambda d: main_score(d[1]["val"][0]))  # the first of equals, as before
        save(model, out / f"best_{name}.pt", data=spec)
    seconds = time.perf_counter() - start

    rows, summary = [], {}
    base = args.models[0]

    def by_seed(name):
        return {r["seed"]: r["test"][0]["auc"] for r in runs if r["model"] == name}

    for name in args.models:
        mine = [r for r in runs if r["model"] == name]
        best = max(mine, key=lambda r: main_score(r["val"][0]))
        entry = {"runs": len(mine), "best_seed": best["seed"]}
        for t, task in enumerate((main, aux)):
            entry[f"{task}_best"] = best["test"][t]["auc"]
            entry[f"{task}_mean"], entry[f"{task}_std"] = mean_std([r["test"][t]["auc"] for r in mine])
        diff, se, pairs = paired(by_seed(name), by_seed(base))
        entry.update({f"{main}_minus_{base}": diff, f"{main}_minus_{base}_se": se, "pairs": pairs})
        summary[name] = entry
        paper = PAPER_CENSUS_MAIN_AUC[args.group].get(name)
        rows.append([name, len(mine), fmt(entry[f"{main}_best"]), fmt(entry[f"{main}_mean"]),
                     "" if name == base else f"{diff:+.4f} ± {fmt(se)}",
                     fmt(entry[f"{aux}_best"]), fmt(entry[f"{aux}_mean"]),
                     f"{paper[0]:.4f} / {paper[1]:.4f}" if paper else ""])
    table = (f"Census-income group {args.group}: test AUC of the best run (by {main} validation AUC) and the mean "
             f"over runs; the mean paired difference to {base} (same seeds) ± its standard error (> 0: better "
             f"than {base}); {args.epochs} epochs of {num_rows(splits['x_train'])} rows per run, {inputs}, "
             + (f"lr {args.lr:g}" if args.lr_grid is None else "lr per method from a pilot run per value of "
                + ", ".join(f"{v:g}" for v in args.lr_grid) + " (by main validation AUC): "
                + ", ".join(f"{n} {lr:g}" for n, lr in lrs.items())) + ":\n\n"
             + markdown_table(["model", "runs", f"{main} best", f"{main} mean", f"{main} vs {base}", f"{aux} best",
                               f"{aux} mean", f"paper {main} best / mean"], rows))
    claim = census_claim(summary, base, main)
    counts = f"{len(runs)} runs{f' and {len(pilots)} pilots' if pilots else ''}"
    table += f"\n{claim['text']}\n\n{counts} in {seconds:.0f} s.\n"

    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, (t, task) in zip(axes, enumerate((main, aux))):
            for k, name in enumerate(args.models):
                aucs = [r["test"][t]["auc"] for r in runs if r["model"] == name]
                ax.scatter([k] * len(aucs), aucs, alpha=0.6)
                ax.scatter([k], [summary[name][f"{task}_best"]], marker="*", s=120, color="black")
            ax.set_xticks(range(len(args.models)), args.models, rotation=20)
            ax.set_title(f"{task}: test AUC per run (star: best by validation)", fontsize=9)
        fig.tight_layout()
        return fig

    result = {"command": "reproduce census", "settings": {"group": args.group, "models": args.models,
              "epochs": args.epochs, "batch_size": args.batch_size, "learning_rates": lrs, "lr_grid": args.lr_grid,
              "seeds": seeds,
              "train_rows": num_rows(splits["x_train"]), "split_seed": args.split_seed,
              "encoding": args.encoding, "embedding_dim": args.embedding_dim if columns is not None else None},
              "paper_main_auc": PAPER_CENSUS_MAIN_AUC[args.group], "summary": summary, "runs": runs,
              "pilots": pilots, "claim": claim, "seconds": seconds}
    write_outputs(out, result, table, draw)
    return 0
