"""Low-latency CPU inference of a trained model, and its export to ONNX.

``InferenceSession(model)`` copies the weights of an ``MMoE``, ``OMoE`` or ``SharedBottom`` once,
packed into the C++ kernels' panel layout (mixture and towers), and ``run(x)`` answers ``[B, T]`` with
one call into ``mmoe_fast._C``: no autograd, no torch dispatch, nothing allocated but the output
(scratch buffers belong to the calling thread and are kept). Without ``_C`` it runs the model eagerly.
``export_onnx(model, path)`` writes the same model with standard ONNX operators and a dynamic batch.

For those three, both read the model through one whitelist (``_read_model``): exact classes (a subclass may
override ``forward``), exactly the submodules and parameters those classes create, no hooks, no buffers, one
dtype and device, consistent shapes and task counts. Anything else is an ``UnsupportedModelError`` naming the
module by its path in the model. Every other model of ``MODELS`` is traced (``_read_traced``): its own forward
through ``torch.onnx.export`` (the fused ops traced as their plain-PyTorch formulas), which onnxruntime runs.
A model on feature columns runs its encoder's lookups first (written as ONNX Gathers in an export). What is
packed or traced is then checked against the eager model on a probe batch.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_internals

from . import backends
from .backends import cpp
from .contract import ACTIVATION_CODES, ACTIVATIONS, TOLERANCE, tolerance
from .features import Categorical, Dense, FeatureEncoder, Multi, encode_inputs, num_rows, to_device
from .models import MMoE, MMoELayer, OMoE, OMoELayer, SharedBottom, Towers

__all__ = ["InferenceSession", "ProbeMismatchError", "UnsupportedModelError", "export_onnx"]

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
_TORCH_TYPES = (torch.Tensor, nn.Parameter)  # exact types: a tensor subclass may not be plain memory
_NUMPY_TYPES = (np.ndarray, np.memmap)  # exact types: np.ma.MaskedArray, say, would lose its mask
_PROBE_ROWS = 67  # more rows than one of the kernels' row blocks, and a ragged last block


class UnsupportedModelError(TypeError, ValueError):
    """The model holds something ``InferenceSession`` / ``export_onnx`` cannot reproduce exactly.

    A TypeError and a ValueError both, since it covers a wrong class as well as a wrong shape or count.
    """


class ProbeMismatchError(UnsupportedModelError, RuntimeError):
    """The packed (or exported) model answers a probe batch differently from the eager model."""


class _OutKindError(TypeError, ValueError):
    """``out`` of the wrong kind or dtype: a TypeError, and a ValueError as every bad ``out`` was before."""


# ---- reading a model: the whitelist -------------------------------------------------------------


@dataclass(frozen=True)
class _Dense:
    """One ``nn.Linear``: ``weight[out, in]``, ``bias[out]`` or None, then a ReLU or not."""

    weight: Tensor
    bias: Tensor | None
    relu: bool


@dataclass(frozen=True)
class _Mixture:
    """An MMoE/OMoE layer: expert layers ``W[E, K, N]``, ``b[E, N]``; gates ``Wg[G, D, E]``, ``bg[G, E]``."""

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor, ...]
    gate_weight: Tensor
    gate_bias: Tensor | None
    activation: str


@dataclass(frozen=True)
class _Spec:
    """Everything the packed and exported models compute, checked: ``x[B, in_features] -> [B, num_tasks]``."""

    in_features: int  # the dense width (a model on feature columns: what its encoder gives)
    num_tasks: int
    dtype: torch.dtype
    device: torch.device
    tolerance: float  # relative error allowed per task column on the probe batch
    bottom: tuple[_Dense, ...]  # SharedBottom's MLP (empty for MMoE/OMoE)
    mixture: _Mixture | None
    towers: tuple[tuple[_Dense, ...], ...]
    encoder: FeatureEncoder | None = None  # a model on feature columns: its embedding lookups, run first
    traced: bool = False  # not packed: the model's own forward, traced by torch.onnx.export


class _Reader:
    """Walks a model along the whitelist; every refusal names the module by its qualified path."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.tensors: list[tuple[str, Tensor]] = []

    def fail(self, path: str, module: nn.Module | None, why: str) -> UnsupportedModelError:
        where = f"'{path}'" if path else "the model"
        kind = f" ({type(module).__name__})" if module is not None else ""
        return UnsupportedModelError(f"{self.who} cannot reproduce {where}{kind}: {why}")

    def module(self, m: Any, path: str, types: tuple[type, ...], children: tuple[str, ...] | None,
               params: tuple[str, ...] = (), buffers: tuple[str, ...] = (), pre_hooks: tuple = ()) -> None:
        """Check ``m`` is exactly one of ``types`` with nothing changed that its forward would see.

        ``children``: its submodule names exactly (None: any, checked by the caller); ``params``: its own
        parameter names exactly, ``buffers`` its buffers'; ``pre_hooks``: its forward pre-hooks exactly.
        """
        if type(m) not in types:
            names = " or ".join(f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__name__
                                for t in types)
            raise self.fail(path, m, f"expected exactly {names} here (a subclass or another module may compute "
                                     "something else)")
        for attr in ("forward", "_call_impl"):  # Module.__call__ looks these up on the instance
            if attr in vars(m):
                raise self.fail(path, m, f"its {attr} is replaced on the instance")
        if m._forward_hooks or list(m._forward_pre_hooks.values()) != list(pre_hooks):
            raise self.fail(path, m, "it has forward hooks or pre-hooks, which may change its output")
        if set(m._buffers) != set(buffers):
            raise self.fail(path, m, f"it has buffers {sorted(m._buffers)}, which nothing packed would hold")
        if children is not None and list(m._modules) != list(children):
            raise self.fail(path, m, f"its submodules are {list(m._modules)}, expected {list(children)}")
        if set(m._parameters) != set(params):
            raise self.fail(path, m, f"its parameters are {sorted(m._parameters)}, expected {sorted(params)}")

    def tensor(self, t: Any, path: str, shape: tuple[int, ...] | None = None) -> Tensor:
        """A parameter's value, detached, after checking its kind (and ``shape`` when given)."""
        if type(t) not in _TORCH_TYPES:
            raise self.fail(path, None, f"expected a plain tensor or nn.Parameter, got {type(t).__name__}")
        if t.layout != torch.strided or not t.dtype.is_floating_point:
            raise self.fail(path, None, f"expected a dense floating-point tensor, got {t.layout} {t.dtype}")
        if shape is not None and tuple(t.shape) != shape:
            raise self.fail(path, None, f"has shape {tuple(t.shape)}, expected {shape}")
        if t.numel() == 0:
            raise self.fail(path, None, f"is empty (shape {tuple(t.shape)})")
        self.tensors.append((path, t))
        return t.detach().resolve_neg()  # a negative-bit view: its memory holds -values

    def dense(self, seq: Any, path: str, width: int | None, out_width: int | None) -> tuple[_Dense, ...]:
        """An ``nn.Sequential`` of ``nn.Linear`` and ``nn.ReLU`` from ``width`` (any when None) to ``out_width``
        (any when None)."""
        self.module(seq, path, (nn.Sequential,), None)
        layers: list[_Dense] = []
        for name, m in seq._modules.items():
            p = f"{path}.{name}"
            if type(m) is nn.Linear:
                self.module(m, p, (nn.Linear,), (), ("weight", "bias"))
                w = self.tensor(m.weight, f"{p}.weight")
                if w.dim() != 2 or (width is not None and w.shape[1] != width):
                    raise self.fail(p, m, f"its weight is {tuple(w.shape)}, expected [out, {width or 'in'}]")
                b = None if m.bias is None else self.tensor(m.bias, f"{p}.bias", (w.shape[0],))
                layers.append(_Dense(w, b, False))
                width = w.shape[0]
            elif type(m) is nn.ReLU:
                self.module(m, p, (nn.ReLU,), ())
                if not layers:
                    raise self.fail(p, m, "a ReLU before any nn.Linear is not packed")
                layers[-1] = replace(layers[-1], relu=True)  # relu(relu(h)) = relu(h)
            else:
                self.module(m, p, (nn.Linear, nn.ReLU), ())  # raises, naming what it is
        if not layers:
            raise self.fail(path, seq, "it holds no nn.Linear")
        if out_width is not None and width != out_width:
            raise self.fail(path, seq, f"it ends with {width} outputs, expected {out_width}")
        return tuple(layers)

    def mixture(self, layer: Any, path: str, layer_type: type, num_tasks: int) -> _Mixture:
        """The MMoE/OMoE layer: exactly ``layer_type``, its gate count that type's, shapes that chain."""
        self.module(layer, path, (layer_type,), ("expert_weights", "expert_biases"), ("gate_weight", "gate_bias"))
        own_tasks, activation = getattr(layer, "num_tasks", None), getattr(layer, "activation", None)
        if own_tasks != num_tasks:  # its forward expands one gate's mixture to num_tasks
            raise self.fail(path, layer, f"its num_tasks is {own_tasks!r} but the model's is {num_tasks}")
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise self.fail(path, layer, f"activation {activation!r} is not one of {ACTIVATIONS}")
        lists = []
        for name in ("expert_weights", "expert_biases"):
            plist = layer._modules[name]
            self.module(plist, f"{path}.{name}", (nn.ParameterList,), (), tuple(str(i) for i in range(len(plist))))
            lists.append([plist._parameters[str(i)] for i in range(len(plist))])
        if not lists[0] or len(lists[0]) != len(lists[1]):
            raise self.fail(path, layer, f"it has {len(lists[0])} expert weights and {len(lists[1])} expert biases")
        weights: list[Tensor] = []
        biases: list[Tensor] = []
        for i, (w, b) in enumerate(zip(*lists)):
            w = self.tensor(w, f"{path}.expert_weights.{i}")
            if w.dim() != 3 or (weights and w.shape[:2] != (weights[0].shape[0], weights[-1].shape[2])):
                want = "[E, D, N]" if not weights else f"[{weights[0].shape[0]}, {weights[-1].shape[2]}, N]"
                raise self.fail(f"{path}.expert_weights.{i}", None, f"has shape {tuple(w.shape)}, expected {want}")
            weights.append(w)
            biases.append(self.tensor(b, f"{path}.expert_biases.{i}", (w.shape[0], w.shape[2])))
        E, D = weights[0].shape[:2]
        gates = num_tasks if layer_type is MMoELayer else 1  # OMoE: one gate shared by every task
        wg = self.tensor(layer.gate_weight, f"{path}.gate_weight", (gates, D, E))
        bg = None if layer.gate_bias is None else self.tensor(layer.gate_bias, f"{path}.gate_bias", (gates, E))
        return _Mixture(tuple(weights), tuple(biases), wg, bg, activation)

    def encoder(self, enc: Any, path: str) -> FeatureEncoder:
        """A model's feature columns: exactly a FeatureEncoder of ``nn.EmbeddingBag`` sums that change nothing."""
        dense = [c.name for c in getattr(enc, "columns", ()) if isinstance(c, Dense)]
        self.module(enc, path, (FeatureEncoder,), ("bags",),
                    buffers=tuple(f"{stat}_{name}" for name in dense for stat in ("mean", "std")))
        bags = enc._modules["bags"]
        self.module(bags, f"{path}.bags", (nn.ModuleDict,), None)
        for key, bag in bags._modules.items():
            p = f"{path}.bags.{key}"
            self.module(bag, p, (nn.EmbeddingBag,), (), ("weight",))
            if bag.mode != "sum" or bag.max_norm is not None or bag.padding_idx is not None \
                    or bag.include_last_offset:
                raise self.fail(p, bag, "expected mode 'sum' with no max_norm, padding_idx or include_last_offset "
                                        "(as FeatureEncoder builds it)")
            self.tensor(bag.weight, f"{p}.weight")
        for name in enc._buffers:
            self.tensor(enc._buffers[name], f"{path}.{name}")
        return enc

    def towers(self, towers: Any, path: str, width: int, num_tasks: int) -> tuple[tuple[_Dense, ...], ...]:
        """One MLP per task, ``width -> ... -> 1``."""
        self.module(towers, path, (Towers,), ("towers",))
        mlist = towers._modules["towers"]
        self.module(mlist, f"{path}.towers", (nn.ModuleList,), None)
        if len(mlist) != num_tasks:
            raise self.fail(f"{path}.towers", mlist, f"it has {len(mlist)} towers for {num_tasks} tasks")
        return tuple(self.dense(tower, f"{path}.towers.{name}", width, 1) for name, tower in mlist._modules.items())


_LAYER_TYPES: dict[type, type | None] = {MMoE: MMoELayer, OMoE: OMoELayer, SharedBottom: None}


def _global_hooks() -> bool:
    """Whether ``nn.modules.module.register_module_forward_(pre_)hook`` hooks are set (they run on every module)."""
    return any(getattr(_module_internals, name, None)
               for name in ("_global_forward_hooks", "_global_forward_pre_hooks"))


def _read_model(model: Any, who: str) -> _Spec:
    """The model as a ``_Spec``, or an ``UnsupportedModelError`` naming what ``who`` cannot reproduce exactly."""
    if type(model) not in _LAYER_TYPES:
        raise UnsupportedModelError(f"{who} packs MMoE, OMoE or SharedBottom models (exactly those classes: a "
                                    f"subclass may compute something else), got {type(model).__name__}")
    r = _Reader(who)
    encoder = None
    columns: tuple[str, ...] = ()
    hooks: tuple = ()
    if "encoder" in getattr(model, "_modules", {}):  # built on feature columns: the encoder runs first
        encoder = r.encoder(model._modules["encoder"], "encoder")
        columns, hooks = ("encoder",), (encode_inputs,)
    if _global_hooks():
        raise r.fail("", model, "global forward hooks are registered (nn.modules.module.register_module_forward_"
                                "hook), which may change every module's output")
    num_tasks = getattr(model, "num_tasks", None)
    if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise r.fail("", model, f"num_tasks must be a positive int, got {num_tasks!r}")
    layer_type = _LAYER_TYPES[type(model)]
    bottom: tuple[_Dense, ...] = ()
    mixture = None
    if layer_type is not None:
        r.module(model, "", (type(model),), ("mixture", "towers", *columns), pre_hooks=hooks)
        mixture = r.mixture(model.mixture, "mixture", layer_type, num_tasks)
        in_features, width = mixture.weights[0].shape[1], mixture.weights[-1].shape[2]
    else:
        r.module(model, "", (SharedBottom,), ("bottom", "towers", *columns), pre_hooks=hooks)
        bottom = r.dense(model.bottom, "bottom", None, None)
        in_features, width = bottom[0].weight.shape[1], bottom[-1].weight.shape[0]
    if encoder is not None and encoder.out_features != in_features:
        raise r.fail("encoder", encoder, f"it gives {encoder.out_features} features but the model takes {in_features}")
    towers = r.towers(model.towers, "towers", width, num_tasks)
    dtype, device, promised = _one_dtype(r, model)
    if layer_type is not None:
        promised = max(promised, _backend_tolerance(r, model.mixture, device, dtype))
    depth = len(bottom) + (len(mixture.weights) if mixture else 0) + max(len(t) for t in towers)
    return _Spec(in_features, num_tasks, dtype, device, promised * depth, bottom, mixture, towers, encoder)


def _one_dtype(r: _Reader, model: Any) -> tuple[torch.dtype, torch.device, float]:
    """The one dtype and device of every tensor ``r`` read, and the contract's tolerance for that dtype."""
    if not r.tensors:
        raise r.fail("", model, "it has no parameters")
    path0, t0 = r.tensors[0]
    for path, t in r.tensors:
        if t.dtype != t0.dtype or t.device != t0.device:
            raise r.fail(path, None, f"is {t.dtype} on {t.device} but '{path0}' is {t0.dtype} on {t0.device} "
                                     "(every parameter must share one dtype and one device)")
    promised = TOLERANCE.get(t0.dtype)
    if promised is None:
        raise r.fail("", model, f"dtype {t0.dtype} has no tolerance in mmoe_fast.contract.TOLERANCE")
    return t0.dtype, t0.device, promised


# Every other model of MODELS is read as it is and traced (its probe tolerance: the contract's per layer, for
# this many layers).
_TRACED_DEPTH = 8


def _read_traced(model: Any, who: str) -> _Spec:
    """A model of ``MODELS`` outside the packed kinds: its forward is traced as it is, so only what tracing
    would miss is checked (hooks on the model itself, which the trace of its forward skips)."""
    r = _Reader(who)
    encoder: FeatureEncoder | None = None
    hooks: tuple = ()
    if "encoder" in model._modules:  # built on feature columns: the lookups run first, outside the trace
        encoder, hooks = r.encoder(model._modules["encoder"], "encoder"), (encode_inputs,)
    if model._forward_hooks or list(model._forward_pre_hooks.values()) != list(hooks):
        raise r.fail("", model, "it has forward hooks or pre-hooks, which may change its output")
    for name, t in model.named_parameters():
        r.tensor(t, name)
    dtype, device, promised = _one_dtype(r, model)
    num_tasks = getattr(model, "num_tasks", None)
    if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise r.fail("", model, f"num_tasks must be a positive int, got {num_tasks!r}")
    in_features = encoder.out_features if encoder is not None else model.config()["in_features"]
    return _Spec(in_features, num_tasks, dtype, device, promised * _TRACED_DEPTH, (), None, (), encoder, traced=True)


def _read(model: Any, who: str) -> _Spec:
    """The packed spec of an MMoE, OMoE or SharedBottom, the traced spec of any other model of ``MODELS``."""
    if type(model) in _LAYER_TYPES:
        return _read_model(model, who)
    from .models import MODELS

    if type(model) not in set(MODELS.values()):
        raise UnsupportedModelError(
            f"{who} takes the models of mmoe_fast.models.MODELS (exactly those classes: a subclass may compute "
            f"something else), got {type(model).__name__}; export any other module with torch.onnx.export (the "
            "fused ops become standard ONNX operators there)")
    if _global_hooks():
        raise _Reader(who).fail("", model, "global forward hooks are registered (nn.modules.module.register_module_"
                                           "forward_hook), which may change every module's output")
    return _read_traced(model, who)


def _backend_tolerance(r: _Reader, layer: Any, device: torch.device, dtype: torch.dtype) -> float:
    """The relative error the layer's ``backend`` promises; refused when that backend cannot run the model."""
    backend = getattr(layer, "backend", None)
    if not isinstance(backend, str):
        raise r.fail("mixture", layer, f"its backend must be a backend's name, got {backend!r}")
    try:
        module = backends.resolve(backend, device, dtype)
    except (ValueError, TypeError) as exc:  # the eager model could not run either
        raise r.fail("mixture", layer, f"its backend cannot run the model: {exc}") from exc
    return tolerance(module, dtype)


# ---- the probe check ----------------------------------------------------------------------------


def _probe_batch(spec: _Spec):
    """A seeded ``x[_PROBE_ROWS, D]`` in the model's dtype, from its own generator (the caller's RNG is untouched);
    for a model on feature columns, a dict of them: ids over each vocabulary, multi-valued rows of 0 to 3 ids."""
    gen = torch.Generator().manual_seed(0)
    if spec.encoder is None:
        return torch.randn(_PROBE_ROWS, spec.in_features, generator=gen, dtype=torch.float64).to(spec.dtype)
    batch: dict[str, Tensor] = {}
    for c in spec.encoder.columns:
        if isinstance(c, Categorical):
            batch[c.name] = torch.randint(0, c.vocab, (_PROBE_ROWS,), generator=gen)
        elif isinstance(c, Multi):
            ids = torch.randint(0, c.vocab, (_PROBE_ROWS, 3), generator=gen)
            count = torch.arange(_PROBE_ROWS) % 4  # 0 to 3 ids a row, the padding at the end
            batch[c.name] = torch.where(torch.arange(3)[None, :] < count[:, None], ids, -1)
        else:
            v = torch.randn(_PROBE_ROWS, c.dim, generator=gen, dtype=torch.float64).to(spec.dtype)
            batch[c.name] = v[:, 0] if c.dim == 1 else v  # as export_onnx's inputs take them
    return batch


def _probes(spec: _Spec) -> list:
    """The probe batch, and its first row alone (a traced graph must not have kept the batch size)."""
    x = _probe_batch(spec)
    return [x, {k: v[:1] for k, v in x.items()} if isinstance(x, dict) else x[:1]]


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _eager_answer(model: nn.Module, spec: _Spec, x: Tensor, who: str) -> Tensor:
    """``model(x)`` on the model's device, as a CPU tensor; a ProbeMismatchError when it fails or is no ``[B, T]``."""
    try:
        with torch.no_grad():
            want = model(to_device(x, spec.device))
    except Exception as exc:  # whatever the model raised, the packed copy cannot be checked against it
        raise ProbeMismatchError(f"{who}: the eager model fails on the probe batch: "
                                 f"{type(exc).__name__}: {exc}") from exc
    rows = num_rows(x)
    if type(want) not in _TORCH_TYPES or tuple(want.shape) != (rows, spec.num_tasks) or want.dtype != spec.dtype:
        got = f"{type(want).__name__} {tuple(getattr(want, 'shape', ()))} {getattr(want, 'dtype', '')}".strip()
        raise ProbeMismatchError(f"{who}: the eager model answers the probe batch of {rows} rows with {got}, "
                                 f"not a {spec.dtype} tensor of shape {(rows, spec.num_tasks)}")
    return want.detach().cpu()


def _nonfinite(t: Tensor) -> Tensor:
    """``t`` with every finite entry 0 and NaN, +inf, -inf as distinct codes (NaN never equals NaN)."""
    return torch.where(torch.isfinite(t), 0.0, torch.nan_to_num(t, nan=1.0, posinf=2.0, neginf=-2.0))


def _check_probe(got: Tensor, want: Tensor, spec: _Spec, who: str, what: str) -> None:
    """Raise a ProbeMismatchError unless ``got`` (what ``what`` answered) equals the eager ``want[B, T]``:
    NaN and infinities in the same places, and each task's column within ``spec.tolerance`` relative error."""
    got, want = got.double(), want.double()
    if not torch.equal(_nonfinite(got), _nonfinite(want)):
        raise ProbeMismatchError(f"{who}: {what} has NaN or infinities where the eager model has none (or the "
                                 "reverse) on the probe batch")
    finite = torch.isfinite(want)
    diff, ref = torch.where(finite, got - want, 0.0), torch.where(finite, want, 0.0)
    err = diff.norm(dim=0) / ref.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    task = int(err.argmax())
    if err[task] > spec.tolerance:
        raise ProbeMismatchError(
            f"{who}: {what} differs from the eager model on the probe batch x[{got.shape[0]}, {spec.in_features}]: "
            f"task {task} has relative error {float(err[task]):.3g} > {spec.tolerance:.3g} (mmoe_fast.contract's "
            f"{spec.dtype} tolerance times the model's depth)")


# ---- the session --------------------------------------------------------------------------------


def _span(t: Tensor) -> tuple[int, int]:
    """The byte range ``[start, end)`` that a strided tensor's elements lie in (empty for no elements)."""
    if t.numel() == 0:
        return 0, 0
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class _Lookups:
    """A session's feature-column lookups in a few ops: each table its own weight behind a zero row (so an id
    outside the table fails inside torch's lookup, and a multi-valued row's -1 pads read the zero row),
    categorical columns by ``F.embedding``, multi-valued ones by ``F.embedding_bag`` (``padding_idx`` 0: pads
    are neither summed nor counted, as the encoder's pooling). Any input it cannot take as it is (another
    shape or dtype, ``(ids, offsets)``, a failed lookup) goes through the encoder itself, which answers it or
    raises its error naming the column."""

    def __init__(self, encoder: FeatureEncoder) -> None:
        self.encoder = encoder
        self.tables: dict[str, Tensor] = {}
        for c in encoder.columns:
            table = getattr(c, "table", None) or c.name
            if not isinstance(c, Dense) and table not in self.tables:
                w = encoder.table_weight(table).detach()
                self.tables[table] = torch.cat([w.new_zeros(1, w.shape[1]), w]).contiguous()
        self.dense = {c.name: (getattr(encoder, f"mean_{c.name}"), getattr(encoder, f"std_{c.name}"))
                      for c in encoder.columns if isinstance(c, Dense)}

    def __call__(self, batch: Mapping) -> Tensor:
        with torch.inference_mode():
            try:
                x = self._fast(batch)
            except (KeyError, IndexError, RuntimeError, TypeError, ValueError):
                x = None
            return self.encoder(batch) if x is None else x

    def _fast(self, batch: Mapping) -> Tensor | None:
        parts, rows = [], None
        for c in self.encoder.columns:
            value = batch[c.name]
            if isinstance(value, (tuple, list)) and isinstance(c, Multi):  # the encoder reads an (ids, offsets) pair
                return None
            v = torch.as_tensor(value)
            if rows is None:
                rows = v.shape[0] if v.dim() else -1
            if isinstance(c, Dense):
                if (v.shape != (rows, c.dim) and not (c.dim == 1 and v.shape == (rows,))) or not v.is_floating_point():
                    return None
                mean, std = self.dense[c.name]
                parts.append((v.reshape(rows, c.dim).to(mean.dtype) - mean) / std)
                continue
            if v.dtype not in (torch.int64, torch.int32):
                return None
            w = self.tables[getattr(c, "table", None) or c.name]
            if isinstance(c, Categorical):
                if v.shape != (rows,):
                    return None
                parts.append(F.embedding(v, w[1:]))
            else:
                if v.dim() != 2 or v.shape[0] != rows:
                    return None
                parts.append(F.embedding_bag(v + 1, w, mode=c.pooling, padding_idx=0))
        return torch.cat(parts, dim=1)


class InferenceSession:
    """A trained model packed for CPU inference: ``run(x[B, D]) -> [B, T]``, equal to ``model.eval()(x)``.

    ``x`` is a torch tensor or a numpy array (the answer has the same kind), in the model's dtype
    (float32 or float64 runs the C++ kernels). The session is a snapshot: later changes to the model's
    weights do not reach it. ``run`` releases the GIL; any number of threads may call it at once.
    A NaN in a row of ``x`` gives NaN in every task of that row, as the eager model does.

    A model built on feature columns (``mmoe_fast.features``) takes the dict of column tensors (or numpy
    arrays) instead of ``x``: its embedding lookups run first (``_Lookups``: copies of its tables, read by
    ``F.embedding``/``F.embedding_bag``; any other input through a copy of its encoder, which names a bad
    column), then the packed or traced model; the answer is a tensor.

    Building it refuses (``UnsupportedModelError``, naming the module) any model it cannot reproduce exactly,
    and checks the packed model against the eager one on a seeded probe batch (``ProbeMismatchError``).
    """

    def __init__(self, model: nn.Module) -> None:
        who = "InferenceSession"
        spec = _read(model, who)
        if spec.device.type != "cpu":
            raise UnsupportedModelError(f"InferenceSession runs on the CPU; the model is on {spec.device} "
                                        "(use model.cpu())")
        self.dtype, self.num_tasks, self.in_features = spec.dtype, spec.num_tasks, spec.in_features
        self._encoder = None if spec.encoder is None else _Lookups(copy.deepcopy(spec.encoder).eval())
        if not spec.traced and cpp.unavailable_reason() is None and cpp.supports(spec.device, spec.dtype):
            self._backend = "cpp"
            with torch.no_grad():
                self._session = self._pack(spec)
            what = "the packed model"
        elif spec.traced and spec.dtype in _ONNX_TYPES and _have("onnx") and _have("onnxruntime"):
            import onnxruntime

            self._backend = "onnxruntime"
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            graph = _traced_graph(model, spec, _SESSION_OPSET, who).SerializeToString()
            self._ort = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
            what = "the traced model (onnxruntime)"
        else:  # no _C or onnxruntime (or a dtype they lack): the eager model itself, on a private copy
            self._backend = "eager"
            self._model = copy.deepcopy(model).eval()
            self._lock = threading.Lock()
            return
        for x in _probes(spec):
            _check_probe(self.run(x), _eager_answer(model, spec, x, who), spec, who, what)

    @property
    def backend(self) -> str:
        """``"cpp"`` when the packed C++ model answers (MMoE, OMoE, SharedBottom), ``"onnxruntime"`` when the
        traced graph of another model does, ``"eager"`` when the model itself runs (without those)."""
        return self._backend

    def _traced_run(self, x: Tensor) -> Tensor:
        """The traced graph's ``[B, T]`` for a contiguous CPU ``x[B, D]`` (a B of 0 runs nothing)."""
        if x.shape[0] == 0:
            return torch.empty(0, self.num_tasks, dtype=self.dtype)
        return torch.from_numpy(self._ort.run(None, {"x": x.detach().numpy()})[0])

    def _pack(self, spec: _Spec):
        """The ``_C.Session`` holding ``spec``'s weights (it copies them into its own panels)."""

        def c(t: Tensor | None) -> Tensor | None:  # an optional bias
            return None if t is None else t.contiguous()

        def ptr(t: Tensor | None) -> int:
            return 0 if t is None else t.data_ptr()

        session = cpp.session_class(self.dtype)(self.in_features, self.num_tasks)
        if spec.mixture is not None:
            mix = spec.mixture
            act = ACTIVATION_CODES[mix.activation]
            ws, bs = [w.contiguous() for w in mix.weights], [c(b) for b in mix.biases]
            for w, b in zip(ws[:-1], bs[:-1]):
                session.add_hidden(ptr(w), ptr(b), *w.shape, act)
            wg, bg = mix.gate_weight.contiguous(), c(mix.gate_bias)
            session.set_mixture(ptr(ws[-1]), ptr(bs[-1]), *ws[-1].shape, act, ptr(wg), ptr(bg), wg.shape[0])
        for dense in spec.bottom:  # a one-expert hidden layer W[1, in, out]
            w, b = dense.weight.t()[None].contiguous(), c(None if dense.bias is None else dense.bias[None])
            session.add_hidden(ptr(w), ptr(b), *w.shape, ACTIVATION_CODES["relu" if dense.relu else "identity"])
        for t, tower in enumerate(spec.towers):
            for dense in tower:
                w, b = dense.weight.contiguous(), c(dense.bias)
                session.add_tower_layer(t, ptr(w), ptr(b), w.shape[1], w.shape[0], dense.relu)
        return session

    def _reject(self, x) -> None:
        """Raise the error that says what is wrong with ``x``."""
        if type(x) not in _TORCH_TYPES + _NUMPY_TYPES:
            hint = " (convert it with torch.as_tensor or numpy.asarray)" if isinstance(x, (list, tuple)) else ""
            raise TypeError(f"x must be a torch.Tensor or a numpy.ndarray, got {type(x).__name__}{hint}")
        if isinstance(x, torch.Tensor) and x.layout != torch.strided:
            raise TypeError(f"x must be a dense (strided) tensor, got layout {x.layout}")
        if len(x.shape) != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape [B, D] = [?, {self.in_features}], got {tuple(x.shape)}")
        if isinstance(x, torch.Tensor) and x.device.type != "cpu":
            raise ValueError(f"x is on device {x.device} but the session runs on the CPU")
        raise TypeError(f"x has dtype {x.dtype} but the session runs {self.dtype}")

    def _check_out(self, x, out) -> None:
        """Raise unless ``out`` is a writable, contiguous ``[B, T]`` buffer of ``x``'s kind and dtype, apart from x."""
        shape = (x.shape[0], self.num_tasks)
        if isinstance(x, torch.Tensor):
            if type(out) not in _TORCH_TYPES:
                raise _OutKindError(f"out must be a torch.Tensor since x is one, got {type(out).__name__}")
            if out.layout != torch.strided or not out.is_cpu:
                raise ValueError(f"out must be a dense CPU tensor, got {out.layout} on {out.device}")
            if out.dtype != self.dtype:
                raise _OutKindError(f"out has dtype {out.dtype} but the session runs {self.dtype}")
            if out.requires_grad:  # a raw write would bypass autograd
                raise ValueError("out requires grad; pass a tensor that does not (e.g. torch.empty(B, T))")
            if out.is_neg():  # its memory holds -values: a raw write would read back negated
                raise ValueError("out is a negative-bit view (torch._neg_view); pass a plain tensor")
            if tuple(out.shape) != shape or not out.is_contiguous() or out.data_ptr() % out.element_size():
                raise ValueError(f"out must be a contiguous, aligned {self.dtype} tensor of shape {shape}, got "
                                 f"shape {tuple(out.shape)}, strides {out.stride()}")
            (x0, x1), (o0, o1) = _span(x), _span(out)
            if x0 < o1 and o0 < x1:
                raise ValueError("out overlaps x in memory; pass a separate buffer")
            return
        if type(out) not in _NUMPY_TYPES:
            raise _OutKindError(f"out must be a numpy.ndarray since x is one, got {type(out).__name__}")
        if out.dtype != x.dtype:
            raise _OutKindError(f"out has dtype {out.dtype} but the session runs {x.dtype}")
        if not out.flags.writeable:
            raise ValueError("out is read-only; pass a writable array")
        if out.shape != shape or not (out.flags.c_contiguous and out.flags.aligned):
            raise ValueError(f"out must be a C-contiguous, aligned {x.dtype} array of shape {shape}, got shape "
                             f"{out.shape}, strides {out.strides}")
        if np.may_share_memory(x, out) and np.shares_memory(x, out):  # bounds first: the exact test can be slow
            raise ValueError("out overlaps x in memory; pass a separate buffer")

    def run(self, x, out=None):
        """Every task's output ``[B, T]`` for ``x[B, D]`` (torch tensor or numpy array, the model's dtype), or
        for a model on feature columns, for its dict of column tensors (a tensor answer).

        ``x`` may be non-contiguous or read-only (it is only read). ``out``: an optional writable, contiguous
        ``[B, T]`` buffer of the same kind and dtype as ``x``, not overlapping it, to write into (then nothing
        at all is allocated); a tensor ``out`` must not require grad. Each wrong kind is a TypeError or
        ValueError saying what. One cannot be told apart: a tensor over read-only memory (``torch.from_numpy``
        of a read-only array, which torch warns about); pass a numpy ``out`` for such memory instead.
        """
        if self._encoder is not None:
            return self._run_columns(x, out)
        if type(x) in _TORCH_TYPES:  # checks kept few and cheap: at B = 1 they are part of the latency
            if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype != self.dtype or not x.is_cpu \
                    or x.layout != torch.strided:
                self._reject(x)
            if out is not None:
                self._check_out(x, out)
            if x.is_neg() or not x.is_contiguous() or x.data_ptr() % x.element_size():
                # plain, aligned memory (the fused ops, too, read a negative-bit view's memory as it is)
                x = x.detach().clone(memory_format=torch.contiguous_format)
            if self._backend == "onnxruntime":
                y = self._traced_run(x)
                return y if out is None else self._wrote(out.copy_(y))
            if self._backend == "eager":
                with self._lock, torch.inference_mode():
                    y = self._model(x)
                return y if out is None else out.copy_(y)
            B = x.shape[0]
            if out is None:
                out = torch.empty(B, self.num_tasks, dtype=self.dtype)
                if B:
                    self._session.run(x.data_ptr(), out.data_ptr(), B)
                return out
            if B:
                self._session.run(x.data_ptr(), out.data_ptr(), B)
            return self._wrote(out)
        if type(x) not in _NUMPY_TYPES or x.ndim != 2 or x.shape[1] != self.in_features \
                or x.dtype != _NUMPY.get(self.dtype):
            self._reject(x)
        if out is not None:
            self._check_out(x, out)
        if not (x.flags.c_contiguous and x.flags.aligned):
            x = np.array(x, order="C")  # a copy is aligned; ascontiguousarray keeps an unaligned one
        if self._backend != "cpp":
            y = self.run(torch.from_numpy(x if x.flags.writeable else x.copy())).numpy()
            return y if out is None else np.copyto(out, y) or out
        if out is None:
            out = np.empty((x.shape[0], self.num_tasks), dtype=x.dtype)
        if x.shape[0]:
            self._session.run(x.ctypes.data, out.ctypes.data, x.shape[0])
        return out

    def _run_columns(self, batch, out):
        if not isinstance(batch, Mapping):
            raise TypeError(f"this session's model is built on feature columns: run takes a dict of column tensors "
                            f"({', '.join(repr(c.name) for c in self._encoder.encoder.columns)}), got "
                            f"{type(batch).__name__}")
        if self._backend == "eager":
            with self._lock, torch.inference_mode():
                y = self._model(batch)
            if out is None:
                return y.clone()  # a normal tensor, not an inference-mode one
            self._check_out(y, out)
            return self._wrote(out.copy_(y))
        x = self._encoder(batch)
        if self._backend == "onnxruntime":
            y = self._traced_run(x)
            if out is None:
                return y
            self._check_out(x, out)
            return self._wrote(out.copy_(y))
        B = x.shape[0]
        if out is None:
            out = torch.empty(B, self.num_tasks, dtype=self.dtype)
        else:
            self._check_out(x, out)
        if B:
            self._session.run(x.data_ptr(), out.data_ptr(), B)
        return self._wrote(out)

    @staticmethod
    def _wrote(out: Tensor) -> Tensor:
        """``out``, its version counter bumped: autograd then sees the write (a tensor saved for backward)."""
        torch.autograd.graph.increment_version(out)
        return out

    __call__ = run


# ---- ONNX -----------------------------------------------------------------------------------------

_ONNX_TYPES = {torch.float32: 1, torch.float64: 11}  # onnx.TensorProto.FLOAT, DOUBLE
_MIN_OPSET = 13  # Softmax over one axis (not the flattened trailing dims) since opset 13


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class _Graph:
    """A small builder over onnx.helper: every node gets a fresh output name."""

    def __init__(self, dtype: torch.dtype) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.dtype = dtype
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def const(self, value, name: str, integer: bool = False) -> str:
        arr = np.asarray(value, dtype=np.int64 if integer else _NUMPY[self.dtype])
        name = f"{name}_{len(self.inits)}"
        self.inits.append(self.numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def act(self, h: str, activation: str) -> str:
        if activation == "relu":
            return self.op("Relu", h)
        if activation == "silu":
            return self.op("Mul", h, self.op("Sigmoid", h))
        if activation == "gelu":  # tanh form, as the kernels: 0.5 h (1 + tanh(c (h + a h^3)))
            cube = self.op("Mul", self.op("Mul", h, h), h)
            inner = self.op("Mul", self.op("Add", h, self.op("Mul", cube, self.const(0.044715, "gelu_a"))),
                            self.const(0.7978845608028654, "gelu_c"))
            one_plus = self.op("Add", self.op("Tanh", inner), self.const(1.0, "one"))
            return self.op("Mul", self.op("Mul", h, one_plus), self.const(0.5, "half"))
        if activation == "identity":
            return h
        raise ValueError(f"no ONNX form for activation {activation!r}")  # _read_model admits only ACTIVATIONS

    def linear(self, h: str, dense: _Dense) -> str:
        h = self.op("MatMul", h, self.const(_np(dense.weight).T, "w"))
        if dense.bias is not None:
            h = self.op("Add", h, self.const(_np(dense.bias), "b"))
        return self.op("Relu", h) if dense.relu else h


def _mixture_graph(g: _Graph, x: str, mix: _Mixture) -> str:
    """M[B, G, H] of an MMoE/OMoE layer (G gates)."""
    ws, bs = [_np(w) for w in mix.weights], [_np(b) for b in mix.biases]
    E = ws[0].shape[0]
    # First expert layer on the shared x: one MatMul [B, D] x [D, E*N], then [B, E, N] -> [E, B, N].
    w0, b0 = ws[0], bs[0]
    h = g.op("MatMul", x, g.const(w0.transpose(1, 0, 2).reshape(w0.shape[1], -1), "w"))
    h = g.act(g.op("Add", h, g.const(b0.reshape(-1), "b")), mix.activation)
    h = g.op("Reshape", h, g.const([0, E, w0.shape[2]], "shape", integer=True))
    if len(ws) > 1:
        h = g.op("Transpose", h, perm=[1, 0, 2])
        for w, b in zip(ws[1:], bs[1:]):  # deeper layers: batched MatMul [E, B, K] x [E, K, N]
            h = g.op("Add", g.op("MatMul", h, g.const(w, "w")), g.const(b[:, None, :], "b"))
            h = g.act(h, mix.activation)
        h = g.op("Transpose", h, perm=[1, 0, 2])
    wg = _np(mix.gate_weight)
    G = wg.shape[0]
    logits = g.op("MatMul", x, g.const(wg.transpose(1, 0, 2).reshape(wg.shape[1], -1), "wg"))
    if mix.gate_bias is not None:
        logits = g.op("Add", logits, g.const(_np(mix.gate_bias).reshape(-1), "bg"))
    gates = g.op("Softmax", g.op("Reshape", logits, g.const([0, G, E], "shape", integer=True)), axis=-1)
    return g.op("MatMul", gates, h)


_INT64 = 7  # onnx.TensorProto.INT64
_SESSION_OPSET = 18
# torch.onnx.export's exporter for a traced model: the torch.export-based one (which needs onnxscript and
# writes opset 18 or later) when it can, else the TorchScript-based one. Both translate the fused ops
# through their plain-PyTorch formulas (ops._call).
_DYNAMO_EXPORTER = True
_DYNAMO_MIN_OPSET = 18


class _Trunk(nn.Module):
    """A model's own forward, without its hooks (a model on feature columns: from its encoded ``x``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward(x)


def _torch_onnx(module: nn.Module, x: Tensor, opset: int, who: str):
    """``module`` traced on ``x[B, D]`` by ``torch.onnx.export``: an ``onnx.ModelProto`` from input ``x`` to output
    ``y``, batch dynamic; the exporter's chatter silenced, its failure an UnsupportedModelError."""
    import onnx

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if _DYNAMO_EXPORTER and opset >= _DYNAMO_MIN_OPSET and _have("onnxscript"):
                program = torch.onnx.export(module, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                                            opset_version=opset, verbose=False,
                                            dynamic_shapes=({0: torch.export.Dim("batch")},))
                if program is None:  # only when asked for no program (an f given): never here
                    raise RuntimeError("torch.onnx.export returned no program")
                return program.model_proto
            f: Any = io.BytesIO()  # the TorchScript exporter writes to any file object
            torch.onnx.export(module, (x,), f, dynamo=False, input_names=["x"], output_names=["y"],
                              opset_version=opset, dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
            return onnx.load_from_string(f.getvalue())
    except Exception as exc:  # whatever the exporter raised: the model cannot be traced as it is
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(f"{who}: torch.onnx.export cannot trace the {type(module.model).__name__}: "
                                    f"{type(exc).__name__}: {first}") from exc
    finally:
        logger.setLevel(level)


def _traced_graph(model: nn.Module, spec: _Spec, opset: int, who: str, with_columns: bool = False):
    """The ONNX model of a traced spec: ``x[batch, D] -> y[batch, T]``, or (``with_columns``) from the feature
    columns' inputs, the lookups written as in ``export_onnx`` and joined to the traced rest."""
    import onnx

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(_PROBE_ROWS, spec.in_features, generator=gen, dtype=torch.float64).to(spec.dtype)
    with torch.no_grad():
        proto = _torch_onnx(_Trunk(copy.deepcopy(model).eval()), x.to(spec.device), opset, who)
    if not with_columns or spec.encoder is None:
        return proto
    g = _Graph(spec.dtype)
    x_out, inputs = _encoder_graph(g, spec.encoder)
    g.nodes.append(onnx.helper.make_node("Identity", [x_out], ["x"]))
    version = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    columns = onnx.helper.make_model(
        onnx.helper.make_graph(g.nodes, "columns", inputs, [onnx.helper.make_tensor_value_info(
            "x", _ONNX_TYPES[spec.dtype], ["batch", spec.in_features])], g.inits),
        opset_imports=[onnx.helper.make_opsetid("", version)])
    columns.ir_version = proto.ir_version
    merged = onnx.compose.merge_models(columns, proto, io_map=[("x", "x")], prefix2="model/", outputs=["model/y"],
                                       producer_name="mmoe_fast")
    merged.graph.node.append(onnx.helper.make_node("Identity", ["model/y"], ["y"]))
    merged.graph.output[0].name = "y"
    return merged


def _encoder_graph(g: _Graph, encoder: FeatureEncoder) -> tuple[str, list]:
    """``x[B, D]`` of a model's feature columns, and the graph's inputs: one per column, named after it
    (categorical ids ``int64[batch]``, multi-valued ids ``int64[batch, L]`` padded with -1, dense
    ``[batch]`` for one number, else ``[batch, dim]``). An id outside its table (but a -1 pad) fails the run."""
    helper = g.helper
    inputs, parts, tables = [], [], {}
    elem = _ONNX_TYPES[g.dtype]
    for c in encoder.columns:
        if isinstance(c, Dense):
            inputs.append(helper.make_tensor_value_info(c.name, elem, ["batch"] if c.dim == 1 else ["batch", c.dim]))
            v = g.op("Reshape", c.name, g.const([-1, c.dim], "shape", integer=True))
            mean, std = (_np(getattr(encoder, f"{stat}_{c.name}")) for stat in ("mean", "std"))
            parts.append(g.op("Div", g.op("Sub", v, g.const(mean, "mean")), g.const(std, "std")))
            continue
        table = c.table or c.name
        if table not in tables:
            tables[table] = g.const(_np(encoder.table_weight(table)), f"table_{table}")
        # ONNX's Gather reads a negative index from the table's end: any negative id but a pad is sent past the
        # table's end instead, where onnxruntime fails the run (as the eager encoder refuses it).
        past_end = g.const(c.vocab, "past_end", integer=True)
        ids = g.op("Where", g.op("Less", c.name, g.const(0, "zero", integer=True)), past_end, c.name)
        if isinstance(c, Categorical):
            inputs.append(helper.make_tensor_value_info(c.name, _INT64, ["batch"]))
            parts.append(g.op("Gather", tables[table], ids, axis=0))
            continue
        inputs.append(helper.make_tensor_value_info(c.name, _INT64, ["batch", f"{c.name}_length"]))
        present = g.op("Not", g.op("Equal", c.name, g.const(-1, "pad", integer=True)))
        rows = g.op("Gather", tables[table], g.op("Where", present, ids, g.const(0, "zero", integer=True)), axis=0)
        weight = g.op("Cast", present, to=elem)  # [B, L]: 1 for an id, 0 for padding
        axis = g.const([1], "axis", integer=True)
        pooled = g.op("ReduceSum", g.op("Mul", rows, g.op("Unsqueeze", weight, g.const([2], "axis", integer=True))),
                      axis, keepdims=0)
        if c.pooling == "mean":  # a row without ids pools to 0, as the eager encoder
            count = g.op("ReduceSum", weight, axis, keepdims=1)
            pooled = g.op("Div", pooled, g.op("Max", count, g.const(1.0, "one")))
        parts.append(pooled)
    x = g.op("Concat", *parts, axis=1)
    taken = {"x", "y"} | {i.name for i in g.inits} | {o for n in g.nodes for o in n.output}
    clash = sorted({c.name for c in encoder.columns} & taken)
    if clash:
        raise UnsupportedModelError(f"export_onnx names the graph's inputs after the feature columns, and column(s) "
                                    f"{clash} would clash with a name the graph uses: rename the column(s)")
    return x, inputs


def export_onnx(model: nn.Module, path: str | Path, *, opset: int = 17) -> None:
    """Write ``model`` (any model of ``MODELS``) to ``path`` as ONNX: input ``x[batch, D]``, output ``y[batch, T]``,
    standard operators only (MatMul, Add, Softmax, Relu, ...). Needs ``onnx``. MMoE, OMoE and SharedBottom are
    written from their weights; every other model is traced by ``torch.onnx.export`` (see ``_traced_graph``).
    A model on feature columns takes one input per column instead, named after it: categorical ids
    ``int64[batch]``, multi-valued ids ``int64[batch, L]`` padded with -1 (the ``(ids, offsets)`` form has no
    ONNX input), dense values ``[batch]`` (``[batch, dim]`` for a wider column); its tables are Gathers.

    The model is read as ``InferenceSession`` reads it (``UnsupportedModelError`` for what it cannot write
    exactly). With ``onnxruntime`` installed the graph is run on a seeded probe batch and compared with the
    eager model before anything is written (``ProbeMismatchError``); without it only ``onnx.checker`` checks
    the graph, and a warning says its answers went unchecked.
    """
    try:
        import onnx
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("export_onnx needs the 'onnx' package: pip install 'mmoe-fast[onnx]'") from exc
    who = "export_onnx"
    spec = _read(model, who)
    if spec.dtype not in _ONNX_TYPES:
        raise UnsupportedModelError(f"export_onnx writes float32 or float64 models, got {spec.dtype}")
    if spec.device.type == "meta":
        raise UnsupportedModelError("export_onnx needs the model's weights; it is on the meta device")
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not _MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an int from {_MIN_OPSET} to {newest} (this onnx), got {opset!r}")
    if spec.traced:
        proto = _traced_graph(model, spec, opset, who, with_columns=True)
        onnx.checker.check_model(proto)
        _check_onnx(proto.SerializeToString(), model, spec)
        onnx.save(proto, str(path))
        return
    g = _Graph(spec.dtype)
    elem = _ONNX_TYPES[spec.dtype]
    if spec.encoder is None:
        x, inputs = "x", [onnx.helper.make_tensor_value_info("x", elem, ["batch", spec.in_features])]
    else:
        x, inputs = _encoder_graph(g, spec.encoder)
    if spec.mixture is not None:
        mixed = _mixture_graph(g, x, spec.mixture)
        gates = spec.mixture.gate_weight.shape[0]
        index = [g.const(t if gates > 1 else 0, "task", integer=True) for t in range(spec.num_tasks)]
        heads = [g.op("Gather", mixed, i, axis=1) for i in index]
    else:
        h = x
        for dense in spec.bottom:
            h = g.linear(h, dense)
        heads = [h] * spec.num_tasks
    outs = []
    for tower, h in zip(spec.towers, heads):
        for dense in tower:
            h = g.linear(h, dense)
        outs.append(h)
    y = g.op("Concat", *outs, axis=1)
    g.nodes.append(onnx.helper.make_node("Identity", [y], ["y"]))
    graph = onnx.helper.make_graph(g.nodes, type(model).__name__, inputs,
                                   [onnx.helper.make_tensor_value_info("y", elem, ["batch", spec.num_tasks])], g.inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                   producer_name="mmoe_fast")
    onnx.checker.check_model(proto)
    _check_onnx(proto.SerializeToString(), model, spec)
    onnx.save(proto, str(path))


def _check_onnx(serialized: bytes, model: nn.Module, spec: _Spec) -> None:
    """Run the graph with onnxruntime on the probe batch and compare it with the eager model (a warning
    without onnxruntime)."""
    try:
        import onnxruntime
    except ModuleNotFoundError:
        warnings.warn("export_onnx: onnxruntime is not installed, so the exported graph was checked by "
                      "onnx.checker but its answers were not compared with the model", stacklevel=3)
        return
    sess = onnxruntime.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    for x in _probes(spec):
        feed = {k: v.numpy() for k, v in x.items()} if isinstance(x, dict) else {"x": x.numpy()}
        (got,) = sess.run(None, feed)
        _check_probe(torch.from_numpy(got), _eager_answer(model, spec, x, "export_onnx"), spec, "export_onnx",
                     "the ONNX graph (onnxruntime)")
