"""``reproduce correlation`` (the paper's Figure 4), ``shared-bottom`` (Figure 3), ``trainability`` (Figure 5) and
``labels`` (Figure 2), on synthetic data."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..checkpoint import save
from ..data import load_splits, synthetic_spec
from ..data.synthetic import make_synthetic
from .common import (
    RUNS_AT_ONCE,
    fmt,
    markdown_table,
    mean_loss,
    mean_se,
    mean_std,
    output_dir,
    paired,
    train_runs,
    write_outputs,
)

DEFAULT_SYNTHETIC_MODELS = ("mmoe", "omoe", "shared-bottom")
PILOT_SEED_OFFSET = 10_000  # the pilot's data and initialization seed, past any study run's


def synthetic_data_spec(args: argparse.Namespace, correlation: float, seed: int) -> dict:
    """The data of one run: ``--data-seed`` when given (one data set for all runs), else the run's ``seed``."""
    return synthetic_spec(correlation=correlation, d=args.d, n_train=args.n_train, n_val=args.n_val,
                          seed=seed if args.data_seed is None else args.data_seed,
                          task_seed=getattr(args, "task_seed", None))


def pilot_learning_rates(args: argparse.Namespace) -> tuple[dict[str, float], list[dict]]:
    """``({model: lr}, pilot runs)``: each model's learning rate, the one of ``args.lr_grid`` whose pilot run
    ends with the lowest validation loss. The pilot runs at the middle correlation of ``args.p`` on a seed no
    study run uses (``args.seed + PILOT_SEED_OFFSET``), so the choice is not made on the runs it is judged by;
    a run that diverges counts as infinitely bad. ``--lr`` fixes every model's rate and skips the pilot."""
    if args.lr is not None:
        return {name: args.lr for name in args.models}, []
    p = sorted(args.p)[len(args.p) // 2]
    seed = args.seed + PILOT_SEED_OFFSET
    # Its own data too, even under --data-seed (the study's one data set).
    splits = load_splits(synthetic_spec(correlation=p, d=args.d, n_train=args.n_train, n_val=args.n_val, seed=seed,
                                        task_seed=getattr(args, "task_seed", None)))
    chosen, pilots = {}, []
    for name in args.models:
        done = train_runs(name, [(splits, seed, lr) for lr in args.lr_grid], epochs=args.epochs,
                          batch_size=args.batch_size, progress=False)
        for lr, (_, rec) in zip(args.lr_grid, done):
            loss = final_loss(rec)  # a run that diverged: infinitely bad
            pilots.append({"model": name, "lr": lr, "correlation": p, "seed": seed, "final_val_loss": loss})
            print(f"pilot {name} lr={lr:g} p={p}: val loss {loss:.4f}", flush=True)
        tried = [r for r in pilots if r["model"] == name]
        chosen[name] = min(tried, key=lambda r: r["final_val_loss"])["lr"]
    print("learning rates: " + ", ".join(f"{n} {lr:g}" for n, lr in chosen.items()), flush=True)
    return chosen, pilots


def tasks_text(args: argparse.Namespace) -> str:
    return ("alpha, beta redrawn with each run's data" if getattr(args, "task_seed", None) is None
            else f"alpha, beta fixed by task seed {args.task_seed}")


def learning_rate_text(args: argparse.Namespace, lrs: dict[str, float]) -> str:
    if args.lr is not None:
        return f"lr {args.lr:g} for every model"
    return (f"lr per model from a pilot over {', '.join(f'{v:g}' for v in args.lr_grid)}: "
            + ", ".join(f"{n} {lr:g}" for n, lr in lrs.items()))


def synthetic_runs(args: argparse.Namespace, correlations: Sequence[float], seeds: Sequence[int],
                   save_first: Path | None, lrs: dict[str, float]) -> list[dict]:
    """One run of every ``args.models`` per correlation and seed, at the model's ``lrs``; with ``save_first``,
    the first seed's models are saved there as ``<model>_p<p>.pt``."""
    total = len(args.models) * len(correlations) * len(seeds)
    cells = [(p, seed) for p in correlations for seed in seeds]
    specs = {cell: synthetic_data_spec(args, *cell) for cell in cells}
    runs = []
    # RUNS_AT_ONCE cells at a time, every model on them, so that only their data sets are in memory (a --full
    # study has a thousand); under --data-seed every cell of a p shares one data set.
    for first in range(0, len(cells), RUNS_AT_ONCE):
        part = cells[first : first + RUNS_AT_ONCE]
        loaded: dict[str, dict] = {}
        splits = {}
        for cell in part:
            key = repr(sorted(specs[cell].items()))
            if key not in loaded:
                loaded[key] = load_splits(specs[cell])
            splits[cell] = loaded[key]
        for name in args.models:

            def report(i, rec, name=name, part=part):
                p, seed = part[i]
                rec.update(correlation=p, lr=lrs[name], final_train_loss=final_loss(rec, "train_loss"),
                           final_val_loss=final_loss(rec))
                runs.append(rec)
                state = f"DIVERGED ({rec['error']})" if rec["error"] else (
                    f"train loss {rec['final_train_loss']:.4f}, val loss {rec['final_val_loss']:.4f}")
                print(f"[{len(runs)}/{total}] {name} p={p} seed={seed}: {state} ({rec['seconds']:.2f} s)",
                      flush=True)

            done = train_runs(name, [(splits[cell], cell[1], lrs[name]) for cell in part], epochs=args.epochs,
                              batch_size=args.batch_size, progress=args.progress, on_done=report)
            if save_first is not None:
                for (p, seed), (model, _) in zip(part, done):
                    if seed == seeds[0]:
                        save(model, save_first / f"{name}_p{p}.pt", data=specs[(p, seed)])
    return runs


def diverged_text(runs: list[dict]) -> str:
    """A line naming the runs that diverged (their loss counts as infinite), or nothing."""
    bad = [r for r in runs if r.get("error")]
    if not bad:
        return ""
    names = ", ".join(f"{r['model']} p={r['correlation']} seed={r['seed']}" for r in bad[:10])
    return f"\n{len(bad)} run(s) diverged, counted as an infinite loss: {names}{' ...' if len(bad) > 10 else ''}.\n"


def final_loss(rec: dict, key: str = "val_loss") -> float:
    """The mean over tasks of a run's last ``key``; infinite for a run that diverged (it has no last epoch)."""
    if rec.get("error") or not rec["history"]:
        return float("inf")
    loss = mean_loss(rec["history"][-1][key])
    return loss if np.isfinite(loss) else float("inf")


def synthetic_settings(args: argparse.Namespace) -> dict:
    """The options of a synthetic study, for its ``result.json``."""
    return {k: getattr(args, k, None) for k in ("models", "d", "n_train", "n_val", "data_seed", "task_seed", "epochs",
                                                "batch_size", "lr", "lr_grid")}


def plot_curve(ax, runs: list[dict], label: str) -> None:
    """The mean validation-loss curve of ``runs`` (those that did not diverge: theirs end early) against steps,
    with a band of one standard error."""
    complete = [r for r in runs if not r.get("error")]
    if not complete:
        return
    curves = np.array([[mean_loss(h["val_loss"]) for h in r["history"]] for r in complete])
    mean = curves.mean(axis=0)
    se = curves.std(axis=0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else 0 * mean
    steps = [h["step"] for h in complete[0]["history"]]
    ax.plot(steps, mean, label=label)
    ax.fill_between(steps, mean - se, mean + se, alpha=0.25)


def write_study(out: Path, command: str, args: argparse.Namespace, seeds, lrs, summary, runs, pilots, seconds,
                table: str, draw) -> int:
    """A synthetic study's result.json (settings, summary, every run and pilot), table.md and plot.png."""
    result = {"command": command, "settings": {**synthetic_settings(args), "p": args.p, "seeds": seeds,
              "learning_rates": lrs}, "summary": summary, "runs": runs, "pilots": pilots, "seconds": seconds}
    write_outputs(out, result, table, draw)
    return 0


def correlation_verdict(args: argparse.Namespace, pick, summary: dict) -> str:
    """The paper's Figure 4 claim beside what these runs show: each model's change of validation loss from the
    most correlated tasks to the least related (the p nearest 0), paired by seed, and whether the claim held
    (MMoE's change smaller than every other model's, each of which is more than two standard errors above zero)."""
    hi, lo = max(args.p), min(args.p, key=abs)  # the most correlated tasks, and the least related
    if hi == lo:
        return ""
    changes = {}
    for name in args.models:
        at = {p: {r["seed"]: r["final_val_loss"] for r in pick(name, p)} for p in (hi, lo)}
        changes[name] = paired(at[lo], at[hi])
        summary[f"{name}@{lo}"][f"val_loss_change_from_p{hi}"] = changes[name][0]
        summary[f"{name}@{lo}"][f"val_loss_change_from_p{hi}_se"] = changes[name][1]
    text = (f"\nChange of validation loss from p = {hi} to p = {lo} (paired by seed, ± SE): "
            + ", ".join(f"{n} {d:+.4f} ± {fmt(se)}" for n, (d, se, _) in changes.items()) + ".\n")
    others = [n for n in args.models if n != "mmoe"]
    if "mmoe" in changes and others:
        if any(np.isnan(changes[n][1]) for n in changes):
            verdict = "undetermined (fewer than two paired seeds: no standard error)"
        else:
            held = all(changes[n][0] > max(changes["mmoe"][0], 2 * changes[n][1]) for n in others)
            verdict = "held" if held else "not held"
        text += (f"Paper (Figure 4): MMoE's loss barely changes as the tasks' correlation falls, while OMoE's and "
                 f"Shared-Bottom's grow. Here: {verdict} (criterion: every other model's "
                 f"change above MMoE's and above twice its standard error), in this regime ({args.epochs} epochs, "
                 f"{args.n_train} rows, the learning rates above).\n")
    return text


def reproduce_correlation(args: argparse.Namespace) -> int:
    """``reproduce correlation`` (Figure 4): final held-out loss per model and task correlation, with paired
    differences to the first model."""
    out = output_dir(args, "results/correlation")
    seeds = list(range(args.seed, args.seed + args.seeds))
    start = time.perf_counter()
    lrs, pilots = pilot_learning_rates(args)
    runs = synthetic_runs(args, args.p, seeds, save_first=out, lrs=lrs)
    seconds = time.perf_counter() - start

    def pick(name, p):
        return [r for r in runs if r["model"] == name and r["correlation"] == p]

    # Held-out loss, the runs paired by seed (same data, same initialization seed) against the first model.
    base = args.models[0]

    def by_seed(name, p, key="final_val_loss"):
        return {r["seed"]: r[key] for r in pick(name, p)}

    rows, summary = [], {}
    for name in args.models:
        cells = []
        for p in args.p:
            va, va_se = mean_se([r["final_val_loss"] for r in pick(name, p)])
            tr, tr_std = mean_std([r["final_train_loss"] for r in pick(name, p)])
            diff, diff_se, pairs = paired(by_seed(name, p), by_seed(base, p))
            summary[f"{name}@{p}"] = {"val_loss_mean": va, "val_loss_se": va_se, "train_loss_mean": tr,
                                      "train_loss_std": tr_std, f"val_loss_minus_{base}": diff,
                                      f"val_loss_minus_{base}_se": diff_se, "pairs": pairs}
            cell = f"{fmt(va)} ± {fmt(va_se)}"
            if name != base:
                cell += f" (vs {base}: {diff:+.4f} ± {fmt(diff_se)})"
            cells.append(cell)
        rows.append([name, *cells])
    tasks = tasks_text(args)
    table = (f"Final validation loss (mean over tasks; mean ± standard error over {len(seeds)} seeds; in brackets "
             f"the mean paired difference to {base} over the same seeds ± its standard error: > 0 is worse than "
             f"{base}), {args.epochs} epochs of {args.n_train} rows, {tasks}, {learning_rate_text(args, lrs)}:\n\n"
             + markdown_table(["model", *[f"p = {p}" for p in args.p]], rows))
    table += correlation_verdict(args, pick, summary)
    table += diverged_text(runs) + f"\n{len(runs)} runs in {seconds:.0f} s.\n"

    def draw(plt):
        fig, axes = plt.subplots(1, len(args.p), figsize=(4 * len(args.p), 3.2), squeeze=False, sharey=True)
        for ax, p in zip(axes[0], args.p):
            for name in args.models:
                plot_curve(ax, pick(name, p), name)
            ax.set_title(f"correlation p = {p}")
            ax.set_xlabel("training step (validation after each epoch)")
        axes[0][0].set_ylabel(f"validation loss (mean ± SE, {len(seeds)} seeds)")
        axes[0][-1].legend()
        return fig

    return write_study(out, "reproduce correlation", args, seeds, lrs, summary, runs, pilots, seconds, table, draw)


def reproduce_shared_bottom(args: argparse.Namespace) -> int:
    """``reproduce shared-bottom`` (Figure 3): Shared-Bottom's held-out loss curves at each task correlation, and
    its final loss's change from the most correlated tasks, paired by seed."""
    out = output_dir(args, "results/shared-bottom")
    args.models = ["shared-bottom"]
    seeds = list(range(args.seed, args.seed + args.seeds))
    start = time.perf_counter()
    lrs, pilots = pilot_learning_rates(args)
    runs = synthetic_runs(args, args.p, seeds, save_first=out, lrs=lrs)
    seconds = time.perf_counter() - start
    hi = max(args.p)

    def at(p):
        return {r["seed"]: r["final_val_loss"] for r in runs if r["correlation"] == p}

    rows, summary = [], {}
    for p in args.p:
        mean, se = mean_se(list(at(p).values()))
        diff, diff_se, pairs = paired(at(p), at(hi))
        summary[str(p)] = {"val_loss_mean": mean, "val_loss_se": se, f"val_loss_minus_p{hi}": diff,
                           f"val_loss_minus_p{hi}_se": diff_se, "pairs": pairs}
        rows.append([p, f"{fmt(mean)} ± {fmt(se)}", "" if p == hi else f"{diff:+.4f} ± {fmt(diff_se)}"])
    paper = [p for p in (1.0, 0.9, 0.5) if p in args.p]
    text = ""
    if len(paper) >= 2:  # the paper's claim over its own correlations: the loss grows as the correlation falls
        steps = list(zip(paper, paper[1:]))
        grows = [paired(at(b), at(a)) for a, b in steps]
        if any(np.isnan(se) for _, se, _ in grows):
            verdict = "undetermined (fewer than two paired seeds: no standard error)"
        else:
            verdict = "held" if all(d > 2 * se for d, se, _ in grows) else "not held"
        text = ("\nPaper (Figure 3): Shared-Bottom does worse as the tasks' correlation falls ("
                + " -> ".join(f"p = {p}" for p in paper) + "). Here: " + verdict + " (criterion: each step's paired "
                "change above twice its standard error: " + ", ".join(
                    f"{a} -> {b}: {d:+.4f} ± {fmt(se)}" for (a, b), (d, se, _) in zip(steps, grows)) + ").\n")
    table = (f"Shared-Bottom's final validation loss (mean over tasks; mean ± standard error over {len(seeds)} seeds) "
             f"and its paired difference to p = {hi} (same seeds), {args.epochs} epochs of {args.n_train} rows, "
             f"{tasks_text(args)}, {learning_rate_text(args, lrs)}:\n\n"
             + markdown_table(["p", "validation loss", f"vs p = {hi}"], rows) + text
             + diverged_text(runs) + f"\n{len(runs)} runs in {seconds:.0f} s.\n")

    def draw(plt):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for p in args.p:
            plot_curve(ax, [r for r in runs if r["correlation"] == p], f"p = {p}")
        ax.set_xlabel("training step (validation after each epoch)")
        ax.set_ylabel(f"validation loss (mean ± SE, {len(seeds)} seeds)")
        ax.set_title("Shared-Bottom at each task correlation", fontsize=9)
        ax.legend()
        fig.tight_layout()
        return fig

    return write_study(out, "reproduce shared-bottom", args, seeds, lrs, summary, runs, pilots, seconds, table, draw)


def reproduce_trainability(args: argparse.Namespace) -> int:
    """``reproduce trainability`` (Figure 5): the spread of final validation losses over seeded runs."""
    out = output_dir(args, "results/trainability")
    seeds = list(range(args.seed, args.seed + args.runs))
    start = time.perf_counter()
    lrs, pilots = pilot_learning_rates(args)
    runs = synthetic_runs(args, args.p, seeds, save_first=None, lrs=lrs)
    seconds = time.perf_counter() - start

    def losses(name, p):
        return np.array([r["final_val_loss"] for r in runs if r["model"] == name and r["correlation"] == p])

    rows, summary = [], {}
    for p in args.p:
        for name in args.models:
            v = losses(name, p)
            stats = {"runs": len(v), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
                     "median": float(np.median(v)), "max": float(v.max())}
            summary[f"{name}@{p}"] = stats
            rows.append([p, name, stats["runs"], *(fmt(stats[k]) for k in ("mean", "std", "min", "median", "max"))])
    varies = "initialization varies" if args.data_seed is not None else "data and initialization vary"
    table = (f"Final validation loss (mean over tasks) over seeded runs ({varies} with the seed), "
             f"{args.epochs} epochs of {args.n_train} rows, {tasks_text(args)}, {learning_rate_text(args, lrs)}:\n\n"
             + markdown_table(["p", "model", "runs", "mean", "std", "min", "median", "max"], rows))
    table += diverged_text(runs) + f"\n{len(runs)} runs in {seconds:.0f} s.\n"

    def draw(plt):
        fig, axes = plt.subplots(len(args.p), len(args.models), figsize=(3.2 * len(args.models), 2.6 * len(args.p)),
                                 squeeze=False)
        for i, p in enumerate(args.p):
            everything = np.concatenate([losses(name, p) for name in args.models])
            everything = everything[np.isfinite(everything)]  # a diverged run is counted in the table
            bins = np.linspace(everything.min(), everything.max() + 1e-12, 21) if len(everything) else 20
            for j, name in enumerate(args.models):
                v = losses(name, p)
                axes[i][j].hist(v[np.isfinite(v)], bins=bins)
                axes[i][j].set_title(f"{name}, p = {p}", fontsize=9)
                axes[i][j].set_xlabel("final validation loss", fontsize=8)
        fig.tight_layout()
        return fig

    return write_study(out, "reproduce trainability", args, seeds, lrs, summary, runs, pilots, seconds, table, draw)


def reproduce_labels(args: argparse.Namespace) -> int:
    """``reproduce labels`` (Figure 2): the Pearson correlation of the two tasks' labels against the cosine p of
    their weight vectors, over seeded data sets per p (no training)."""
    out = output_dir(args, "results/labels")
    seeds = list(range(args.seed, args.seed + args.seeds))
    start = time.perf_counter()
    values: dict[float, list[float]] = {}
    for p in args.p:
        for seed in seeds:
            _, y = make_synthetic(args.n_train, d=args.d, correlation=p, seed=seed, task_seed=args.task_seed)
            pair = y.double().numpy()
            values.setdefault(p, []).append(float(np.corrcoef(pair[:, 0], pair[:, 1])[0, 1]))
    seconds = time.perf_counter() - start
    summary = {}
    rows = []
    for p, v in values.items():
        arr = np.array(v)
        summary[str(p)] = {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else float("nan"),
                           "min": float(arr.min()), "max": float(arr.max()), "data_sets": len(arr)}
        s = summary[str(p)]
        rows.append([p, fmt(s["mean"]), fmt(s["std"]), fmt(s["min"]), fmt(s["max"])])
    monotone = all(a["mean"] <= b["mean"] for a, b in zip(list(summary.values()), list(summary.values())[1:])) \
        if list(args.p) == sorted(args.p) else None
    table = (f"Pearson correlation of the two tasks' labels per cosine p of the task weights, over {len(seeds)} data "
             f"sets of {args.n_train} rows each (d = {args.d}, {tasks_text(args)}):\n\n"
             + markdown_table(["p", "mean", "SD", "min", "max"], rows))
    if monotone is not None:
        table += (f"\nPaper (Figure 2): the label correlation rises with p, below it in magnitude (the sine terms "
                  f"decorrelate the labels). Here the mean {'rises' if monotone else 'does not rise'} with p"
                  f"{'' if monotone else ' at every step'}.\n")
    table += f"\n{len(seeds) * len(args.p)} data sets in {seconds:.1f} s.\n"

    def draw(plt):
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        ps = np.array(args.p, dtype=float)
        mean = np.array([summary[str(p)]["mean"] for p in args.p])
        sd = np.nan_to_num(np.array([summary[str(p)]["std"] for p in args.p]))
        ax.errorbar(ps, mean, yerr=2 * sd, fmt="o-", capsize=3, label="label Pearson (mean ± 2 SD)")
        ax.plot([-1, 1], [-1, 1], ":", color="gray", label="y = p")
        ax.set_xlabel("cosine of the task weights, p")
        ax.set_ylabel("Pearson correlation of the labels")
        ax.legend(fontsize=8)
        return fig

    result = {"command": "reproduce labels", "settings": {"p": args.p, "seeds": seeds, "n": args.n_train, "d": args.d,
              "task_seed": args.task_seed}, "summary": summary, "values": {str(p): v for p, v in values.items()},
              "seconds": seconds}
    write_outputs(out, result, table, draw)
    return 0
