"""Training loop: per-task losses and metrics, Adam/AdamW, early stopping, exact checkpoints, DDP.

Losses follow ``model.task_types``: BCE with logits for ``"binary"``, MSE for ``"regression"``. The loss
minimized is ``sum_t loss_weights[t] * loss_t``, plus ``model.extra_loss()`` when the model defines one;
``loss_t`` is the batch's sum of ``w[i, t] * l[i, t]`` over its rows divided by the number of rows, where
``w`` is 1, or the per-row/per-task ``sample_weight`` times the ``label_mask`` (0 for a missing label).
Metrics per task: ROC AUC for binary tasks, MSE and R^2 for regression (scikit-learn), over labeled rows.
Under ``torchrun`` (see :mod:`mmoe_fast.distributed`) each rank trains on its shard of every global batch.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoint, distributed, files, gating
from .backends import cpp as cpp_backend
from .features import num_rows, take, to_device
from .models import model_name

# Below this many values in a parameter group, torch's fused Adam kernel runs on one thread: it splits every
# tensor across the threads, which costs more than it saves on small ones (2-core Xeon, 12 tensors: 15k values
# 17 us on one thread against 28-68 us on two; 100k a tie; 300k 247 against 171 us). Elementwise: the same bits.
ADAM_ONE_THREAD_MAX = 1 << 17


class _LeanFusedAdam:
    """torch's fused Adam/AdamW step, from a step on: the same kernel (``torch._fused_adam_``/``_fused_adamw_``)
    on the same state, updated the same way bit for bit, without re-gathering the state in Python at every step
    (``Optimizer.step``'s ``_init_group`` and per-parameter step-count increments cost 100-170 us a step for a
    dozen small tensors, as much as a small model's whole forward). Each group's step counts become 0-dim views
    of one tensor (one add for all). Anything else (a closure, a missing or sparse gradient, options the fused
    kernel does not take, state loaded or replaced since) runs torch's own step, which keeps the views in step.
    The class and its ``state_dict`` are torch's (a subclass), so checkpoints do not change."""

    def step(self, closure=None):
        if closure is not None or not self._lean_step():
            step = super().step  # type: ignore[misc]
            if getattr(step, "hooked", False):  # torch's hook wrapper: this class's own already ran the hooks
                return step.__wrapped__(self, closure)
            return step(closure)
        return None

    def _lean_step(self) -> bool:
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return False
        cache = self.__dict__.get("_lean")
        if cache is None or len(cache) != len(self.param_groups):
            cache = self.__dict__["_lean"] = [None] * len(self.param_groups)
        work = []
        for i, group in enumerate(self.param_groups):
            entry = cache[i]
            if entry is None or not self._lean_holds(group, entry):
                entry = cache[i] = self._lean_build(group)
                if entry is None:
                    return False
            grads = [p.grad for p in entry[1]]
            if any(g is None or g.is_sparse for g in grads):
                return False
            work.append((group, entry, grads))
        threads = torch.get_num_threads()
        for group, (_, params, _, exp_avgs, exp_avg_sqs, steps, counts, small), grads in work:
            beta1, beta2 = group["betas"]
            counts.add_(1)
            kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
            few = small and threads > 1
            if few:
                torch.set_num_threads(1)
            try:
                kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                       beta1=float(beta1), beta2=float(beta2), weight_decay=group["weight_decay"],
                       eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)
            finally:
                if few:
                    torch.set_num_threads(threads)
        return True

    @staticmethod
    def _lean_options(group: dict) -> bool:
        """The group's options are what the fused kernel does (checked at every step: they may be changed)."""
        return bool(group.get("fused") and not (group.get("amsgrad") or group.get("maximize")
                                                or group.get("capturable") or group.get("differentiable")))

    def _lean_holds(self, group: dict, entry: tuple) -> bool:
        listed, params, states, exp_avgs, exp_avg_sqs, steps, *_ = entry
        if group["params"] is not listed or len(listed) != len(params) or not self._lean_options(group):
            return False
        state = self.state
        for p, q, st, m, v, c in zip(listed, params, states, exp_avgs, exp_avg_sqs, steps):
            if p is not q or state.get(p) is not st or st.get("exp_avg") is not m or st.get("exp_avg_sq") is not v \
                    or st.get("step") is not c:
                return False
        return True

    def _lean_build(self, group: dict) -> tuple | None:
        """The group's cached lists, its step counts made views of one tensor; None where the lean step does
        not apply (torch's step runs: before the first step, say, when the state does not exist yet)."""
        if not self._lean_options(group) or not group["params"]:
            return None
        params = list(group["params"])
        states = [self.state.get(p) for p in params]
        if any(st is None or not {"step", "exp_avg", "exp_avg_sq"} <= st.keys() for st in states):
            return None
        kinds = {(p.dtype, p.device) for p in params}
        steps = [st["step"] for st in states]
        if len(kinds) != 1 or len({(c.dtype, c.device) for c in steps}) != 1 or any(c.dim() != 0 for c in steps):
            return None
        counts = torch.stack(steps)
        for k, st in enumerate(states):
            st["step"] = counts[k]
        small = params[0].is_cpu and sum(p.numel() for p in params) < ADAM_ONE_THREAD_MAX  # see its comment
        return (group["params"], params, states, [st["exp_avg"] for st in states],
                [st["exp_avg_sq"] for st in states], [st["step"] for st in states], counts, small)


class Adam(_LeanFusedAdam, torch.optim.Adam):
    """``torch.optim.Adam``, with ``_LeanFusedAdam``'s step when fused."""


class AdamW(_LeanFusedAdam, torch.optim.AdamW):
    """``torch.optim.AdamW``, with ``_LeanFusedAdam``'s step when fused."""


OPTIMIZERS = {"adam": Adam, "adamw": AdamW}
MODEL_FILE = "model.pt"


LOSS_WEIGHTINGS = ("static", "uncertainty", "gradnorm")
_LOG_VARS = "loss_log_variances"  # the param group of the uncertainty weighting's parameters


def make_optimizer(name: str, model: nn.Module, log_variances: Tensor | None = None, **options
                   ) -> torch.optim.Optimizer:
    """``OPTIMIZERS[name]`` over ``model``'s parameters, fused (one kernel over all parameters) where torch offers
    it for them: the per-parameter loop costs 2-9x as much per step (``python benchmarks/bench_train.py``).
    ``log_variances`` (the uncertainty weighting's) join as a second group without weight decay."""
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    groups: list[dict] = [{"params": params}]
    if log_variances is not None:
        groups.append({"params": [log_variances], "weight_decay": 0.0, "role": _LOG_VARS})
    return OPTIMIZERS[name](groups, fused=fused or None, **options)


class _GradNorm:
    """GradNorm (Chen et al. 2018): learned task weights ``w`` (starting at 1, renormalized to sum to T after each
    update) balance the tasks' gradient norms at the last shared layer ``W``. Each step, with ``L_t`` the batch's
    task losses, ``n_t = ||dL_t/dW||``, ``G_t = w_t n_t``, ``r_t = (L_t / L_t(0)) / mean(L / L(0))`` (``L(0)``: the
    first step's losses) and the target ``mean(G) r_t^alpha`` held constant, ``w``'s gradient is that of
    ``sum_t |G_t - target_t|``: ``sign(G_t - target_t) n_t``; the model's is that of ``sum_t w_t L_t``.
    Under torchrun ``L_t`` and ``dL_t/dW`` are the global batch's (the ranks' summed), so every rank takes the
    same step; ``w`` and ``L(0)`` are kept in checkpoints."""

    def __init__(self, model: nn.Module, alpha: float, device) -> None:
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"gradnorm_alpha must be a finite number >= 0, got {alpha!r}")
        self.shared = _shared_weight(model)
        self.alpha = alpha
        self.weights = nn.Parameter(torch.ones(len(model.task_types), device=device))
        self.initial: Tensor | None = None

    def weight_grad(self, per_task: Tensor) -> Tensor:
        grads = torch.stack([torch.autograd.grad(loss, self.shared, retain_graph=True)[0].reshape(-1)
                             for loss in per_task])
        losses = per_task.detach()
        if distributed.world_size() > 1:  # the global batch's: each rank's per_task sums to world x its mean
            both = distributed.all_reduce_sum(torch.cat([grads, losses[:, None].to(grads.dtype)], dim=1))
            both /= distributed.world_size()
            grads, losses = both[:, :-1], both[:, -1].to(losses.dtype)
        norms = torch.linalg.vector_norm(grads, dim=1)
        if self.initial is None:
            self.initial = losses.clone()
        ratio = losses / self.initial
        G = self.weights.detach() * norms
        target = G.mean() * (ratio / ratio.mean()) ** self.alpha
        return torch.sign(G - target) * norms

    @torch.no_grad()
    def renormalize(self) -> None:
        w = self.weights.clamp_(min=0)
        w.mul_(len(w) / w.sum())


def _shared_weight(model: nn.Module) -> Tensor:
    """The weight of the last layer every task's loss goes through (GradNorm measures the gradients there)."""
    from .models import MMoE, OMoE, SharedBottom

    if type(model) in (MMoE, OMoE):
        return model.mixture.expert_weights[-1]
    if type(model) is SharedBottom:
        return [m for m in model.bottom if isinstance(m, nn.Linear)][-1].weight
    raise ValueError(f"loss_weighting='gradnorm' measures the tasks' gradients at the last shared layer: known for "
                     f"MMoE, OMoE and SharedBottom, not for {type(model).__name__}")


def json_safe(value):
    """``value`` with NaN and infinities as None: JSON has no NaN (an AUC is NaN on one-class labels)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def task_losses(outputs: Tensor, targets: Tensor, task_types: Sequence[str], reduction: str = "mean",
                mask: Tensor | None = None) -> Tensor:
    """Per-task losses of ``outputs[B, T]``: BCE with logits for binary tasks, MSE for regression.

    ``reduction``: ``"mean"`` (over the batch; with ``mask[B, T]``, over each task's labeled rows: NaN where
    it has none), ``"sum"`` (``[T]``) or ``"none"`` (``[B, T]``). Where ``mask`` is False the target is
    ignored (it may be NaN) and the row adds nothing.
    """
    if mask is not None:
        mask = mask.to(torch.bool)
        targets = torch.where(mask, targets, torch.zeros((), dtype=targets.dtype, device=targets.device))
    losses = []
    for t, kind in enumerate(task_types):
        loss = F.binary_cross_entropy_with_logits if kind == "binary" else F.mse_loss
        losses.append(loss(outputs[:, t], targets[:, t], reduction="none"))
    each = torch.stack(losses, dim=1)
    if mask is not None:
        each = each * mask
    if reduction == "none":
        return each
    if reduction == "sum":
        return each.sum(0)
    rows = mask.sum(0) if mask is not None else torch.full((len(task_types),), len(each), device=each.device)
    return each.sum(0) / rows


def task_metrics(outputs: Tensor, targets: Tensor, task_types: Sequence[str], mask: Tensor | None = None) -> list[dict]:
    """Per-task metrics of ``outputs[N, T]``: ``{"auc"}`` for binary tasks, ``{"mse", "r2"}`` for regression.

    ``mask[N, T]``: only rows where it is True count for a task (their targets may be NaN elsewhere).
    AUC is NaN when the labels hold a single class (it is undefined there), every metric NaN for a task
    without labeled rows. Binary targets must be exactly 0 or 1 and no counted target may be NaN
    (ValueError naming the task).
    """
    if mask is not None:
        mask = mask.to(torch.bool)
        targets = torch.where(mask, targets, torch.zeros((), dtype=targets.dtype, device=targets.device))
    check_targets(targets, task_types, "targets")
    from sklearn.metrics import roc_auc_score  # imported late: it is slow to load

    out, tgt = outputs.detach().double().cpu().numpy(), targets.detach().double().cpu().numpy()
    keep = np.ones(tgt.shape, dtype=bool) if mask is None else mask.cpu().numpy()
    metrics = []
    for t, kind in enumerate(task_types):
        o, y = out[keep[:, t], t], tgt[keep[:, t], t]
        if kind == "binary":
            two_classes = len(np.unique(y)) == 2
            metrics.append({"auc": float(roc_auc_score(y, o)) if two_classes else math.nan})
        elif len(y) == 0:
            metrics.append({"mse": math.nan, "r2": math.nan})
        else:  # scikit-learn's mean_squared_error and r2_score, without their ~4 ms of argument checks a call
            sse, sst = float(np.sum((y - o) ** 2)), float(np.sum((y - y.mean()) ** 2))
            r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else 0.0)  # sklearn's value for constant labels
            metrics.append({"mse": sse / len(y), "r2": r2})
    return metrics


def check_targets(y: Tensor, task_types: Sequence[str], name: str = "y") -> None:
    """ValueError naming the task and row unless every target ``y[N, T]`` is usable for its task's loss.

    Binary targets must be exactly 0 or 1: BCE takes a label of -1 or 0.5 without complaint and trains on a
    different problem. A NaN target has no loss at all: missing labels are refused, not skipped.
    """
    for t, kind in enumerate(task_types):
        column = y[:, t]
        nan = torch.isnan(column)
        if nan.any():
            rows = nan.nonzero().flatten()
            raise ValueError(f"{name}: task{t} ({kind}) has {len(rows)} NaN target(s), first at row {int(rows[0])}; "
                             "for missing labels give fit a label_mask (e.g. ~y.isnan()), or drop those rows")
        bad = ((column != 0) & (column != 1)) if kind == "binary" else ~torch.isfinite(column)
        if bad.any():
            row = int(bad.nonzero()[0])
            need = "exactly 0 or 1 (a binary task)" if kind == "binary" else "finite (a regression task)"
            raise ValueError(f"{name}: task{t} targets must be {need}; row {row} has {column[row].item()!r}")




def check_features(x, name: str = "x") -> None:
    """ValueError naming the row and column of the first non-finite value of ``x[N, D]`` (of each floating
    column of a dict of feature columns)."""
    if isinstance(x, dict):
        for key, column in x.items():
            if column.is_floating_point():
                check_features(column.reshape(len(column), -1), f"{name}[{key!r}]")
        return
    if _cpp_checks([x]) and cpp_backend.first_non_finite([x]) is None:
        return  # one C++ pass over the memory: isfinite's mask and its any() cost 5-10x that, at every fit call
    bad = ~torch.isfinite(x)
    if bad.any():
        row, col = bad.nonzero()[0].tolist()
        raise ValueError(f"{name} has a non-finite value {x[row, col].item()!r} at row {row}, column {col}")


@torch.no_grad()
def predict(model: nn.Module, x, batch_size: int = 4096) -> Tensor:
    """``model(x)`` in eval mode, ``[N, T]`` on the model's device, computed ``batch_size`` rows at a time."""
    return _batched(model, model, x, batch_size)


@torch.no_grad()
def predict_proba(model: nn.Module, x, batch_size: int = 4096) -> Tensor:
    """``model.predict_proba(x)`` (a probability per binary task, the value per regression task) in eval mode,
    ``[N, T]``, computed ``batch_size`` rows at a time."""
    return _batched(model, model.predict_proba, x, batch_size)


def _batched(model: nn.Module, fn: Callable, x, batch_size: int) -> Tensor:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        parts = [fn(to_device(take(x, slice(s, s + batch_size)), device)) for s in range(0, num_rows(x), batch_size)]
    finally:
        model.train(was_training)
    if not parts:
        return torch.empty(0, len(model.task_types), device=device)
    return torch.cat(parts)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096) -> list[float]:
    """Per-task mean loss of ``model`` on ``(x, y)``."""
    out = predict(model, x, batch_size)
    return task_losses(out, y.to(out), model.task_types).double().tolist()


def evaluate_metrics(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096) -> list[dict]:
    """Per-task metrics of ``model`` on ``(x, y)``, e.g. ``[{"auc": ..}, {"mse": .., "r2": ..}]``."""
    return task_metrics(predict(model, x, batch_size), y, model.task_types)


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest step in ``checkpoint_dir``, or None when there is none."""
    found = sorted(Path(checkpoint_dir).glob("step-*.pt"))
    return found[-1] if found else None


def _as_tensor(value, name: str, dtype: torch.dtype | None):
    """``value`` as a tensor: a tensor as it is, a NumPy array or a pandas DataFrame/Series (anything with
    ``to_numpy``) converted, in ``dtype`` when given (floating data takes the model's dtype); None stays None."""
    if value is None or isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):  # feature columns: each as it is (ids stay integers)
        return {k: _as_tensor(v, f"{name}[{k!r}]", None) for k, v in value.items()}
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a tensor, a NumPy array or a pandas DataFrame/Series, "
                        f"got {type(value).__name__}")
    if value.dtype == object:
        raise TypeError(f"{name} holds Python objects (a column of strings?): give numbers")
    t = torch.from_numpy(np.ascontiguousarray(value))
    return t if dtype is None or t.dtype == torch.bool else t.to(dtype)


def label_weights(y: Tensor, sample_weight: Tensor | None, label_mask: Tensor | None, name: str = "y",
                  every_task: bool = True) -> Tensor | None:
    """``w[N, T]`` = ``sample_weight`` (``[N]`` or ``[N, T]``, finite, >= 0) times ``label_mask`` (``[N, T]``,
    True or 1 where a label is known); None when both are None (every weight 1). ValueError naming the
    problem for a bad shape or value, and (``every_task``: for a whole data set, not one batch) for a task left
    without any weight."""
    if sample_weight is None and label_mask is None:
        return None
    n, num_tasks = y.shape
    w = torch.ones(n, num_tasks)
    if sample_weight is not None:
        sw = torch.as_tensor(sample_weight, dtype=torch.float32).cpu()
        if sw.dim() == 1:
            sw = sw[:, None]
        if sw.dim() != 2 or sw.shape[0] != n or sw.shape[1] not in (1, num_tasks):
            raise ValueError(f"{name}: sample_weight must be [{n}] or [{n}, {num_tasks}], "
                             f"got {tuple(torch.as_tensor(sample_weight).shape)}")
        if not torch.isfinite(sw).all() or (sw < 0).any():
            raise ValueError(f"{name}: sample_weight must be finite and >= 0")
        w = w * sw
    if label_mask is not None:
        mask = torch.as_tensor(label_mask).cpu()
        if mask.shape != (n, num_tasks) or not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{name}: label_mask must be [{n}, {num_tasks}] of True/False (or 1/0), "
                             f"got {tuple(mask.shape)} {mask.dtype}")
        w = w * mask.to(torch.float32)
    empty = (w.sum(0) == 0).nonzero().flatten().tolist()
    if empty and every_task:
        raise ValueError(f"{name}: task{empty[0]} has no labeled rows of positive weight (label_mask, sample_weight)")
    return w


@dataclass
class _Progress:
    """Everything, besides model, optimizer and RNGs, that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps taken
    epoch: int = 1  # the epoch under way (1-based)
    batch: int = 0  # batches of this epoch done; 0 means the epoch has not started
    order: Tensor | None = None  # this epoch's row permutation
    loss_sum: list[float] = field(default_factory=list)  # per-task loss summed over this epoch's rows
    weight_sum: list[float] = field(default_factory=list)  # per-task label weight summed over them (rows if unweighted)
    extra_sum: float = 0.0  # extra_loss summed over this epoch's steps
    rows: int = 0
    best: float | None = None  # best main-task validation metric so far
    best_epoch: int | None = None
    best_state: dict | None = None
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict] = field(default_factory=list)


def _check_loader_args(loader, y, sample_weight, label_mask, resume, steps) -> None:
    """What fit cannot take beside a DataLoader ``x``: a ValueError naming it."""
    for name, value in (("y", y), ("sample_weight", sample_weight), ("label_mask", label_mask)):
        if value is not None:
            raise ValueError(f"x is a DataLoader: its batches carry the targets (and sample weights as a third "
                             f"item); {name} must be None")
    if resume is not None:
        raise ValueError("resume needs tensor inputs: fit cannot restore a DataLoader's position")
    if distributed.world_size() > 1:
        raise ValueError("a DataLoader under torchrun is not supported: give tensors (fit splits each batch)")
    if steps is None and _loader_length(loader) is None:
        raise ValueError("x is a DataLoader without a length (an IterableDataset): give steps")


def _loader_length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _loader_batch(item, task_types: Sequence[str], dtype: torch.dtype, epoch: int, k: int) -> tuple:
    """``(x, y, weights or None)`` of a DataLoader's batch: ``(x, y)`` or ``(x, y, sample_weight)`` (``[B]`` or
    ``[B, T]``), checked as fit checks tensors; errors name the epoch and batch."""
    where = f"DataLoader batch {k + 1} of epoch {epoch}"
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise TypeError(f"{where}: expected (x, y) or (x, y, sample_weight), got "
                        f"{type(item).__name__}{f' of {len(item)}' if isinstance(item, (tuple, list)) else ''}")
    xb, yb = _as_tensor(item[0], f"{where}: x", dtype), _as_tensor(item[1], f"{where}: y", dtype)
    if yb.dim() != 2 or yb.shape[1] != len(task_types) or num_rows(xb) != len(yb):
        raise ValueError(f"{where}: y must be [B, {len(task_types)}] for x's {num_rows(xb)} rows, got "
                         f"{tuple(yb.shape)}")
    if not isinstance(xb, dict) and xb.dim() != 2:
        raise ValueError(f"{where}: x must be [B, D], got {tuple(xb.shape)}")
    check_features(xb, f"{where}: x")
    check_targets(yb, task_types, f"{where}: y")
    if len(item) == 2:
        return xb, yb, None
    sw = _as_tensor(item[2], f"{where}: sample_weight", torch.float32)
    return xb, yb, label_weights(yb, sw, None, where, every_task=False)


def _check_fit_args(model, x, y, x_val, y_val, weights, optimizer, main_task, patience, checkpoint_dir,
                    checkpoint_every, batch_size, steps, loader: bool = False) -> None:
    num_tasks = len(model.task_types)
    for name, (a, b) in {"x, y": (x, y), "x_val, y_val": (x_val, y_val)}.items():
        if a is None and b is None and (name != "x, y" or loader):
            continue
        if a is None or b is None:
            raise ValueError(f"{name}: give both or neither")
        if isinstance(a, dict):
            if not a or any(not isinstance(v, Tensor) or v.dim() == 0 or len(v) != len(b) for v in a.values()):
                raise ValueError(f"{name}: every feature column must be a tensor of {len(b)} rows (pad multi-valued "
                                 "columns to [N, L] with -1)")
            if b.dim() != 2 or b.shape[1] != num_tasks:
                raise ValueError(f"{name}: y must be [N, {num_tasks}], got {tuple(b.shape)}")
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0] or b.shape[1] != num_tasks:
            raise ValueError(f"{name} must be [N, D] and [N, {num_tasks}] (one column per task), "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if not loader and num_rows(x) == 0:
        raise ValueError("x has no rows")
    if weights.shape != (num_tasks,) or not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"loss_weights must be {num_tasks} finite non-negative numbers, got {weights.tolist()}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    if not 0 <= main_task < num_tasks:
        raise ValueError(f"main_task must be in [0, {num_tasks}), got {main_task}")
    if patience is not None and (x_val is None or patience < 1):
        raise ValueError("early stopping (patience) needs x_val, y_val and a patience >= 1")
    if not loader:  # a DataLoader's batches are checked as they come
        check_features(x, "x")
        check_targets(y, model.task_types, "y")
    if x_val is not None:
        check_features(x_val, "x_val")
        check_targets(y_val, model.task_types, "y_val")
        if patience is not None and model.task_types[main_task] == "binary" and len(y_val[:, main_task].unique()) < 2:
            # AUC is undefined on one class: every epoch would count as "no improvement".
            raise ValueError(f"early stopping on task{main_task}'s validation AUC: its validation labels hold one "
                             "class, so the AUC is undefined; give validation rows of both classes, or no patience")
    if checkpoint_every is not None and (checkpoint_dir is None or checkpoint_every < 1):
        raise ValueError("checkpoint_every needs a checkpoint_dir and must be >= 1")
    if batch_size < 1 or (steps is not None and steps < 1):
        raise ValueError(f"batch_size and steps must be >= 1, got {batch_size}, {steps}")


GATE_ROWS = 8192  # the rows fit's log_gates measures the gates on, every epoch


def _gate_record(model: nn.Module, x, record: dict) -> list[str]:
    """Add ``gate_mean`` and ``gate_entropy`` (by gate: ``task0``, ``shared_gate``, ``level0.task1``) to ``record``;
    return the collapse warnings."""
    tables = gating.gate_tables(model, x, [f"task{t}" for t in range(len(model.task_types))])
    record["gate_mean"], record["gate_entropy"] = {}, {}
    for table in tables:
        level = table.title.replace(" ", "").rstrip(":")
        for gate, w, h in zip(table.gates, table.weights.tolist(), table.entropy.tolist()):
            key = (f"{level}." if level else "") + gate.replace(" ", "_")
            record["gate_mean"][key], record["gate_entropy"][key] = w, h
    return [text for table in tables for text in table.warnings()]


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("tensorboard logging needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _flatten(record: dict) -> dict:
    """One CSV row: ``train_loss_task0``, ``val_auc_task0``, ``gate_entropy_task0``, ``gate_mean_task0_e3``, ..."""
    row = {}
    for key, value in record.items():
        if key == "val_metrics":
            row.update({f"val_{m}_task{t}": v for t, d in enumerate(value) for m, v in d.items()})
        elif isinstance(value, dict):
            for name, v in value.items():
                row.update({f"{key}_{name}_e{e}": w for e, w in enumerate(v)} if isinstance(v, list)
                           else {f"{key}_{name}": v})
        elif isinstance(value, list):
            row.update({f"{key}_task{t}": v for t, v in enumerate(value)})
        else:
            row[key] = value
    return row


def _write_logs(log_dir: Path, history: list[dict]) -> None:
    # Rewritten whole each epoch: a resumed run then leaves exactly the uninterrupted run's files. Atomic, so a
    # failed write keeps the previous epoch's complete files.
    files.write_text(log_dir / "train.jsonl", "".join(json.dumps(json_safe(r)) + "\n" for r in history))
    rows = [_flatten(r) for r in history]
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def write_csv(f) -> None:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    files.write_atomic(log_dir / "train.csv", write_csv, newline="")


def _metric_text(name: str, value: float) -> str:
    if math.isnan(value):  # say why, rather than print a bare nan that reads like a diverged run
        return f"{name}=nan ({'one class in validation' if name == 'auc' else 'non-finite predictions'})"
    return f"{name}={value:.4f}"


def _describe(record: dict) -> str:
    def tasks(values: list[float]) -> str:
        return " ".join(f"task{t}={v:.4f}" for t, v in enumerate(values))

    parts = [f"epoch {record['epoch']:3d}", f"train {tasks(record['train_loss'])}"]
    if "train_extra_loss" in record:
        parts.append(f"extra={record['train_extra_loss']:.4g}")
    if "val_loss" in record:
        parts.append(f"val {tasks(record['val_loss'])}")
        parts.append(" ".join(f"task{t} " + " ".join(_metric_text(k, v) for k, v in m.items())
                              for t, m in enumerate(record["val_metrics"])))
    if "gate_entropy" in record:
        parts.append("gate entropy " + " ".join(f"{k}={v:.2f}" for k, v in record["gate_entropy"].items()))
    return "  ".join(parts)


class ResumeMismatch(ValueError):
    """``fit(resume=...)`` given settings that change what the checkpoint's run trains.

    ``differences`` lists ``(setting, checkpoint's value, this run's value)``; :meth:`render` names the settings
    another way (the CLI names its options).
    """

    def __init__(self, path: Path, differences: list[tuple[str, object, object]]) -> None:
        self.path, self.differences = path, differences
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = str) -> str:
        """The one-line message, each setting shown as ``name(setting)``."""
        parts = dict.fromkeys(f"{name(key)} {saved} (checkpoint) vs {given} (now)"
                              for key, saved, given in self.differences)
        return (f"{self.path} was written by a run with other settings, which change what is trained: "
                f"{'; '.join(parts)}; resume with the checkpoint's values, or start a new run elsewhere")


# The settings of fit a resumed run must share with its checkpoint: they fix the data order (rows, batch
# size, seed: the generator is restored, so a new seed could not be honoured), the objective (loss weights,
# the main task that selects the best epoch) or the update rule (the optimizer's algorithm), so continuing
# under other values would give neither run. Model, its config and the checkpoint_extra entries (the data
# spec) are checked too. lr, weight_decay, the run's length and patience may change: they are applied from the
# resumed step on, and said.
_FIXED = ("n_rows", "batch_size", "seed", "optimizer", "loss_weights", "main_task", "label_weights", "scheduler",
          "clip_grad_norm", "loss_weighting", "gradnorm_alpha")
# Of _FIXED, the ones older checkpoints lack, with the value their runs had.
_ADDED = {"label_weights": None, "scheduler": None, "clip_grad_norm": None, "loss_weighting": "static",
          "gradnorm_alpha": None}


def _differences(saved: object, given: object, name: str) -> list[tuple[str, object, object]]:
    """``(name, saved, given)`` for every leaf where two settings (dicts compared key by key) differ."""
    if isinstance(saved, dict) and isinstance(given, dict):
        return [d for k in dict.fromkeys([*saved, *given])
                for d in _differences(saved.get(k), given.get(k), f"{name}.{k}")]
    same = list(saved) == list(given) if isinstance(saved, (list, tuple)) and isinstance(given, (list, tuple)) \
        else saved == given
    return [] if same else [(name, saved, given)]


def _cpp_checks(tensors: Sequence[Tensor]) -> bool:
    """Whether ``cpp.first_non_finite`` can read these tensors' memory: on the CPU, float32 or float64,
    contiguous (a negative-bit view's memory is finite where its values are)."""
    return cpp_backend.unavailable_reason() is None and all(
        t.is_cpu and t.dtype in cpp_backend.DTYPES and t.is_contiguous() for t in tensors)


def _non_finite(tensors: list[tuple[str, Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or infinity, or None. On the CPU (float32/float64, contiguous)
    one C++ pass over their memory. Elsewhere first one float64 sum of everything (a
    NaN or an infinity anywhere makes it non-finite; finite float32 values cannot overflow it): two or three
    ops where ``isfinite`` per tensor costs four each (~130 us a step for a dozen small tensors); only a
    non-finite sum looks tensor by tensor (float64 values near its range may overflow the sum: then none is
    named)."""
    values = [t for _, t in tensors]
    if not values:
        return None
    if _cpp_checks(values):
        k = cpp_backend.first_non_finite(values)  # one pass in C++, no copy (a dozen ops' worth of time saved)
        return None if k is None else tensors[k][0]
    if any(t.device.type == "mps" for t in values):  # no float64 there: tensor by tensor
        return next((name for name, t in tensors if not t.isfinite().all()), None)
    if len({t.device for t in values}) == 1 and sum(t.numel() for t in values) < (1 << 20):
        total = torch.cat([t.reshape(-1) for t in values]).sum(dtype=torch.float64)
    else:
        total = torch.stack([t.sum(dtype=torch.float64).to(values[0].device) for t in values]).sum()
    if math.isfinite(float(total)):
        return None
    return next((name for name, t in tensors if not t.isfinite().all()), None)


def fit(
    model: nn.Module, x: Tensor, y: Tensor | None = None, *, x_val: Tensor | None = None, y_val: Tensor | None = None,
    epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, seed: int = 0, progress: bool = True,
    log: Callable[[str], None] = print, steps: int | None = None, loss_weights: Sequence[float] | None = None,
    optimizer: str = "adam", weight_decay: float = 0.0, main_task: int = 0, patience: int | None = None,
    log_dir: str | os.PathLike | None = None, checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None, resume: str | os.PathLike | None = None,
    checkpoint_extra: dict | None = None, sample_weight: Tensor | None = None, label_mask: Tensor | None = None,
    val_label_mask: Tensor | None = None, clip_grad_norm: float | None = None,
    scheduler: Callable[[torch.optim.Optimizer], object] | None = None, loss_weighting: str = "static",
    gradnorm_alpha: float = 1.5, log_gates: bool = False, tensorboard: str | os.PathLike | None = None,
    table=None,
) -> list[dict]:
    """Train ``model`` on ``x[N, D]``, ``y[N, T]`` with mini-batches in a seeded order; returns one record per epoch.

    A record has ``epoch``, ``step`` (optimizer steps so far), ``train_loss`` (per task, mean over the
    epoch's rows), ``train_extra_loss`` when the model has ``extra_loss``, and with validation data
    ``val_loss`` and ``val_metrics`` (per task, see :func:`task_metrics`).

    - ``x``, ``y`` (and the other per-row inputs) are tensors, NumPy arrays or pandas DataFrames/Series (numbers).
      ``x`` may instead be a ``torch.utils.data.DataLoader`` (``y`` None) whose batches are ``(x, y)`` or ``(x, y,
      sample_weight)``: an epoch is one pass over it, in its order (``seed`` and ``batch_size`` do not apply), each
      batch checked as it comes; ``steps`` is needed for a loader without a length; no ``resume`` and no torchrun
      with one (its position cannot be restored).
    - Inputs must be finite and binary targets exactly 0 or 1 (ValueError naming the row and task), except
      where ``label_mask[N, T]`` (``val_label_mask`` for validation) is False: a missing label, which adds
      nothing to the loss or the metrics (``~y.isnan()`` makes one from NaN labels).
    - ``sample_weight``: ``[N]`` or ``[N, T]`` non-negative weights; each task's loss is the batch's weighted
      sum over its rows divided by the number of rows (the mean when every weight is 1); the recorded
      ``train_loss`` is the epoch's weighted mean over labeled rows.
    - ``clip_grad_norm``: clip the gradients' global L2 norm to this before each update.
    - ``loss_weighting="uncertainty"`` (Kendall et al. 2018): the loss is ``sum_t loss_weights[t] * (exp(-s_t) *
      loss_t + s_t)`` with a learned log variance ``s_t`` per task (starting at 0, trained by the same optimizer
      without weight decay, kept in checkpoints); records carry ``loss_log_variance``. ``"gradnorm"`` (Chen et
      al. 2018, see ``_GradNorm``; ``gradnorm_alpha`` its asymmetry, 1.5 by default): task weights learned to
      balance the tasks' gradient norms at the last shared layer (MMoE, OMoE, SharedBottom), the loss ``sum_t
      loss_weights[t] * w_t * loss_t``; records carry ``loss_task_weight``; kept in checkpoints, global under
      torchrun.
      ``"static"`` (default):
      ``sum_t loss_weights[t] * loss_t``.
    - ``scheduler``: ``scheduler(optimizer)`` makes a learning-rate scheduler (e.g. ``lambda opt:
      torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=1000)``), stepped after every update, saved
      in checkpoints and restored on resume; each record has the ``lr`` at the end of its epoch.
    - ``steps``, when given, replaces ``epochs``: train that many optimizer steps (the last epoch may be partial).
    - ``patience``: stop when the main task's validation metric (AUC up for binary, MSE down for
      regression) has not improved for that many epochs; the best epoch's weights are restored at the end.
      A metric that is undefined (AUC on one-class validation labels) is refused up front, never read as
      "no improvement".
    - ``log_dir``: ``train.jsonl`` and ``train.csv``, one row per epoch.
    - ``table``: a fitted ``mmoe_fast.data.TableSchema``; ``x`` (and ``x_val``) are then DataFrames of its
      columns, encoded by it, and their labels and missing-label masks are read from them (``y``, ``y_val``,
      ``label_mask`` and ``val_label_mask`` are not given).
    - ``log_gates`` (MMoE, OMoE, CGC, PLE): every epoch, each gate's mean weight per expert (``gate_mean``) and
      mean normalized entropy (``gate_entropy``, 0: one expert, 1: uniform), on the first ``GATE_ROWS`` rows of
      the validation data (else the training data); a gate collapsing onto one expert, or an expert no gate
      uses, is logged as a warning the first epoch it happens.
    - ``tensorboard``: a folder for TensorBoard event files (needs the ``tensorboard`` package): every number of
      every epoch's record, tagged as ``train.csv``'s columns, at the step count; a resume drops the events
      after the last record its checkpoint kept.
    - ``checkpoint_dir``: ``step-NNNNNNN.pt`` every ``checkpoint_every`` steps, at the last step and when
      early stopping ends the run, plus ``model.pt`` (the returned model) at the end; all are
      :mod:`mmoe_fast.checkpoint` files (``mmoe_fast.load`` reads them), the steps with a ``trainer`` entry.
      Both folders are created and probed for writing before the first step; every file is written atomically.
    - ``checkpoint_extra``: more entries for every checkpoint written, e.g. ``{"data": spec}``.
    - ``resume``: a ``step-*.pt`` file, or a directory (its latest); training continues exactly where it
      stopped, and the returned history includes the epochs done before. Settings that change what is
      trained must equal the checkpoint's (else :class:`ResumeMismatch`, see ``_FIXED``); a new ``lr``,
      ``weight_decay``, length or ``patience`` is applied from there on and logged.
    - Every update is checked: a non-finite loss (before the update) or weight (after it, the last one
      included) raises FloatingPointError naming the step and epoch; nothing non-finite is ever saved, and
      the checkpoints written before stay.
    Under ``torchrun`` the global batch of ``batch_size`` rows is split across ranks; rank 0 logs and writes.
    """
    if table is not None:
        if any(v is not None for v in (y, y_val, label_mask, val_label_mask)):
            raise ValueError("with table=, x and x_val are DataFrames holding the labels: give no y, y_val, "
                             "label_mask or val_label_mask")
        (x, y, label_mask), (x_val, y_val, val_label_mask) = (
            (None, None, None) if frame is None else (table.inputs(frame), *table.targets(frame))
            for frame in (x, x_val))
    weights = torch.ones(len(model.task_types)) if loss_weights is None else torch.as_tensor(
        loss_weights, dtype=torch.float32)
    dtype = next(model.parameters()).dtype
    loader = x if isinstance(x, torch.utils.data.DataLoader) else None
    if loader is not None:
        _check_loader_args(loader, y, sample_weight, label_mask, resume, steps)
        x = None
    x, y, x_val, y_val = (_as_tensor(v, n, dtype) for v, n in ((x, "x"), (y, "y"), (x_val, "x_val"), (y_val, "y_val")))
    sample_weight = _as_tensor(sample_weight, "sample_weight", torch.float32)
    label_mask, val_label_mask = (_as_tensor(v, n, None) for v, n in ((label_mask, "label_mask"),
                                                                       (val_label_mask, "val_label_mask")))
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
    if clip_grad_norm is not None and not (math.isfinite(clip_grad_norm) and clip_grad_norm > 0):
        raise ValueError(f"clip_grad_norm must be a finite number > 0, got {clip_grad_norm!r}")
    label_w = label_weights(y, sample_weight, label_mask, "y")
    val_mask = None
    if val_label_mask is not None:
        if y_val is None:
            raise ValueError("val_label_mask needs x_val, y_val")
        val_mask = label_weights(y_val, None, val_label_mask, "y_val").to(torch.bool)
    # Unlabeled entries take a placeholder target, so the checks below see only real labels.
    y = y if label_mask is None else torch.where(torch.as_tensor(label_mask).to(torch.bool), y, 0.0)
    y_val = y_val if val_mask is None else torch.where(val_mask, y_val, 0.0)
    _check_fit_args(model, x, y, x_val, y_val, weights, optimizer, main_task, patience, checkpoint_dir,
                    checkpoint_every, batch_size, steps, loader=loader is not None)
    if log_gates and not gating.is_gated(model):
        raise ValueError(f"log_gates: {type(model).__name__} has no gates (MMoE, OMoE, CGC and PLE have them)")
    if log_gates and x is None and x_val is None:
        raise ValueError("log_gates with a DataLoader needs x_val, y_val (the rows the gates are measured on)")
    writer_cls = _summary_writer() if tensorboard is not None else None
    if distributed.is_main():  # before any work: an unusable folder fails now, not after the training
        for what, where in (("log_dir", log_dir), ("checkpoint_dir", checkpoint_dir), ("tensorboard", tensorboard)):
            if where is not None:
                files.output_dir(where, what)
    device = next(model.parameters()).device
    weights = weights.to(device)
    say = log if distributed.is_main() else (lambda _: None)
    log_vars = (nn.Parameter(torch.zeros(len(model.task_types), device=device))
                if loss_weighting == "uncertainty" else None)
    gradnorm = None
    if loss_weighting == "gradnorm":
        gradnorm = _GradNorm(model, gradnorm_alpha, device)
    opt = make_optimizer(optimizer, model, log_vars if gradnorm is None else gradnorm.weights, lr=lr,
                         weight_decay=weight_decay)
    sched = scheduler(opt) if scheduler is not None else None
    gen = torch.Generator().manual_seed(seed)
    num_tasks = len(model.task_types)
    if loader is None:
        n = num_rows(x)
        per_epoch = math.ceil(n / batch_size)
    else:  # its batches, in its order: fit's seed and batch_size do not apply
        n, batch_size = None, loader.batch_size
        per_epoch = _loader_length(loader)
    total = steps if steps is not None else epochs * per_epoch
    options = {"n_rows": n, "batch_size": batch_size, "seed": seed, "optimizer": optimizer,
               "loss_weights": weights.tolist(), "main_task": main_task, "lr": lr, "weight_decay": weight_decay,
               "total_steps": total, "patience": patience,
               # What else changes the objective or the update: compared on resume when the checkpoint has them.
               "label_weights": None if label_w is None else _fingerprint(label_w),
               "scheduler": _scheduler_setting(sched), "clip_grad_norm": clip_grad_norm,
               "loss_weighting": loss_weighting,
               "gradnorm_alpha": gradnorm_alpha if loss_weighting == "gradnorm" else None}
    higher_is_better = model.task_types[main_task] == "binary"
    main_metric = "auc" if higher_is_better else "mse"
    has_extra = callable(getattr(model, "extra_loss", None))
    checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    entries = dict(checkpoint_extra or {})
    p = _Progress(loss_sum=[0.0] * num_tasks)
    if resume is not None:
        resume = Path(resume)
        if resume.is_dir():
            found = latest_checkpoint(resume)
            if found is None:
                raise FileNotFoundError(f"no step-*.pt checkpoint in {resume}")
            resume = found
        p = _load_checkpoint(resume, model, opt, gen, options, entries, device, say, sched, log_vars, gradnorm)
        say(f"resumed from {resume} at step {p.step} (epoch {p.epoch}, batch {p.batch})")
    board = None
    if writer_cls is not None and distributed.is_main():
        # A resumed run drops the events after the last record its checkpoint kept, and writes on from there.
        purge = (p.history[-1]["step"] + 1 if p.history else 0) if resume is not None else None
        board = writer_cls(str(tensorboard), purge_step=purge)
    gate_rows = None if not log_gates else take(x_val if x_val is not None else x, slice(0, GATE_ROWS))
    warned: set[str] = set()
    watched = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    last_saved: list[Path] = []  # the newest step checkpoint, for the divergence message

    def save_step() -> None:
        if checkpoint_dir is None or not distributed.is_main():
            return
        path = checkpoint.save(model, checkpoint_dir / f"step-{p.step:07d}.pt", **entries, trainer={
            "optimizer": opt.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "n_rows": n, "batch_size": batch_size, "options": options, "progress": asdict(p),
            "scheduler": None if sched is None else sched.state_dict(),
            "loss_log_variances": None if log_vars is None else log_vars.detach().cpu(),
            "gradnorm": None if gradnorm is None else {
                "weights": gradnorm.weights.detach().cpu(),
                "initial": None if gradnorm.initial is None else gradnorm.initial.detach().cpu()}})
        last_saved[:] = [path]

    def diverged(what: str) -> FloatingPointError:
        kept = f"the last checkpoint, {last_saved[0]}, is kept" if last_saved else "no checkpoint was written"
        err = FloatingPointError(f"training diverged at epoch {p.epoch}, step {p.step + 1}: {what}; nothing of "
                                 f"this step was saved ({kept}); lower the learning rate (now "
                                 f"{opt.param_groups[0]['lr']}) or check the inputs")
        err.history = p.history  # the epochs completed before, as fit would have returned them
        return err

    net = distributed.wrap(model)
    while p.batch > 0 or (p.step < total and not p.stopped):
        if p.batch == 0:
            p.order = torch.randperm(n, generator=gen) if loader is None else None
            p.loss_sum, p.weight_sum, p.extra_sum, p.rows = [0.0] * num_tasks, [0.0] * num_tasks, 0.0, 0
        batches = None if loader is None else iter(loader)
        net.train()
        with tqdm(total=per_epoch, initial=p.batch, desc=f"epoch {p.epoch}", leave=False,
                  disable=not progress or not distributed.is_main()) as bar:
            while (loader is not None or p.batch < per_epoch) and p.step < total:
                if loader is None:
                    rows = p.order[p.batch * batch_size : (p.batch + 1) * batch_size]
                    source = (x, y, label_w)
                else:
                    item = next(batches, None)
                    if item is None:  # the loader's epoch has ended
                        break
                    source = _loader_batch(item, model.task_types, dtype, p.epoch, p.batch)
                    rows = torch.arange(len(source[1]))
                sums, wsums, extra = _backward(net, model, opt, *source, rows, weights, has_extra, device, log_vars,
                                               gradnorm)
                if not (math.isfinite(sum(sums)) and math.isfinite(extra)):
                    raise diverged(f"non-finite training loss before the update (per-task sums {sums}, "
                                   f"extra_loss {extra})")
                if clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                opt.step()
                if gradnorm is not None:
                    gradnorm.renormalize()
                if sched is not None:
                    sched.step()
                # After the update too, the last one included: a finite loss can still give a non-finite step.
                bad = _non_finite(watched)
                if bad is not None:
                    raise diverged(f"the update made the weight {bad!r} non-finite")
                p.loss_sum = [a + b for a, b in zip(p.loss_sum, sums)]
                p.weight_sum = [a + b for a, b in zip(p.weight_sum, wsums)]
                p.extra_sum += extra
                p.rows += len(rows)
                p.batch += 1
                p.step += 1
                # drawn by update() when it refreshes (at most every 0.1 s): a refresh every step cost ~100 us
                bar.set_postfix(loss=f"{sum(sums) / len(rows):.4f}", refresh=False)
                bar.update()
                if p.step == total or (checkpoint_every is not None and p.step % checkpoint_every == 0):
                    save_step()
        record = {"epoch": p.epoch, "step": p.step,
                  "train_loss": [s / w if w > 0 else math.nan for s, w in zip(p.loss_sum, p.weight_sum)],
                  "lr": opt.param_groups[0]["lr"]}
        if log_vars is not None:
            record["loss_log_variance"] = log_vars.detach().double().cpu().tolist()
        if gradnorm is not None:
            record["loss_task_weight"] = gradnorm.weights.detach().double().cpu().tolist()
        if has_extra:
            record["train_extra_loss"] = p.extra_sum / p.batch
        if x_val is not None:
            shard = slice(distributed.rank(), None, distributed.world_size())  # distributed.shard's rows
            out = distributed.gather_shards(predict(model, take(x_val, shard)), num_rows(x_val))
            y_dev = y_val.to(out)
            vm = None if val_mask is None else val_mask.to(out.device)
            record["val_loss"] = task_losses(out, y_dev, model.task_types, mask=vm).double().tolist()
            record["val_metrics"] = task_metrics(out, y_dev, model.task_types, mask=vm)
            value = record["val_metrics"][main_task][main_metric]
            if math.isnan(value) and patience is not None:
                raise FloatingPointError(f"epoch {p.epoch}: task{main_task}'s validation {main_metric} is nan "
                                         "(non-finite predictions): early stopping cannot compare it")
            improved = p.best is None or (value > p.best if higher_is_better else value < p.best)
            if improved and not math.isnan(value):
                p.best, p.best_epoch, p.bad_epochs = value, p.epoch, 0
                if patience is not None:
                    p.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                p.bad_epochs += 1
            p.stopped = patience is not None and p.bad_epochs >= patience
        if gate_rows is not None:
            found = _gate_record(model, to_device(gate_rows, device), record)
            for text in found:
                if text not in warned:
                    say(f"warning: epoch {p.epoch}: {text}")
            warned.update(found)
        p.history.append(record)
        say(_describe(record))
        if log_dir is not None and distributed.is_main():
            _write_logs(Path(log_dir), p.history)
        if board is not None:
            for tag, value in _flatten(record).items():
                if tag not in ("epoch", "step") and isinstance(value, (int, float)):
                    board.add_scalar(tag, value, p.step)
            board.flush()
        p.epoch, p.batch = p.epoch + 1, 0
        if p.stopped:
            say(f"early stop: task{main_task} validation {main_metric} has not improved for {patience} epochs")
            save_step()
    if p.best_state is not None:
        model.load_state_dict(p.best_state)
        say(f"restored the weights of epoch {p.best_epoch} (task{main_task} validation {main_metric} {p.best:.4f})")
    if checkpoint_dir is not None and distributed.is_main():
        checkpoint.save(model, checkpoint_dir / MODEL_FILE, **entries)
    if board is not None:
        board.close()
    return p.history


def _scheduler_setting(sched) -> str | None:
    """A scheduler's class and settings (its state less the progress it keeps), for the resume check."""
    if sched is None:
        return None
    progress = {"last_epoch", "_last_lr", "_step_count", "_get_lr_called_within_step", "_is_initial"}
    state = {k: v for k, v in sched.state_dict().items() if k not in progress}
    return f"{type(sched).__name__}({', '.join(f'{k}={state[k]!r}' for k in sorted(state))})"


def _fingerprint(t: Tensor) -> str:
    """A short digest of a tensor's values (the label weights a checkpointed run trained with)."""
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _backward(net, model, opt, x, y, label_w, rows, weights, has_extra, device, log_vars=None, gradnorm=None
              ) -> tuple[list[float], list[float], float]:
    """Gradients of the global batch ``rows``; returns its per-task weighted loss sums and label weight sums
    (over all ranks), and the extra loss."""
    local = distributed.shard(rows)
    xb, yb = to_device(take(x, local), device), take(y, local).to(device)
    if gradnorm is None and _fused_applies(net, model, has_extra, log_vars):
        wb = None if label_w is None else take(label_w, local).to(device)
        done = fused_step(model, opt, xb, yb, wb, len(local), weights)
        if done is not None:
            return done
    out = net(xb)
    wb = None if label_w is None else take(label_w, local).to(device=device, dtype=out.dtype)
    sums = _loss_sums(out, yb.to(out.dtype), model.task_types, wb)
    wsums = torch.full_like(sums, float(len(local))) if wb is None else wb.sum(0)
    # Scaled so that DDP's average of the ranks' gradients is the gradient of the global batch's mean loss,
    # whatever the shard sizes.
    per_task = sums * (distributed.world_size() / len(rows))
    task_weight_grad = None
    if gradnorm is not None:
        task_weight_grad = gradnorm.weight_grad(per_task)
        loss = (weights * gradnorm.weights.detach() * per_task).sum()
    elif log_vars is None:
        loss = (weights * per_task).sum()
    else:  # each rank adds the whole s_t: its gradient is averaged over the ranks below, as DDP does the model's
        loss = (weights * (torch.exp(-log_vars) * per_task + log_vars)).sum()
    extra = model.extra_loss() if has_extra else torch.zeros((), device=device)
    opt.zero_grad(set_to_none=True)
    (loss + extra).backward()
    if task_weight_grad is not None:
        gradnorm.weights.grad = task_weight_grad
    if log_vars is not None and distributed.world_size() > 1 and log_vars.grad is not None:
        distributed.all_reduce_sum(log_vars.grad).div_(distributed.world_size())
    wide = torch.float32 if sums.device.type == "mps" else torch.float64  # a float64 model's sums kept whole
    stats = distributed.all_reduce_sum(torch.cat([sums.detach().to(wide), wsums.detach().to(wide),
                                                  extra.detach().to(wide).reshape(1)]))
    stats = stats.double().cpu().tolist()
    t = len(model.task_types)
    return stats[:t], stats[t:2 * t], stats[-1] / distributed.world_size()


# fit's step skips autograd where the model offers ``fused_training_forward`` (MMoE, OMoE): the same kernels and
# loss, its gradient formed directly, the whole step one C++ call where ``fused_training_step`` applies (tests
# compare the paths). False: autograd always.
FUSED_STEP = True


def _fused_applies(net, model, has_extra, log_vars) -> bool:
    """Whether fit may skip autograd for ``model`` (one process, no extra loss, static loss weights, and the
    model offers ``fused_training_forward``)."""
    return (FUSED_STEP and net is model and not has_extra and log_vars is None
            and getattr(model, "fused_training_forward", None) is not None)


def _set_grads(opt, grads: list) -> None:
    """``grads``' ``(parameter, gradient)`` pairs become the ``.grad``; a parameter the list leaves out keeps
    no old gradient."""
    if len(grads) != sum(len(group["params"]) for group in opt.param_groups):
        opt.zero_grad(set_to_none=True)
    for param, grad in grads:
        if grad.stride() != param.stride():  # the fused Adam kernel reads both as flat memory: one layout
            grad = torch.empty_like(param).copy_(grad)
        if param.grad is not grad:
            param.grad = grad


def fused_step(model, opt, xb, yb, wb, rows: int, weights) -> tuple[list[float], list[float], float] | None:
    """``_backward`` without autograd (where ``_fused_applies``) for the batch ``xb``, ``yb`` of ``rows`` rows
    (``wb``: their label weights or None): the whole step in one C++ call where the model offers it
    (``fused_training_step``), else its ``fused_training_forward``, the loss sums and their gradient in one
    pass, then the model's backward kernels; the gradients become the parameters' ``.grad``. None where
    neither applies (autograd then)."""
    if not isinstance(xb, Tensor):
        return None
    wb = None if wb is None else wb.to(dtype=xb.dtype)
    coef = weights.to(xb.dtype) * (1.0 / rows)
    step = getattr(model, "fused_training_step", None)
    done = None if step is None else step(xb, yb, coef, wb)
    if done is not None:
        sums, grads = done
    else:
        fused = model.fused_training_forward(xb)
        if fused is None:
            return None
        sums, grads = _fused_backward(fused, model, yb, wb, coef)
    _set_grads(opt, grads)
    wsums = [float(rows)] * len(sums) if wb is None else wb.sum(0).double().tolist()
    return sums, wsums, 0.0


def _fused_backward(fused, model, yb, wb, coef) -> tuple[list[float], list]:
    """The per-task loss sums and ``(parameter, gradient)`` pairs (of ``sum_t coef[t] * sums[t]``) from
    ``model.fused_training_forward``'s ``fused``."""
    out, backward = fused
    coef = coef.to(out.dtype)
    if out.is_cpu and out.dtype in cpp_backend.DTYPES and cpp_backend.unavailable_reason() is None:
        sums, dz = cpp_backend.loss_grad(out, yb, [t == "binary" for t in model.task_types], coef, wb)
    else:
        targets = yb.to(out.dtype)
        sums = _loss_sums(out, targets, model.task_types, wb).double().tolist()
        dz = _loss_grad(out, targets, model.task_types, coef, wb)
    return sums, backward(dz)


def _loss_sums(out: Tensor, targets: Tensor, task_types: Sequence[str], wb: Tensor | None) -> Tensor:
    """Per-task loss sums ``[T]`` of a batch, each row weighted by ``wb[B, T]`` (None: ones; 0: a missing label,
    whose target is not read)."""
    if wb is None:
        return task_losses(out, targets, task_types, reduction="sum")
    return (task_losses(out, targets, task_types, reduction="none", mask=wb > 0) * wb).sum(0)


def _loss_grad(out: Tensor, targets: Tensor, task_types: Sequence[str], coef: Tensor, wb: Tensor | None) -> Tensor:
    """The gradient with respect to ``out[B, T]`` of ``sum_t coef[t] sum_b wb[b, t] loss_t(out[b, t])`` (BCE with
    logits or MSE, as ``task_losses``; ``wb`` None: all ones; a row with ``wb`` 0 adds nothing, whatever its
    target), in the order autograd multiplies it out."""
    if wb is not None:
        mask = wb > 0
        targets = torch.where(mask, targets, torch.zeros((), dtype=targets.dtype, device=targets.device))
        coef = coef * wb * mask
    binary = torch.tensor([t == "binary" for t in task_types], device=out.device)
    each = torch.where(binary, torch.sigmoid(out) - targets, 2 * (out - targets))
    return each * coef


def _check_resume(path: Path, ckpt: dict, model: nn.Module, options: dict, entries: dict) -> None:
    """:class:`ResumeMismatch` listing every setting of this run that differs from the checkpoint's run."""
    state = ckpt["trainer"]
    saved = state.get("options", {"n_rows": state["n_rows"], "batch_size": state["batch_size"]})
    # Settings added after a checkpoint was written were off (None) in its run.
    saved = {**_ADDED, **saved} if "options" in state else saved
    found = [d for key in _FIXED if key in saved for d in _differences(saved[key], options[key], key)]
    if options["scheduler"] is not None and "lr" in saved and saved["lr"] != options["lr"]:
        found.append(("lr", saved["lr"], options["lr"]))  # a scheduler's lr continues: a new one cannot apply
    if saved.get("patience") is None and options["patience"] is not None and "patience" in saved:
        # The best epoch's weights were not kept without patience: restoring them would be impossible.
        found.append(("patience", None, options["patience"]))
    found += _differences(ckpt["model"], model_name(model), "model")
    config = model.config() if callable(getattr(model, "config", None)) else None
    if isinstance(ckpt["config"], dict) and isinstance(config, dict):
        # The backend computes the same function within tolerance: a change is applied (and said), not refused.
        found += [d for d in _differences(ckpt["config"], config, "config") if d[0] != "config.backend"]
    for key, value in entries.items():
        found += _differences(ckpt.get(key), value, key)
    if found:
        raise ResumeMismatch(path, found)


def _load_checkpoint(path: Path, model, opt, gen, options: dict, entries: dict, device, say, sched=None,
                     log_vars=None, gradnorm=None) -> _Progress:
    ckpt = checkpoint.read(path)
    state = ckpt.get("trainer")
    if state is None:
        raise checkpoint.CheckpointError(f"{path} holds no trainer state (resume from a step-*.pt, not {MODEL_FILE})")
    try:
        _check_resume(path, ckpt, model, options, entries)
        model.load_state_dict(ckpt["state_dict"])
        if log_vars is not None:  # present: _check_resume refused a run without them
            with torch.no_grad():
                log_vars.copy_(state["loss_log_variances"])
        if gradnorm is not None:  # present: _check_resume refused a run of another loss weighting
            with torch.no_grad():
                gradnorm.weights.copy_(state["gradnorm"]["weights"])
            first = state["gradnorm"]["initial"]
            gradnorm.initial = None if first is None else first.to(device)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        progress = _Progress(**state["progress"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])  # present: _check_resume refused a run without one
    except ResumeMismatch:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a damaged or foreign trainer entry
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise checkpoint.CheckpointError(f"{path}: its trainer state does not fit this model and optimizer: "
                                         f"{reason}") from None
    saved = state.get("options")
    if saved is None:
        say(f"{path} records no run options (an older checkpoint): lr, weight decay and patience are this run's")
        saved = {}
    for group in opt.param_groups:  # load_state_dict brought back the checkpoint's values: this run's win
        if sched is None:  # a scheduler owns the lr: it continues from the checkpoint's
            group["lr"] = options["lr"]
        if group.get("role") != _LOG_VARS:  # the log variances take no weight decay
            group["weight_decay"] = options["weight_decay"]
    for key in ("lr", "weight_decay", "total_steps", "patience"):
        if key in saved and saved[key] != options[key]:
            say(f"resume: {key} {saved[key]} (checkpoint) -> {options[key]}, applied from step {progress.step}")
    if isinstance(ckpt["config"], dict) and "backend" in ckpt["config"]:
        config = model.config() if callable(getattr(model, "config", None)) else {}
        if config.get("backend", ckpt["config"]["backend"]) != ckpt["config"]["backend"]:
            say(f"resume: backend {ckpt['config']['backend']} (checkpoint) -> {config['backend']}")
    if progress.step > options["total_steps"]:
        raise ValueError(f"{path} is at step {progress.step}, past this run's {options['total_steps']} steps: "
                         "give more steps or epochs")
    if options["patience"] != saved.get("patience", options["patience"]):
        progress.stopped = options["patience"] is not None and progress.bad_epochs >= options["patience"]
    if progress.best_state is not None:
        progress.best_state = {k: v.to(device) for k, v in progress.best_state.items()}
    if len(progress.weight_sum) != len(progress.loss_sum):  # a checkpoint from before label weights: rows
        progress.weight_sum = [float(progress.rows)] * len(progress.loss_sum)
    return progress
