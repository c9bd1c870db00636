"""``gates CHECKPOINT``: how a saved gated model (MMoE, OMoE, CGC, PLE) uses its experts: the mean gate weight
per gate and expert, each gate's mean entropy, and warnings of collapse (a table and a heatmap per gated level)."""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import Tensor, nn

from .. import checkpoint, files
from ..data import load_splits
from ..features import num_rows
from ..gating import gate_tables
from ..models import MMoELayer
from .common import markdown_table, output_dir, text_color, write_outputs


def mean_gate_weights(model: nn.Module, x: Tensor, batch_size: int = 8192) -> Tensor:
    """``[T_gate, E]``: the mean over rows of ``x[N, D]`` of an MMoE's (OMoE's) gate weights (T_gate = 1 for OMoE)."""
    if not isinstance(getattr(model, "mixture", None), MMoELayer):
        raise ValueError(f"{type(model).__name__} has no MMoE gates (expected a `mixture` MMoELayer)")
    names = [f"task{t}" for t in range(model.num_tasks)]
    return gate_tables(model, x, names, batch_size)[0].weights


def gates(args: argparse.Namespace) -> int:
    """``gates CHECKPOINT``: the gate tables of a saved MMoE, OMoE, CGC or PLE on the data it was trained on."""
    out = output_dir(args, "results/gates")
    ckpt = checkpoint.read(args.checkpoint)
    model = checkpoint.model_from(ckpt, args.checkpoint)
    if not isinstance(ckpt.get("data"), dict):
        raise checkpoint.CheckpointError(f"{args.checkpoint} names no data set (save it with data=<a data spec>)")
    spec = dict(ckpt["data"])
    if args.census_path is not None and spec["name"] == "census":
        spec["path"] = args.census_path
    if spec["name"] == "table":  # the rows as training split them, encoded by the schema the model learned
        for path, digest in ((spec["path"], spec.get("sha256")), (spec.get("val_path"), spec.get("val_sha256"))):
            if digest is not None and files.sha256(path) != digest:
                raise ValueError(f"{path} has changed since {args.checkpoint} was trained on it")
        spec["schema"] = ckpt.get("table", spec["schema"])
    splits = load_splits(spec)  # missing data: FileNotFoundError saying what to run, reported by the CLI
    x = splits[f"x_{args.split}"]
    if x is None:
        other = next(k for k in ("val", "train") if splits[f"x_{k}"] is not None)
        raise ValueError(f"the {spec['name']} data set has no {args.split} split; use --split {other}")
    in_features = model.config()["in_features"]
    if isinstance(x, torch.Tensor) and x.shape[1] != in_features:
        raise ValueError(f"the data has {x.shape[1]} features but the checkpoint's model takes "
                         f"{in_features}: give the data it was trained on")
    task_names = list(splits["task_names"])
    if len(task_names) != model.num_tasks:
        task_names = [f"task{t}" for t in range(model.num_tasks)]
    tables = gate_tables(model, x, task_names)
    text = (f"Mean gate weight per gate and expert, and each gate's mean entropy (0: always one expert, 1: uniform "
            f"over the experts it reaches), {ckpt['model']} on {spec['name']} {args.split} ({num_rows(x)} rows), "
            f"checkpoint {args.checkpoint}:\n")
    warnings = []
    for t in tables:
        rows = [[g, *(f"{v:.3f}" for v in w), f"{h:.2f}"] for g, w, h in zip(t.gates, t.weights.tolist(),
                                                                              t.entropy.tolist())]
        text += (f"\n{t.title}" if t.title else "\n") + "\n" * bool(t.title) + markdown_table(
            ["gate", *[f"expert {e}" for e in t.experts], "entropy"], rows)
        warnings += t.warnings()
    text += "".join(f"\nwarning: {w}" for w in warnings) + ("\n" if warnings else "")

    def draw(plt):
        heights = [0.6 * len(t.gates) + 1.2 for t in tables]
        width = max(0.7 * len(t.experts) for t in tables) + 2.5
        fig, axes = plt.subplots(len(tables), 1, figsize=(width, sum(heights)), squeeze=False,
                                 gridspec_kw={"height_ratios": heights})
        for ax, t in zip(axes[:, 0], tables):
            w = t.weights.numpy()
            im = ax.imshow(w, cmap="viridis", vmin=0.0, aspect="auto")
            for (i, j), v in np.ndenumerate(w):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=text_color(im, v), fontsize=8)
            ax.set_xticks(range(len(t.experts)), t.experts, fontsize=7, rotation=45 if len(t.experts) > 8 else 0)
            ax.set_yticks(range(len(t.gates)), t.gates)
            ax.set_xlabel("expert")
            ax.set_title(f"{t.title}mean gate weight", fontsize=9)
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        return fig

    levels = [{"title": t.title.rstrip(": "), "gates": t.gates, "experts": t.experts,
               "mean_gate_weights": t.weights.tolist(), "entropy": t.entropy.tolist()} for t in tables]
    result = {"command": "gates", "checkpoint": str(args.checkpoint), "model": ckpt["model"], "data": spec,
              "split": args.split, "rows": num_rows(x), "gates": tables[0].gates,
              "mean_gate_weights": tables[0].weights.tolist(), "levels": levels, "warnings": warnings}
    write_outputs(out, result, text, draw)
    return 0
