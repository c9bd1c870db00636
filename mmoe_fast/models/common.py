"""What every multi-task model shares: the base class (task types, constructor record), the towers, and the
size checks and initialization of the layers.

Every model maps ``x[B, D]`` to ``[B, T]``: one output per task, a logit for ``"binary"`` tasks and a
value for ``"regression"`` ones (``model.task_types`` tells the trainer which loss to use).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import features

TASK_TYPES = ("binary", "regression")


def sizes(hidden: int | Sequence[int], name: str) -> tuple[int, ...]:
    """Layer widths: ``16 -> (16,)``, ``(8, 4) -> (8, 4)``; each must be a positive int (``()`` is allowed)."""
    widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    if any(not isinstance(s, int) or s < 1 for s in widths):
        raise ValueError(f"{name} must be a positive int or a sequence of them, got {hidden!r}")
    return widths


def layers(hidden: int | Sequence[int], name: str) -> tuple[int, ...]:
    """Widths of at least one layer (towers may have none, experts and bottoms may not)."""
    widths = sizes(hidden, name)
    if not widths:
        raise ValueError(f"{name} must name at least one layer, got {hidden!r}")
    return widths


def positive(value: int, name: str) -> int:
    """``value`` when it is a positive int, else a ValueError naming it."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def non_negative(value: int, name: str) -> int:
    """``value`` when it is a non-negative int (a bool is not), else a ValueError naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def uniform_(t: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default initialization, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), every element independent."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


def mlp(widths: Sequence[int], out_features: int | None) -> nn.Sequential:
    """``Linear + ReLU`` for each step of ``widths[0] -> widths[1] -> ...``, then ``Linear(widths[-1], out_features)``
    when ``out_features`` is given."""
    modules: list[nn.Module] = []
    for k, n in zip(widths[:-1], widths[1:]):
        modules += [nn.Linear(k, n), nn.ReLU()]
    if out_features is not None:
        modules.append(nn.Linear(widths[-1], out_features))
    return nn.Sequential(*modules)


def _stacked_towers(h: Tensor, num_layers: int, params: Sequence[Tensor]) -> tuple[Tensor, list, list]:
    """``out[B, T]`` of every tower, one batched GEMM per layer; also each layer's input ``[T, B, K]`` and stacked
    weight ``[T, N, K]``. ``params``: layer by layer, the T tasks' weights ``[N, K]``, then their biases ``[N]``."""
    T = len(params) // (2 * num_layers)
    a = h if h.dim() == 3 else h.expand(T, *h.shape)
    inputs, weights = [], []
    for layer in range(num_layers):
        w = torch.stack(list(params[2 * T * layer : 2 * T * layer + T]))
        b = torch.stack(list(params[2 * T * layer + T : 2 * T * (layer + 1)]))
        inputs.append(a)
        weights.append(w)
        a = torch.baddbmm(b.unsqueeze(1), a, w.transpose(1, 2))
        if layer < num_layers - 1:
            a = torch.relu(a)
    return a.squeeze(-1).t().contiguous(), inputs, weights


class _StackedTowers(torch.autograd.Function):
    """Every task's tower as one autograd node: ``forward(h, num_layers, *params) -> [B, T]`` (see
    ``_stacked_towers``); ``h[T, B, K]`` or shared ``[B, K]``. A per-task loop costs a few ops and autograd nodes
    per task and layer, most of a training step at small batches. The backward uses ``relu'(z) = [relu(z) > 0]``
    on the saved layer inputs; under ``create_graph`` it differentiates the plain formulas instead, so that
    higher derivatives stay exact.
    """

    @staticmethod
    def forward(ctx, h, num_layers, *params):
        out, inputs, weights = _stacked_towers(h, num_layers, params)
        ctx.save_for_backward(h, *params, *inputs[1:], *weights)
        ctx.num_layers, ctx.num_params = num_layers, len(params)
        return out

    @staticmethod
    def backward(ctx, grad):
        L, P = ctx.num_layers, ctx.num_params
        saved = ctx.saved_tensors
        h, params = saved[0], saved[1 : 1 + P]
        if torch.is_grad_enabled():  # create_graph: differentiate the formulas, differentiably
            wanted = [t for t, need in zip((h, *params), (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:]))
                      if need]
            out = _stacked_towers(h, L, params)[0]
            got = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
            grads = [next(got) if need else None
                     for need in (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:])]
            return (grads[0], None, *grads[1:])
        inputs, weights = [h if h.dim() == 3 else None, *saved[1 + P : P + L]], saved[P + L :]
        dz = grad.t().unsqueeze(-1)  # [T, B, 1]
        grads_w, grads_b, dh = [None] * L, [None] * L, None
        for layer in reversed(range(L)):
            a = inputs[layer] if layer > 0 or h.dim() == 3 else h.expand(weights[0].shape[0], *h.shape)
            grads_w[layer] = torch.bmm(dz.transpose(1, 2), a)
            grads_b[layer] = dz.sum(1)
            if layer > 0 or ctx.needs_input_grad[0]:
                da = torch.bmm(dz, weights[layer])
                if layer > 0:
                    dz = da * (a > 0)
                else:
                    dh = da if h.dim() == 3 else da.sum(0)
        param_grads = []
        for layer in range(L):
            param_grads += [*grads_w[layer].unbind(0), *grads_b[layer].unbind(0)]
        return (dh, None, *param_grads)


# The forwards the stacked towers reproduce: a class-level patch of either makes them step aside.
_PLAIN_FORWARDS = {nn.Sequential: nn.Sequential.forward, nn.Linear: nn.Linear.forward, nn.ReLU: nn.ReLU.forward}


def _plain_linear_relu(modules: nn.Module) -> bool:
    """Whether ``modules`` is exactly ``Linear, ReLU, ..., Linear`` with their own forwards and no hooks anywhere
    (what the stacked towers compute; anything else takes the per-task loop, which runs modules as they are)."""
    if _hooked(modules) or type(modules) is not nn.Sequential:
        return False
    kinds = [type(m) for m in modules]
    expected = [nn.Linear if i % 2 == 0 else nn.ReLU for i in range(len(kinds))]
    return len(kinds) % 2 == 1 and kinds == expected and not any(_hooked(m) for m in modules)


def _hooked(m: nn.Module) -> bool:
    """Hooks on ``m``, or a forward that is not its class's original one (patched on the class or the instance)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__
                or (type(m) in _PLAIN_FORWARDS and type(m).forward is not _PLAIN_FORWARDS[type(m)]))


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks or module._global_backward_hooks
                or module._global_backward_pre_hooks)


class Towers(nn.Module):
    """One small MLP per task, ``in_features -> tower_hidden... -> 1``; ``forward(h)`` -> ``[B, T]``.

    ``h`` is ``[T, B, in_features]`` (one input per task) or ``[B, in_features]`` (shared). In eager mode the
    towers run as one batched GEMM per layer over the tasks (one autograd node in all); when compiling, tracing,
    transforming or under autocast, or when a tower is no longer plain ``Linear``/``ReLU`` (another module, a
    hook), one task at a time, module by module.
    """

    def __init__(self, num_tasks: int, in_features: int, tower_hidden: Sequence[int] = (8,)) -> None:
        super().__init__()
        self.towers = nn.ModuleList(mlp((in_features, *tower_hidden), 1) for _ in range(num_tasks))

    def forward(self, h: Tensor) -> Tensor:
        params = self._stacked_params(h)
        if params is not None:
            return _StackedTowers.apply(h, len(self.towers[0]) // 2 + 1, *params)
        outs = [tower(h if h.dim() == 2 else h[t]) for t, tower in enumerate(self.towers)]
        return torch.cat(outs, dim=1)

    def _stacked_params(self, h: Tensor) -> list[Tensor] | None:
        """The towers' parameters in ``_StackedTowers``'s order, or None where it does not apply."""
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or _hooked(self) or _hooked(self.towers)
                or h.device.type not in ("cpu", "cuda")  # meta, fake, other devices: the modules as they are
                or torch.is_autocast_enabled(h.device.type)  # the modules cast per layer as autocast says
                or torch._C._functorch.peek_interpreter_stack() is not None or _global_hooks()
                or torch.autograd.forward_ad._current_level >= 0):
            return None
        towers = list(self.towers)
        if not towers or not all(_plain_linear_relu(t) for t in towers):
            return None
        if len({len(t) for t in towers}) != 1 or towers[0][-1].out_features != 1:
            return None
        params: list[Tensor] = []
        for i in range(0, len(towers[0]), 2):
            layers = [t[i] for t in towers]
            if any(lin.bias is None for lin in layers) or len({lin.weight.shape for lin in layers}) != 1:
                return None
            params += [lin.weight for lin in layers] + [lin.bias for lin in layers]
        if {(p.dtype, p.device) for p in params} != {(h.dtype, h.device)}:
            return None
        return params


class FusedModule(nn.Module):
    """Base of every module that calls the fused ops: TorchScript cannot compile them, so scripting says so."""

    def __prepare_scriptable__(self):
        raise TypeError(f"torch.jit.script cannot compile {type(self).__name__} (mmoe_fast's fused ops are Python "
                        "custom ops); use torch.jit.trace, torch.export.export, torch.compile or "
                        "mmoe_fast.InferenceSession")


class MultiTaskModel(FusedModule):
    """Base of the full models: validates ``task_types``, and records the constructor's arguments.

    ``config()`` returns those arguments (defaults filled in), so ``type(model)(**model.config())`` builds the
    same architecture again: a checkpoint stores them and needs nothing else to rebuild the model.
    """

    def __new__(cls, *args, **kwargs) -> MultiTaskModel:
        self = super().__new__(cls)
        # Bound here, not in __init__, so every subclass is recorded with its own signature. copy and pickle call
        # __new__ without arguments and then restore the record with the rest of __dict__.
        try:
            bound = inspect.signature(cls.__init__).bind(self, *args, **kwargs)
        except TypeError:
            return self  # bad arguments: __init__ raises the error
        bound.apply_defaults()
        self._config = {k: v for k, v in bound.arguments.items() if k != "self"}
        return self

    def __init_subclass__(cls, **kwargs) -> None:
        """Every model takes feature columns (``mmoe_fast.features``) in place of ``in_features``: its
        ``__init__`` sees their width, and the model gets ``encoder`` and a forward pre-hook that encodes the
        dict of column tensors ``forward`` is given. (The outermost ``__init__`` of a subclass chain does it.)"""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def init_with_columns(self, in_features, *args, **kw):
            if not features.is_columns(in_features):
                return init(self, in_features, *args, **kw)
            init(self, features.width(in_features), *args, **kw)
            self.encoder = features.FeatureEncoder(in_features)
            self.register_forward_pre_hook(features.encode_inputs)

        cls.__init__ = init_with_columns  # type: ignore[method-assign]

    def __init__(self, num_tasks: int, task_types: Sequence[str] | None) -> None:
        super().__init__()
        self.num_tasks = positive(num_tasks, "num_tasks")
        task_types = ("binary",) * num_tasks if task_types is None else tuple(task_types)
        if len(task_types) != num_tasks or any(t not in TASK_TYPES for t in task_types):
            raise ValueError(f"task_types must be {num_tasks} entries from {TASK_TYPES}, got {task_types!r}")
        self.task_types = task_types

    def config(self) -> dict:
        """The constructor's arguments by name, e.g. ``{"in_features": 100, "num_tasks": 2, "num_experts": 8, ...}``."""
        config = dict(self._config)
        if features.is_columns(config.get("in_features")):  # plain data, as a checkpoint stores it
            config["in_features"] = [features.to_dict(features.from_dict(c)) for c in config["in_features"]]
        return config

    def predict_proba(self, x):
        """``[B, T]`` predictions: the probability (sigmoid of the logit) for each binary task, the value itself
        for each regression task. Grad mode and train/eval mode are the caller's."""
        out = self(x)
        binary = torch.tensor([t == "binary" for t in self.task_types], device=out.device)
        return torch.where(binary, torch.sigmoid(out), out)
