"""A user's own table (a pandas DataFrame, a CSV or Parquet file) as model inputs and labels.

A :class:`TableSchema` names what each column is: feature columns (``categorical``: one value per row;
``multi``: several values per row, a string split on ``sep`` or a list; ``dense``: a number) and label
columns. ``schema.fit(frame)`` learns from training rows what the encoding needs (each embedding table's
vocabulary, each dense column's mean and std unless given, each label's type unless given) and returns the
fitted schema, which turns any frame with those columns into the models' dict of column tensors
(:meth:`TableSchema.inputs`) and labels with a missing-label mask (:meth:`TableSchema.targets`). The fitted
schema is plain data (:meth:`TableSchema.to_dict`): stored beside a model, it encodes new rows exactly as the
training rows were encoded.

Values are matched as text, a whole float written as an integer (``3.0`` and ``3`` are one value, whether a
file's column was read as floats or integers). Id 0 of every table is a value not seen in training, or a
missing one. A missing label (empty, NaN) is masked out of the loss; a missing dense value is an error naming
the column and row.

The spec's form (a dict, or a JSON file)::

    {"features": [{"name": "user", "kind": "categorical", "dim": 8},
                  {"name": "history", "kind": "multi", "dim": 8, "table": "item", "sep": "|", "max_len": 50},
                  {"name": "item", "kind": "categorical", "dim": 8},
                  {"name": "age", "kind": "dense"}],
     "labels": ["click", {"name": "watch_time", "type": "regression"}]}
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import features

KINDS = ("categorical", "multi", "dense")
TASK_TYPES = ("binary", "regression")
# The keys a spec entry may have, by kind (a misspelt key is an error, never ignored).
_KEYS = {"categorical": {"name", "kind", "dim", "table"},
         "multi": {"name", "kind", "dim", "table", "pooling", "sep", "max_len"},
         "dense": {"name", "kind", "mean", "std"}}
_FITTED = {"vocabularies", "stats"}


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("reading a table needs pandas: pip install pandas (or mmoe-fast[table])") from None
    return pandas


def read_table(path: str | Path):
    """The DataFrame in ``path``: ``.csv`` (``.csv.gz`` too) or ``.parquet`` (which needs pyarrow)."""
    pd = _pandas()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    name = path.name.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        try:
            return pd.read_parquet(path)
        except ImportError:
            raise ImportError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        sep = "\t" if ".tsv" in name else ","
        # Every cell as the text written (an empty one missing): pandas would read a column of numbers as numbers
        # in one file and as text in another ("02134" -> 2134), and a category's id must not depend on that.
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    raise ValueError(f"{path}: a table is a .csv, .tsv (optionally .gz) or .parquet file")


def _key(value) -> str | None:
    """A cell as vocabulary text: None when missing (None, NaN, ``pd.NA``), text as it is, a number as its
    shortest text with a whole float as an integer (a numeric column read as floats because of a gap)."""
    if value is None or value is _pandas().NA:
        return None
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        if math.isfinite(value) and value == int(value):
            return str(int(value))
        return str(value)  # numpy's shortest text: float32(0.1) is "0.1", as written
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


def _keys(series) -> list:
    pd = _pandas()
    if pd.api.types.is_integer_dtype(series.dtype) and not series.hasnans:  # the common case, vectorized
        return series.astype("int64").astype(str).tolist()
    return [_key(v) for v in series.tolist()]


def _tokens(value, sep: str) -> list:
    """A multi-valued cell's values as text: a string split on ``sep`` (empty pieces dropped) or a list's items."""
    if isinstance(value, str):
        return [t for t in value.split(sep) if t]
    if isinstance(value, (list, tuple, np.ndarray)):
        return [k for k in (_key(v) for v in value) if k is not None]
    key = _key(value)
    return [] if key is None else [key]


def _column(frame, name: str, what: str):
    if name not in frame.columns:
        raise ValueError(f"the table has no column {name!r} (a {what}); its columns: {list(frame.columns)[:20]}")
    return frame[name]


def _numbers(series, name: str, what: str) -> np.ndarray:
    """The column as float64, a missing cell NaN; a cell that is not a number is a ValueError naming it."""
    pd = _pandas()
    try:
        values = pd.to_numeric(series, errors="coerce")
    except TypeError:  # lists or other objects in the cells
        values = pd.to_numeric(series.map(lambda v: v if isinstance(v, (int, float, str)) else "?"), errors="coerce")
    bad = values.isna().to_numpy() & ~series.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what} {name!r} holds {series.iloc[row]!r} at row {series.index[row]!r}, not a number")
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _check_entry(entry, i: int, where: str) -> dict:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}[{i}] must be a dict with a name and a kind, got {entry!r}")
    entry = dict(entry)
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}[{i}] ({entry.get('name')!r}): kind must be one of {list(KINDS)}, got {kind!r}")
    if not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ValueError(f"{where}[{i}]: a column needs a name (a non-empty string)")
    unknown = sorted(set(entry) - _KEYS[kind])
    if unknown:
        raise ValueError(f"{entry['name']!r}: unknown key(s) {unknown} for a {kind} column "
                         f"(it takes {sorted(_KEYS[kind])})")
    if kind != "dense":
        dim = entry.get("dim")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"{entry['name']!r}: a {kind} column needs dim, its embedding width (a positive int), "
                             f"got {dim!r}")
        if not isinstance(entry.setdefault("table", entry["name"]), str):
            raise ValueError(f"{entry['name']!r}: table must be a string, got {entry['table']!r}")
    if kind == "multi":
        if entry.setdefault("pooling", "mean") not in ("sum", "mean"):
            raise ValueError(f"{entry['name']!r}: pooling must be 'sum' or 'mean', got {entry['pooling']!r}")
        if not isinstance(entry.setdefault("sep", "|"), str) or not entry["sep"]:
            raise ValueError(f"{entry['name']!r}: sep must be a non-empty string, got {entry['sep']!r}")
        max_len = entry.get("max_len")
        if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1):
            raise ValueError(f"{entry['name']!r}: max_len must be a positive int, got {max_len!r}")
    if kind == "dense":
        for stat in ("mean", "std"):
            value = entry.get(stat)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not math.isfinite(value)):
                raise ValueError(f"{entry['name']!r}: {stat} must be a finite number, got {value!r}")
        if entry.get("std") is not None and entry["std"] <= 0:
            raise ValueError(f"{entry['name']!r}: std must be > 0, got {entry['std']!r}")
    return entry


def _check_label(entry, i: int) -> dict:
    entry = {"name": entry} if isinstance(entry, str) else entry
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ValueError(f"labels[{i}] must be a column name or a dict with a name (and a type), got {entry!r}")
    entry = dict(entry)
    unknown = sorted(set(entry) - {"name", "type"})
    if unknown:
        raise ValueError(f"label {entry['name']!r}: unknown key(s) {unknown} (it takes name and type)")
    if entry.get("type") is not None and entry["type"] not in TASK_TYPES:
        raise ValueError(f"label {entry['name']!r}: type must be one of {list(TASK_TYPES)}, got {entry['type']!r}")
    return entry


class TableSchema:
    """What a table's columns are, and (once fitted) how to encode them: see the module's docstring."""

    def __init__(self, features: Sequence[Mapping], labels: Sequence[str | Mapping], *,
                 vocabularies: Mapping[str, Sequence[str]] | None = None,
                 stats: Mapping[str, Sequence[float]] | None = None) -> None:
        if isinstance(features, (str, bytes)) or not isinstance(features, Sequence) or not features:
            raise ValueError("a table schema needs a non-empty list of feature columns")
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence) or not labels:
            raise ValueError("a table schema needs a non-empty list of label columns")
        self.features = [_check_entry(f, i, "features") for i, f in enumerate(features)]
        self.labels = [_check_label(entry, i) for i, entry in enumerate(labels)]
        names = [f["name"] for f in self.features] + [entry["name"] for entry in self.labels]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"column(s) {repeated} named more than once among the features and labels")
        dims: dict[str, int] = {}
        for f in self.features:
            if f["kind"] != "dense" and dims.setdefault(f["table"], f["dim"]) != f["dim"]:
                raise ValueError(f"table {f['table']!r} is shared by columns of other widths: {dims[f['table']]} "
                                 f"and {f['dim']} ({f['name']!r})")
        if (vocabularies is None) != (stats is None):
            raise ValueError("a fitted schema holds both vocabularies and stats (as to_dict writes them), got one")
        self.vocabularies = None if vocabularies is None else {k: list(v) for k, v in vocabularies.items()}
        self.stats = None if stats is None else {k: tuple(v) for k, v in stats.items()}
        if self.fitted:
            missing = sorted(set(dims) - set(self.vocabularies) | {f["name"] for f in self.features
                                                                    if f["kind"] == "dense"} - set(self.stats))
            if missing or any(entry.get("type") is None for entry in self.labels):
                raise ValueError(f"a fitted schema lacks {missing or 'label types'}: fit it again on training rows")

    # ---- building -------------------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: Mapping | str | Path) -> TableSchema:
        """The schema of a spec dict or a JSON file holding one (``{"features": [...], "labels": [...]}``;
        a fitted schema's :meth:`to_dict` too)."""
        if isinstance(spec, (str, Path)):
            path = Path(spec)
            try:
                spec = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not JSON: {exc}") from None
        if not isinstance(spec, Mapping):
            raise ValueError(f"a table spec is a dict with features and labels, got {type(spec).__name__}")
        unknown = sorted(set(spec) - {"features", "labels"} - _FITTED)
        if unknown:
            raise ValueError(f"a table spec takes features and labels; unknown key(s) {unknown}")
        return cls(spec.get("features") or [], spec.get("labels") or [], vocabularies=spec.get("vocabularies"),
                   stats=spec.get("stats"))

    def to_dict(self) -> dict:
        """The schema as plain data (JSON, a checkpoint entry); :meth:`from_spec` reads it back."""
        out = {"features": copy.deepcopy(self.features), "labels": copy.deepcopy(self.labels)}
        if self.fitted:
            out["vocabularies"] = {k: list(v) for k, v in self.vocabularies.items()}
            out["stats"] = {k: list(v) for k, v in self.stats.items()}
        return out

    @property
    def fitted(self) -> bool:
        return self.vocabularies is not None

    def fit(self, frame) -> TableSchema:
        """The schema fitted to the training rows ``frame``: every table's vocabulary (the values seen, in
        sorted order, from id 1), the dense columns' mean and std (where the spec gives none), the labels'
        types (where the spec gives none: ``binary`` when every known label is 0 or 1)."""
        self._check_frame(frame, labels=True)
        seen: dict[str, set[str]] = {}
        for f in self.features:
            if f["kind"] == "categorical":
                values = _keys(frame[f["name"]])
            elif f["kind"] == "multi":
                values = itertools.chain.from_iterable(_tokens(v, f["sep"]) for v in frame[f["name"]].tolist())
            else:
                continue
            seen.setdefault(f["table"], set()).update(v for v in values if v is not None)
        stats = {}
        for f in self.features:
            if f["kind"] == "dense":
                x = self._dense(frame, f)
                mean = f["mean"] if f.get("mean") is not None else float(x.mean())
                std = f["std"] if f.get("std") is not None else float(x.std())
                stats[f["name"]] = (mean, std if std > 0 and math.isfinite(std) else 1.0)
        labels = []
        for entry in self.labels:
            y = _numbers(frame[entry["name"]], entry["name"], "label")
            known = y[~np.isnan(y)]
            if len(known) == 0:
                raise ValueError(f"label {entry['name']!r} has no known value in the training rows")
            binary = bool(np.isin(known, (0.0, 1.0)).all())
            labels.append({**entry, "type": entry.get("type") or ("binary" if binary else "regression")})
        return TableSchema(self.features, labels, vocabularies={k: sorted(v) for k, v in seen.items()},
                           stats=stats)

    # ---- what a fitted schema gives --------------------------------------------------------------

    def _need_fitted(self, what: str) -> None:
        if not self.fitted:
            raise ValueError(f"{what} needs a fitted schema: schema.fit(training_frame) first")

    @property
    def task_types(self) -> tuple[str, ...]:
        self._need_fitted("task_types")
        return tuple(entry["type"] for entry in self.labels)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(entry["name"] for entry in self.labels)

    def columns(self) -> list[features.Feature]:
        """The models' feature columns (``mmoe_fast.features``): a model takes them in place of ``in_features``."""
        self._need_fitted("columns()")
        out: list[features.Feature] = []
        for f in self.features:
            if f["kind"] == "dense":
                mean, std = self.stats[f["name"]]
                out.append(features.Dense(f["name"], 1, mean, std))
                continue
            vocab = len(self.vocabularies[f["table"]]) + 1  # id 0: unseen or missing
            table = None if f["table"] == f["name"] else f["table"]
            if f["kind"] == "categorical":
                out.append(features.Categorical(f["name"], vocab, f["dim"], table))
            else:
                out.append(features.Multi(f["name"], vocab, f["dim"], f["pooling"], table))
        return out

    def inputs(self, frame) -> dict[str, Tensor]:
        """The dict of column tensors of ``frame``'s rows (ids ``[N]``; multi-valued ids padded with -1 to
        ``[N, L]``, L the longest row's count, each row's first ``max_len`` values where the spec gives one;
        dense ``[N]`` float32), which a model built on :meth:`columns` takes."""
        self._need_fitted("inputs()")
        self._check_frame(frame, labels=False)
        pd = _pandas()
        index = {table: pd.Index(values) for table, values in self.vocabularies.items()}

        def ids(table: str, keys: list) -> Tensor:
            found = index[table].get_indexer(pd.Index(keys, dtype=object)) if keys else np.zeros(0, np.int64)
            return torch.from_numpy((found + 1).astype(np.int64))  # -1 (unseen or missing) becomes 0

        out: dict[str, Tensor] = {}
        for f in self.features:
            name = f["name"]
            if f["kind"] == "categorical":
                out[name] = ids(f["table"], _keys(frame[name]))
            elif f["kind"] == "multi":
                tokens = [_tokens(v, f["sep"])[: f.get("max_len")] for v in frame[name].tolist()]
                lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
                padded = torch.full((len(tokens), int(lengths.max(initial=0))), -1, dtype=torch.long)
                padded[torch.from_numpy(np.arange(padded.shape[1])[None, :] < lengths[:, None])] = ids(
                    f["table"], list(itertools.chain.from_iterable(tokens)))
                out[name] = padded
            else:
                out[name] = torch.from_numpy(self._dense(frame, f).astype(np.float32))
        return out

    def targets(self, frame) -> tuple[Tensor, Tensor | None]:
        """``(y[N, T], mask)``: the labels as float32 (a missing one as 0) and ``mask[N, T]``, False where a
        label is missing (None when none is), as ``fit``'s ``label_mask`` takes it."""
        self._need_fitted("targets()")
        self._check_frame(frame, labels=True)
        ys = []
        for entry in self.labels:
            y = _numbers(frame[entry["name"]], entry["name"], "label")
            known = y[~np.isnan(y)]
            if entry["type"] == "binary" and not np.isin(known, (0.0, 1.0)).all():
                bad = float(known[~np.isin(known, (0.0, 1.0))][0])
                raise ValueError(f"label {entry['name']!r} is binary but holds {bad!r} (labels must be 0 or 1)")
            if not np.isfinite(known).all():
                raise ValueError(f"label {entry['name']!r} holds an infinite value")
            ys.append(y)
        y = np.stack(ys, axis=1) if len(frame) else np.zeros((0, len(ys)))
        missing = np.isnan(y)
        mask = None if not missing.any() else torch.from_numpy(~missing)
        return torch.from_numpy(np.where(missing, 0.0, y).astype(np.float32)), mask

    # ---- checks ---------------------------------------------------------------------------------

    def _check_frame(self, frame, labels: bool) -> None:
        pd = _pandas()
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"a table is a pandas DataFrame, got {type(frame).__name__} (read a file with read_table)")
        for f in self.features:
            _column(frame, f["name"], f"{f['kind']} feature")
        if labels:
            for entry in self.labels:
                _column(frame, entry["name"], "label")

    @staticmethod
    def _dense(frame, f: dict) -> np.ndarray:
        x = _numbers(frame[f["name"]], f["name"], "dense column")
        bad = ~np.isfinite(x)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"dense column {f['name']!r} has no finite value at row {frame.index[row]!r} "
                             f"({float(x[row])!r}): fill or drop missing values first")
        return x

    def __repr__(self) -> str:
        cols = ", ".join(f"{f['kind']}:{f['name']}" for f in self.features)
        return f"TableSchema([{cols}] -> {list(self.label_names)}{', fitted' if self.fitted else ''})"
