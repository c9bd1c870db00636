"""Feature columns: categorical ids, multi-valued ids and dense numbers, encoded into the models' ``x[B, D]``.

A model takes a list of columns in place of ``in_features`` (``MMoE([Categorical("user", 1000, 8), ...], 2)``)
and then a dict of tensors, one per column name, in ``forward``, ``fit`` and ``predict``. The encoder looks
the ids up in embedding tables (a table may be shared by name), pools multi-valued ids (sum or mean), and
normalizes dense columns; ``x`` is the concatenation in column order.

The lookups of tables of one embedding width are one ``nn.EmbeddingBag`` call: the tables are stacked into one
weight (up to ``STACK_BYTES``; more stacks past that), each table's ids shifted by its row offset, and every
(row, column) is one bag, as FBGEMM's table-batched embedding does. Its gradient is the same as the per-table
lookups' (tests compare them).

Column inputs: ``Categorical``: ids ``[B]``; ``Multi``: padded ids ``[B, L]`` (``-1`` pads) or a pair
``(ids[N], offsets[B])`` of flat ids and the start of each row's ids; ``Dense``: ``[B]`` or ``[B, dim]``.
An id outside ``[0, vocab)`` (other than a padding ``-1``; -2 is an error) is a ValueError naming the column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Categorical:
    """One id per row, looked up in table ``table`` (default: the column's own, named after it)."""

    name: str
    vocab: int
    dim: int
    table: str | None = None


@dataclass(frozen=True)
class Multi:
    """Any number of ids per row (a history, a tag list), pooled by ``"sum"`` or ``"mean"`` (0 for none)."""

    name: str
    vocab: int
    dim: int
    pooling: str = "mean"
    table: str | None = None


@dataclass(frozen=True)
class Dense:
    """``dim`` numbers per row, as ``(value - mean) / std`` (given per column, e.g. from training data)."""

    name: str
    dim: int = 1
    mean: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0


KINDS = {"categorical": Categorical, "multi": Multi, "dense": Dense}
Feature = Categorical | Multi | Dense


def to_dict(feature: Feature) -> dict:
    """A column as plain data (what a checkpoint stores): ``{"kind": ..., **fields}``."""
    kind = next(k for k, cls in KINDS.items() if isinstance(feature, cls))
    return {"kind": kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(feature).items()}}


def from_dict(spec: Mapping) -> Feature:
    """The column ``to_dict`` wrote; a column object is returned as it is."""
    if isinstance(spec, (Categorical, Multi, Dense)):
        return spec
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"a feature column needs a kind of {sorted(KINDS)}, got {kind!r}")
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    return KINDS[kind](**spec)


def is_columns(value) -> bool:
    """Whether a model's first argument is a list of feature columns (rather than ``in_features``)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(v, (Categorical, Multi, Dense, Mapping)) for v in value)


def num_rows(x) -> int:
    """The rows of ``x[N, D]``, or of a dict of feature columns (its first column's)."""
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def take(x, index):
    """``x[index]`` of a tensor, or of every column of a dict of feature columns (rows by an integer index
    through ``index_select``: a training step's batch in half the time of indexing)."""
    if isinstance(x, dict):
        return {k: take(v, index) for k, v in x.items()}
    if (isinstance(index, Tensor) and index.dim() == 1 and index.dtype in (torch.int64, torch.int32) and x.dim() > 0
            and index.device == x.device):
        return torch.index_select(x, 0, index)
    return x[index]


def to_device(x, device):
    """``x`` (a tensor, or a dict of feature columns) on ``device``."""
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def width(columns: Sequence[Feature | Mapping]) -> int:
    """The ``x`` width the columns encode to (the sum of their dims)."""
    return sum(from_dict(c).dim for c in columns)


def encode_inputs(model: nn.Module, args: tuple) -> tuple:
    """A model's forward pre-hook: its dict of columns through ``model.encoder``."""
    return (model.encoder(args[0]), *args[1:])


def _positive(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


STACK_BYTES = 16 << 20


class FeatureEncoder(nn.Module):
    """``x[B, out_features]`` from a dict of column tensors (see the module's docstring)."""

    def __init__(self, columns: Sequence[Feature | Mapping]) -> None:
        super().__init__()
        self.columns = [from_dict(c) for c in columns]
        names = [c.name for c in self.columns]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"feature columns need distinct names, got {names}")
        tables: dict[str, tuple[int, int]] = {}
        for c in self.columns:
            if isinstance(c, Dense):
                _positive(c.dim, f"{c.name}: dim")
                for stat in ("mean", "std"):
                    value = getattr(c, stat)
                    if isinstance(value, tuple) and len(value) != c.dim:
                        raise ValueError(f"{c.name}: {stat} needs {c.dim} values, got {len(value)}")
                if any(s <= 0 for s in (c.std if isinstance(c.std, tuple) else (c.std,))):
                    raise ValueError(f"{c.name}: std must be > 0")
                continue
            if isinstance(c, Multi) and c.pooling not in ("sum", "mean"):
                raise ValueError(f"{c.name}: pooling must be 'sum' or 'mean', got {c.pooling!r}")
            shape = (_positive(c.vocab, f"{c.name}: vocab"), _positive(c.dim, f"{c.name}: dim"))
            table = c.table or c.name
            if tables.setdefault(table, shape) != shape:
                raise ValueError(f"table {table!r} is shared by columns of other sizes: {tables[table]} vs {shape} "
                                 "(vocab, dim)")
        # Stacked weights of one embedding width each, every table a block of rows in one of them. A stack
        # stays under STACK_BYTES (a table larger than that has its own): a dense gradient of hundreds of MB,
        # allocated fresh every step, costs more in page faults than the calls it saves.
        self.offsets: dict[str, tuple[str, int]] = {}  # table -> (its stack's key, first row)
        rows: dict[str, int] = {}
        open_stack: dict[int, str] = {}
        for table, (vocab, dim) in tables.items():
            key = open_stack.get(dim)
            if key is None or (rows[key] + vocab) * dim * 4 > STACK_BYTES:
                key = open_stack[dim] = f"{dim}_{sum(k.startswith(f'{dim}_') for k in rows)}"
                rows[key] = 0
            self.offsets[table] = (key, rows[key])
            rows[key] += vocab
        self.bags = nn.ModuleDict({key: nn.EmbeddingBag(n, int(key.split("_")[0]), mode="sum")
                                   for key, n in rows.items()})
        for bag in self.bags.values():
            nn.init.normal_(bag.weight, std=0.01)
        width = 0
        self.slices: list[tuple[int, int]] = []
        for c in self.columns:
            self.slices.append((width, width + c.dim))
            width += c.dim
        self.out_features = width
        for c in self.columns:
            if isinstance(c, Dense):
                self.register_buffer(f"mean_{c.name}", torch.tensor(c.mean, dtype=torch.float32).reshape(-1),
                                     persistent=False)
                self.register_buffer(f"std_{c.name}", torch.tensor(c.std, dtype=torch.float32).reshape(-1),
                                     persistent=False)

    def table_weight(self, table: str) -> Tensor:
        """The rows of ``table`` in its stacked weight (a view: training it trains them)."""
        key, first = self.offsets[table]
        vocab = next(c.vocab for c in self.columns if not isinstance(c, Dense) and (c.table or c.name) == table)
        return self.bags[key].weight[first : first + vocab]

    def _ids(self, c, value, batch: int) -> tuple[Tensor, Tensor]:
        """(ids ``[B, L]``, present ``[B, L]``) of a categorical or multi-valued column, checked."""
        if isinstance(value, (tuple, list)) and isinstance(c, Multi):
            flat, starts = (torch.as_tensor(v) for v in value)
            if starts.dim() != 1 or len(starts) != batch or flat.dim() != 1:
                raise ValueError(f"{c.name}: (ids, offsets) must be 1-D with {batch} offsets, got "
                                 f"{tuple(flat.shape)} and {tuple(starts.shape)}")
            lengths = torch.diff(starts, append=torch.tensor([len(flat)], device=starts.device))
            if (lengths < 0).any() or (len(starts) and starts[0] != 0):
                raise ValueError(f"{c.name}: offsets must start at 0 and not decrease")
            longest = int(lengths.max()) if batch else 0
            pos = torch.arange(longest, device=flat.device)
            present = pos[None, :] < lengths[:, None]
            ids = torch.full((batch, longest), -1, dtype=torch.long, device=flat.device)
            ids[present] = flat.long()
        else:
            ids = torch.as_tensor(value)
            if isinstance(c, Categorical):
                if ids.shape != (batch,):
                    raise ValueError(f"{c.name}: a categorical column takes ids [{batch}], got {tuple(ids.shape)}")
                ids = ids[:, None]
            elif ids.dim() != 2 or ids.shape[0] != batch:
                raise ValueError(f"{c.name}: a multi-valued column takes padded ids [{batch}, L] or (ids, offsets), "
                                 f"got {tuple(ids.shape)}")
            if ids.is_floating_point() or ids.dtype == torch.bool:
                raise ValueError(f"{c.name}: ids must be integers, got {ids.dtype}")
            ids = ids.long()
            present = ids != -1 if isinstance(c, Multi) else torch.ones_like(ids, dtype=torch.bool)
        bad = present & ((ids < 0) | (ids >= c.vocab))
        if bad.any():
            raise ValueError(f"{c.name}: id {int(ids[bad][0])} is outside [0, {c.vocab})"
                             + (" (-1 pads multi-valued rows)" if isinstance(c, Multi) else ""))
        return ids, present

    def forward(self, batch: Mapping[str, Tensor | tuple]) -> Tensor:
        if not isinstance(batch, Mapping):
            raise TypeError(f"a model built on feature columns takes a dict of column tensors, got "
                            f"{type(batch).__name__}")
        missing = [c.name for c in self.columns if c.name not in batch]
        if missing:
            raise ValueError(f"the batch has no column {missing[0]!r} (columns: {[c.name for c in self.columns]})")
        first = batch[self.columns[0].name]
        size = len(first[1] if isinstance(first, (tuple, list)) else first)
        parts: list[Tensor | None] = [None] * len(self.columns)
        groups: dict[int, list[tuple[int, Tensor, Tensor, Tensor]]] = {}
        for i, c in enumerate(self.columns):
            if isinstance(c, Dense):
                v = torch.as_tensor(batch[c.name])
                v = v[:, None] if v.dim() == 1 else v
                if v.shape != (size, c.dim):
                    raise ValueError(f"{c.name}: a dense column takes [{size}] or [{size}, {c.dim}], got "
                                     f"{tuple(torch.as_tensor(batch[c.name]).shape)}")
                mean, std = getattr(self, f"mean_{c.name}"), getattr(self, f"std_{c.name}")
                parts[i] = (v.to(mean.dtype) - mean) / std
                continue
            ids, present = self._ids(c, batch[c.name], size)
            key, first_row = self.offsets[c.table or c.name]
            groups.setdefault(key, []).append((i, ids + first_row, present))
        for key, fields in groups.items():
            # Bag (b, f) holds row b's ids of field f: lay the fields side by side, then read row-major.
            ids = torch.cat([f[1] for f in fields], dim=1)
            present = torch.cat([f[2] for f in fields], dim=1)
            counts = torch.stack([f[2].sum(1) for f in fields], dim=1)  # [B, F]
            flat = counts.reshape(-1)
            bag = self.bags[key]
            out = bag(ids.reshape(-1) if bool(present.all()) else ids[present], torch.cumsum(flat, 0) - flat)
            out = out.view(size, len(fields), bag.embedding_dim)
            for j, (i, *_) in enumerate(fields):
                c = self.columns[i]
                mean = isinstance(c, Multi) and c.pooling == "mean"
                parts[i] = out[:, j] / counts[:, j : j + 1].clamp_min(1).to(out.dtype) if mean else out[:, j]
        return torch.cat(parts, dim=1)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return ", ".join(f"{type(c).__name__}({c.name!r})" for c in self.columns)
