"""``gates CHECKPOINT``: the mean gate weight per task and expert of a saved MMoE or OMoE (a table and a heatmap)."""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import Tensor, nn

from .. import checkpoint, ops
from ..data import load_splits
from ..models import MMoELayer
from .common import markdown_table, output_dir, text_color, write_outputs


def mean_gate_weights(model: nn.Module, x: Tensor, batch_size: int = 8192) -> Tensor:
    """``[T_gate, E]``: the mean over rows of ``x[N, D]`` of each gate's softmax weights (T_gate = 1 for OMoE)."""
    layer = getattr(model, "mixture", None)
    if not isinstance(layer, MMoELayer):
        raise ValueError(f"{type(model).__name__} has no MMoE gates (expected a `mixture` MMoELayer)")
    total = torch.zeros(layer.gate_weight.shape[0], layer.num_experts, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            gates = ops.gate_softmax(x[i : i + batch_size], layer.gate_weight, layer.gate_bias, backend=layer.backend)
            total += gates.double().sum(dim=0)
    return total / max(len(x), 1)


def gates(args: argparse.Namespace) -> int:
    """``gates CHECKPOINT``: the mean gate weights of a saved MMoE/OMoE on the data it was trained on."""
    out = output_dir(args, "results/gates")
    ckpt = checkpoint.read(args.checkpoint)
    model = checkpoint.model_from(ckpt, args.checkpoint)
    if not isinstance(ckpt.get("data"), dict):
        raise checkpoint.CheckpointError(f"{args.checkpoint} names no data set (save it with data=<a data spec>)")
    spec = dict(ckpt["data"])
    if args.census_path is not None and spec["name"] == "census":
        spec["path"] = args.census_path
    splits = load_splits(spec)  # missing data: FileNotFoundError saying what to run, reported by the CLI
    x = splits[f"x_{args.split}"]
    if x is None:
        raise ValueError(f"the {spec['name']} data set has no {args.split} split; use --split val")
    in_features = model.config()["in_features"]
    if x.shape[1] != in_features:
        raise ValueError(f"the data has {x.shape[1]} features but the checkpoint's model takes "
                         f"{in_features}: give the data it was trained on")
    weights = mean_gate_weights(model, x)
    task_names = list(splits["task_names"])
    if len(task_names) != model.num_tasks:
        task_names = [f"task{t}" for t in range(model.num_tasks)]
    gate_names = task_names if weights.shape[0] == model.num_tasks else ["shared gate"]
    num_experts = weights.shape[1]
    rows = [[g, *(f"{v:.3f}" for v in w)] for g, w in zip(gate_names, weights.tolist())]
    table = (f"Mean gate weight per task and expert, {ckpt['model']} on {spec['name']} {args.split} "
             f"({len(x)} rows), checkpoint {args.checkpoint}:\n\n"
             + markdown_table(["gate", *[f"expert {e}" for e in range(num_experts)]], rows))

    def draw(plt):
        fig, ax = plt.subplots(figsize=(0.7 * num_experts + 2.5, 0.6 * len(gate_names) + 1.5))
        im = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, aspect="auto")
        for (i, j), v in np.ndenumerate(weights.numpy()):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=text_color(im, v), fontsize=8)
        ax.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
        ax.set_yticks(range(len(gate_names)), gate_names)
        ax.set_xlabel("expert")
        ax.set_title("mean gate weight", fontsize=9)
        fig.colorbar(im, ax=ax)
        return fig

    result = {"command": "gates", "checkpoint": str(args.checkpoint), "model": ckpt["model"], "data": spec,
              "split": args.split, "rows": len(x), "gates": gate_names, "mean_gate_weights": weights.tolist()}
    write_outputs(out, result, table, draw)
    return 0
