"""Training loop (first version): Adam, per-task losses, a progress bar, per-epoch per-task losses.

Losses follow ``model.task_types``: BCE with logits for ``"binary"``, MSE for ``"regression"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


def task_losses(outputs: Tensor, targets: Tensor, task_types: Sequence[str]) -> Tensor:
    """Per-task mean losses, ``[T]``: BCE with logits for binary tasks, MSE for regression."""
    losses = []
    for t, kind in enumerate(task_types):
        if kind == "binary":
            losses.append(F.binary_cross_entropy_with_logits(outputs[:, t], targets[:, t]))
        else:
            losses.append(F.mse_loss(outputs[:, t], targets[:, t]))
    return torch.stack(losses)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096) -> list[float]:
    """Per-task mean loss of ``model`` on ``(x, y)``."""
    model.eval()
    total = torch.zeros(len(model.task_types), dtype=torch.float64)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        total += task_losses(model(xb), yb, model.task_types).double() * len(xb)
    return (total / max(len(x), 1)).tolist()


def fit(
    model: nn.Module, x: Tensor, y: Tensor, *, x_val: Tensor | None = None, y_val: Tensor | None = None,
    epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, seed: int = 0, progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train with Adam on shuffled mini-batches; returns one record per epoch (train and validation losses)."""
    if x.shape[0] != y.shape[0] or y.dim() != 2 or y.shape[1] != len(model.task_types):
        raise ValueError(
            f"x[N, D] and y[N, {len(model.task_types)}] must match, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    steps = math.ceil(len(x) / batch_size)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        running = torch.zeros(len(model.task_types), dtype=torch.float64)
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False)
        for i in bar:
            idx = order[i * batch_size : (i + 1) * batch_size]
            losses = task_losses(model(x[idx]), y[idx], model.task_types)
            loss = losses.sum()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch}, step {i}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += losses.detach().double() * len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        record = {"epoch": epoch, "train_loss": (running / len(x)).tolist()}
        if x_val is not None and y_val is not None:
            record["val_loss"] = evaluate(model, x_val, y_val)
        history.append(record)
        parts = [f"train {' '.join(f'task{t}={v:.4f}' for t, v in enumerate(record['train_loss']))}"]
        if "val_loss" in record:
            parts.append(f"val {' '.join(f'task{t}={v:.4f}' for t, v in enumerate(record['val_loss']))}")
        log(f"epoch {epoch:3d}  " + "  ".join(parts))
    return history
