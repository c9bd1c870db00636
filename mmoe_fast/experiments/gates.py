"""``gates CHECKPOINT``: how a saved gated model (MMoE, OMoE, CGC, PLE) uses its experts: the mean gate weight
per gate and expert, each gate's mean entropy, and warnings of collapse (a table and a heatmap per gated level)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .. import checkpoint, files, ops
from ..data import load_splits
from ..models import MMoELayer
from ..models.ple import PLE
from ..train import num_rows, take
from .common import markdown_table, output_dir, text_color, write_outputs

COLLAPSE = 0.9  # a gate putting more than this share of its mean weight on one expert has collapsed onto it
UNUSED = 0.01  # an expert under this mean weight in every gate is unused


@dataclass
class GateTable:
    """One gated level: row ``g`` of ``weights[G, E]`` is gate ``gates[g]``'s mean weight on each expert;
    ``entropy[g]`` the mean over rows of its weights' entropy over the experts it can reach, divided by the
    log of their number (0: always one expert, 1: always uniform)."""

    title: str
    gates: list[str]
    experts: list[str]
    weights: Tensor
    entropy: Tensor
    reach: list[int]  # how many experts each gate can weight

    def warnings(self) -> list[str]:
        """A gate of two or more experts that has collapsed onto one; experts no gate uses."""
        found = [f"{self.title}{g}'s gate has collapsed: {w.max().item():.2f} of its weight on expert "
                 f"{self.experts[int(w.argmax())]}" for g, w, r in zip(self.gates, self.weights, self.reach)
                 if r > 1 and w.max() > COLLAPSE]
        unused = [e for e, w in zip(self.experts, self.weights.max(dim=0).values) if w < UNUSED]
        if unused:
            found.append(f"{self.title}experts no gate uses (under {UNUSED} of every gate's weight): "
                         + ", ".join(unused))
        return found


def _accumulate(gates: Tensor, reach: Tensor, total: Tensor, entropy: Tensor) -> None:
    """Add a batch's gates ``[B, G, E]`` to the running sums of weights ``[G, E]`` and normalized entropies ``[G]``."""
    g = gates.double()
    total += g.sum(dim=0)
    h = -(g * torch.log(g.clamp_min(1e-300))).sum(dim=2)  # [B, G]; 0 * log 0 = 0
    entropy += (h / torch.log(reach.clamp_min(2).double())).sum(dim=0) * (reach > 1)


def _batches(model: nn.Module, x, batch_size: int):
    """``x[N, D]`` ``batch_size`` rows at a time; a dict of feature columns through the model's encoder."""
    for i in range(0, num_rows(x), batch_size):
        part = take(x, slice(i, i + batch_size))
        yield model.encoder(part) if isinstance(x, dict) else part


def gate_tables(model: nn.Module, x, task_names: list[str], batch_size: int = 8192) -> list[GateTable]:
    """The :class:`GateTable` of every gated level of ``model`` on ``x[N, D]`` (or its dict of feature columns):
    one for MMoE (a gate per task) and OMoE (one shared gate), one per level for CGC and PLE (task gates over
    their own and the shared experts, and the inner levels' shared gate). ValueError for a model without gates."""
    n = max(num_rows(x), 1)
    with torch.no_grad():
        layer = getattr(model, "mixture", None)
        if isinstance(layer, MMoELayer):
            count = layer.gate_weight.shape[0]
            total = torch.zeros(count, layer.num_experts, dtype=torch.float64)
            entropy = torch.zeros(count, dtype=torch.float64)
            reach = torch.full((count,), layer.num_experts)
            for h in _batches(model, x, batch_size):
                _accumulate(ops.gate_softmax(h, layer.gate_weight, layer.gate_bias, backend=layer.backend), reach,
                            total, entropy)
            names = task_names if count == len(task_names) else ["shared gate"]
            return [GateTable("", names, [str(e) for e in range(layer.num_experts)], total / n, entropy / n,
                              reach.tolist())]
        if isinstance(model, PLE):
            tables = []
            for index, level in enumerate(model.levels):
                T, S, Sh, E = level.num_tasks, level.num_specific_experts, level.num_shared_experts, level.num_experts
                count = T + (level.shared_gate_weight is not None)
                reach = torch.tensor([S + Sh] * T + [E] * (count - T))
                total, entropy = torch.zeros(count, E, dtype=torch.float64), torch.zeros(count, dtype=torch.float64)
                for h in _batches(model, x, batch_size):
                    for earlier in model.levels[:index]:
                        h = earlier(h)
                    _accumulate(level.full_gates(h), reach, total, entropy)
                experts = [f"{task_names[t]}:{i}" for t in range(T) for i in range(S)]
                experts += [f"shared:{i}" for i in range(Sh)]
                title = f"level {index}: " if len(model.levels) > 1 else ""
                tables.append(GateTable(title, task_names[:T] + ["shared"] * (count - T), experts, total / n,
                                        entropy / n, reach.tolist()))
            return tables
    raise ValueError(f"{type(model).__name__} has no gates (MMoE, OMoE, CGC and PLE have them)")


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
        if spec.get("sha256") is not None and files.sha256(spec["path"]) != spec["sha256"]:
            raise ValueError(f"{spec['path']} has changed since {args.checkpoint} was trained on it")
        spec["schema"] = ckpt.get("table", spec["schema"])
    splits = load_splits(spec)  # missing data: FileNotFoundError saying what to run, reported by the CLI
    x = splits[f"x_{args.split}"]
    if x is None:
        raise ValueError(f"the {spec['name']} data set has no {args.split} split; use --split val")
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
