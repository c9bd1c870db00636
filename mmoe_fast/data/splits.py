"""Data specs: small dicts naming a data set and its settings, and the train/validation/test tensors they give.

A spec is stored with a checkpoint, so ``mmoe-fast gates`` rebuilds the data a model was trained on.
"""

from __future__ import annotations

import torch

from .census import load_census
from .synthetic import make_synthetic
from .table import TableSchema, read_table

LABELS = ("regression", "binary", "click_conversion")


def synthetic_spec(*, correlation: float, d: int, n_train: int, n_val: int, seed: int,
                   labels: str = "regression", task_seed: int | None = None) -> dict:
    """The spec of the paper's synthetic data: ``n_train + n_val`` rows of ``d`` features, tasks of ``correlation``.

    ``labels``: ``"regression"`` (the paper's), ``"binary"`` (each task's target above its median) or
    ``"click_conversion"`` (ESMM's: task0 = target0 above its median, a click; task1 = a click and target1
    above its median, a conversion after it). ``task_seed``: see ``make_synthetic`` (None: from ``seed``)."""
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    spec = {"name": "synthetic", "correlation": correlation, "d": d, "n_train": n_train, "n_val": n_val,
            "seed": seed}
    if labels != "regression":  # absent at their defaults: specs saved before these options stay equal
        spec["labels"] = labels
    if task_seed is not None:
        spec["task_seed"] = task_seed
    return spec


def census_spec(*, group: int, path: str | None = None, split_seed: int = 0, train_rows: int | None = None,
                encoding: str = "onehot", embedding_dim: int = 8) -> dict:
    """The spec of census-income ``group`` (1 or 2), optionally a seeded subsample of ``train_rows`` training rows;
    ``encoding="ids"``: categorical columns as ids for ``embedding_dim``-wide tables (see ``load_census``)."""
    spec = {"name": "census", "group": group, "path": path, "split_seed": split_seed, "train_rows": train_rows}
    if encoding != "onehot":  # absent at the default: specs saved before this option stay equal
        spec.update(encoding=encoding, embedding_dim=embedding_dim)
    return spec


def table_spec(*, path: str, schema: dict, val_path: str | None = None, val_fraction: float = 0.1,
               seed: int = 0) -> dict:
    """The spec of a user's table ``path`` (CSV or Parquet) under ``schema`` (a ``TableSchema`` spec dict):
    validation rows from ``val_path``, or else a seeded ``val_fraction`` of the file's rows (0: none)."""
    if val_path is None and not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    return {"name": "table", "path": str(path), "val_path": None if val_path is None else str(val_path),
            "val_fraction": None if val_path is not None else val_fraction, "seed": seed, "schema": schema}


def _load_table(spec: dict) -> dict:
    frame = read_table(spec["path"])
    if spec.get("val_path") is not None:
        train, val = frame, read_table(spec["val_path"])
    else:
        order = torch.randperm(len(frame), generator=torch.Generator().manual_seed(spec.get("seed", 0))).numpy()
        n_val = round(len(frame) * spec.get("val_fraction", 0.0))
        train, val = frame.iloc[order[n_val:]], (frame.iloc[order[:n_val]] if n_val else None)
    if len(train) == 0:
        raise ValueError(f"{spec['path']}: no training rows")
    schema = TableSchema.from_spec(spec["schema"])
    schema = schema if schema.fitted else schema.fit(train)
    y_train, mask_train = schema.targets(train)
    y_val, mask_val = schema.targets(val) if val is not None else (None, None)
    return dict(x_train=schema.inputs(train), y_train=y_train, mask_train=mask_train,
                x_val=None if val is None else schema.inputs(val), y_val=y_val, mask_val=mask_val,
                x_test=None, y_test=None, task_names=schema.label_names, task_types=schema.task_types,
                schema=schema)


def load_splits(spec: dict) -> dict:
    """Tensors of a data spec (:func:`synthetic_spec` or :func:`census_spec`).

    Returns ``x_train[N, D], y_train[N, T], x_val, y_val, x_test, y_test, task_names, task_types``
    (synthetic data has no test split: ``x_test`` and ``y_test`` are None). A table (:func:`table_spec`) gives
    dicts of column tensors for ``x_*``, ``mask_train``/``mask_val`` (missing labels; None when none is) and
    the fitted ``schema``; ``x_val`` is None without validation rows.
    """
    if spec["name"] == "synthetic":
        n_train, n_val = spec["n_train"], spec["n_val"]
        x, y = make_synthetic(n_train + n_val, d=spec["d"], correlation=spec["correlation"], seed=spec["seed"],
                              task_seed=spec.get("task_seed"))
        labels = spec.get("labels", "regression")
        if labels != "regression":  # each task's target above its median over the data set: about half
            above = (y > y.median(dim=0).values).float()
            y = above if labels == "binary" else torch.stack((above[:, 0], above[:, 0] * above[:, 1]), dim=1)
        kind = "regression" if labels == "regression" else "binary"
        return dict(x_train=x[:n_train], y_train=y[:n_train], x_val=x[n_train:], y_val=y[n_train:],
                    x_test=None, y_test=None, task_names=("task0", "task1"), task_types=(kind,) * 2)
    if spec["name"] == "census":
        data = load_census(spec["group"], path=spec.get("path"), seed=spec.get("split_seed", 0),
                           encoding=spec.get("encoding", "onehot"), embedding_dim=spec.get("embedding_dim", 8))
        x_train, y_train = data.x_train, data.y_train
        rows = spec.get("train_rows")
        if rows is not None and rows < len(y_train):  # a seeded subsample, for quick runs
            keep = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(spec.get("split_seed", 0)))
            pick = keep[:rows]
            x_train = {k: v[pick] for k, v in x_train.items()} if isinstance(x_train, dict) else x_train[pick]
            y_train = y_train[pick]
        return dict(x_train=x_train, y_train=y_train, x_val=data.x_val, y_val=data.y_val, x_test=data.x_test,
                    y_test=data.y_test, task_names=data.task_names, task_types=("binary",) * 2,
                    columns=data.columns)
    if spec["name"] == "table":
        return _load_table(spec)
    raise ValueError(f"unknown data set {spec['name']!r}")
