"""What every experiment shares: one training run, the selection score, and the outputs (JSON, table, plot)."""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import files
from ..features import num_rows
from ..models import build_model
from ..train import evaluate_metrics, fit, json_safe
from ..train_many import fit_many


def main_score(metrics: dict) -> float:
    """Higher is better: AUC for a binary task, minus MSE for a regression one.

    A NaN score (AUC on one-class validation labels) is a ValueError: it compares false with everything,
    so a selection would silently keep whichever run came first.
    """
    score = metrics["auc"] if "auc" in metrics else -metrics["mse"]
    if math.isnan(score):
        why = "the validation labels hold one class" if "auc" in metrics else "non-finite predictions"
        raise ValueError(f"the main task's validation score is undefined ({why}): runs cannot be compared")
    return score


def output_dir(args, default: str) -> Path:
    """The ``--out`` folder (``default`` when not given), created and probed before any run."""
    return files.output_dir(args.out or default, "--out")


def model_input(splits: dict):
    """What a model of ``splits`` takes first: its feature columns, or the width of its ``x``."""
    return splits.get("columns") or splits["x_train"].shape[1]


def train_run(name: str, splits: dict, *, seed: int, epochs: int, batch_size: int, lr: float, progress: bool,
              model_kwargs: dict | None = None) -> tuple[nn.Module, dict]:
    """Build ``name`` for ``splits`` (``load_splits``) with init seed ``seed``, train it, and return it with its record.

    The record holds the per-epoch ``history`` of ``fit``, the final per-task ``val`` and ``test`` metrics
    and the wall time ``seconds``.
    """
    torch.manual_seed(seed)
    task_types = splits["task_types"]
    model = build_model(name, model_input(splits), len(task_types), task_types=task_types,
                        **(model_kwargs or {}))
    start = time.perf_counter()
    history = fit(model, splits["x_train"], splits["y_train"], x_val=splits["x_val"], y_val=splits["y_val"],
                  epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress, log=lambda _: None)
    record = {"model": name, "seed": seed, "history": history,
              "val": evaluate_metrics(model, splits["x_val"], splits["y_val"])}
    if splits["x_test"] is not None:
        record["test"] = evaluate_metrics(model, splits["x_test"], splits["y_test"])
    record["seconds"] = time.perf_counter() - start
    return model, record


RUNS_AT_ONCE = 64  # fit_many's job size: near its best cost per run-step (benchmarks/bench_fit_many.py: S=64 vs 256)
JOB_BYTES = 1 << 29  # and at most this much of the runs' training inputs in one job


def train_runs(name: str, runs: Sequence[tuple[dict, int, float]], *, epochs: int, batch_size: int, progress: bool,
               model_kwargs: dict | None = None, on_done: Callable[[int, dict], None] | None = None
               ) -> list[tuple[nn.Module, dict]]:
    """``train_run`` for each ``(splits, seed, lr)`` of ``runs``, ``RUNS_AT_ONCE`` at a time through ``fit_many``
    (the same results as one by one, in a fraction of the time where the model packs). Each record is
    ``train_run``'s, ``seconds`` being its share of its job's time, plus ``error``: None, or why the run
    diverged (its history then ends before the others'). ``on_done(i, record)`` after each job, per run."""
    out: list[tuple[nn.Module, dict]] = []
    rows = runs[0][0]["x_train"] if runs else None
    per_run = num_rows(rows) * _row_bytes(rows) if rows is not None else 1
    shared = all(splits is runs[0][0] for splits, _, _ in runs)  # one data set: not stacked per run
    at_once = RUNS_AT_ONCE if shared else max(1, min(RUNS_AT_ONCE, JOB_BYTES // per_run))
    for first in range(0, len(runs), at_once):
        job = runs[first : first + at_once]
        models = []
        for splits, seed, _ in job:
            torch.manual_seed(seed)
            task_types = splits["task_types"]
            models.append(build_model(name, model_input(splits), len(task_types), task_types=task_types,
                                      **(model_kwargs or {})))
        one = all(splits is job[0][0] for splits, _, _ in job)  # one data set: shared, not copied per run

        def data(key, job=job, one=one):
            return job[0][0][key] if one else [splits[key] for splits, _, _ in job]

        start = time.perf_counter()
        results = fit_many(models, data("x_train"), data("y_train"), x_val=data("x_val"), y_val=data("y_val"),
                           epochs=epochs, batch_size=batch_size, lr=[lr for _, _, lr in job],
                           seed=[seed for _, seed, _ in job], progress=progress, log=lambda _: None)
        share = (time.perf_counter() - start) / len(job)
        for k, ((splits, seed, _), model, result) in enumerate(zip(job, models, results)):
            record = {"model": name, "seed": seed, "history": result["history"], "error": result["error"],
                      "val": evaluate_metrics(model, splits["x_val"], splits["y_val"])}
            if splits["x_test"] is not None:
                record["test"] = evaluate_metrics(model, splits["x_test"], splits["y_test"])
            record["seconds"] = share
            out.append((model, record))
            if on_done is not None:
                on_done(first + k, record)
    return out


def _row_bytes(x) -> int:
    """Bytes of one row of ``x`` (a tensor, or a dict of feature columns)."""
    parts = x.values() if isinstance(x, dict) else [x]
    return sum(t[:1].numel() * t.element_size() for t in parts)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table of ``header`` and ``rows`` (each cell through ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib  # imported late: it is slow to load, and only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_outputs(out: Path, result: dict, table: str, draw: Callable) -> None:
    """``result.json``, ``table.md`` and ``plot.png`` (drawn by ``draw(plt)``, which returns the figure).

    Each is written atomically: a failure leaves the previous file whole, never a partial one.
    """
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    fig = draw(plt)
    png = io.BytesIO()  # drawn in memory first, so a plotting error writes nothing
    try:
        fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    files.write_text(out / "result.json", json.dumps(json_safe(result), indent=1) + "\n")
    files.write_text(out / "table.md", table)
    files.write_bytes(out / "plot.png", png.getvalue())
    print(table)
    print(f"wrote {out / 'result.json'}, {out / 'table.md'}, {out / 'plot.png'}")


def text_color(image, value: float) -> str:
    """Black on the bright end of a heatmap's colour scale, white on the dark end."""
    return "black" if np.isfinite(value) and image.norm(value) > 0.6 else "white"


def fmt(value: float | None, digits: int = 4) -> str:
    """``value`` with ``digits`` decimals; ``"n/a"`` for None and NaN (an AUC on one-class labels)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def mean_loss(losses: Sequence[float]) -> float:
    """The mean over tasks of per-task losses (the curves and tables report this)."""
    return float(np.mean(losses))


def paired(values: dict[int, float], base: dict[int, float]) -> tuple[float, float, int]:
    """Mean and standard error of ``values[s] - base[s]`` over the seeds both have (runs paired by seed: the
    same data and the same initialization seed), and how many pairs; SE is NaN below two pairs."""
    diffs = np.array([values[s] - base[s] for s in values if s in base], dtype=np.float64)
    if len(diffs) == 0:
        return float("nan"), float("nan"), 0
    se = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
    return float(diffs.mean()), se, len(diffs)


def mean_se(values) -> tuple[float, float]:
    """Mean and its standard error (NaN below two values)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1) / np.sqrt(len(arr))) if len(arr) > 1 else float("nan")
