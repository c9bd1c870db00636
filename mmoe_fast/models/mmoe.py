"""MMoE and OMoE (Ma et al., KDD 2018) on the fused ops: experts, softmax gates and their mixture.

The backend is a plain attribute, so the ``state_dict`` is the same whichever backend runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import _checks, activations, backends, ops
from ..backends import cpp as cpp_backend
from ..backends import reference as reference_backend
from ..contract import ACTIVATION_CODES
from .common import (
    FusedModule,
    MultiTaskModel,
    Towers,
    _hooked,
    _stacked_towers,
    _towers_in_cpp,
    guarded,
    live_applies,
    live_call,
    live_forward,
    positive,
    sizes,
    towers_backward,
    towers_forward,
    uniform_,
)


class MMoELayer(FusedModule):
    """E experts (MLPs ``in_features -> expert_hidden...``) mixed by one softmax gate per task.

    ``forward(x[B, D]) -> m[T, B, H]`` with ``H = expert_hidden[-1]``. Hidden expert layers run as
    ``grouped_linear``; the last layer and the mixture run as one ``expert_mixture`` (or ``mmoe``).
    """

    def __init__(
        self, in_features: int, num_experts: int, expert_hidden: int | Sequence[int], num_tasks: int, *,
        gate_bias: bool = True, activation: str = "relu", backend: str = "auto", num_gates: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = positive(in_features, "in_features")
        self.num_experts = positive(num_experts, "num_experts")
        self.num_tasks = positive(num_tasks, "num_tasks")
        self.expert_hidden = sizes(expert_hidden, "expert_hidden")
        self.activation = activations.check_activation(activation)
        self.backend = backends.check_backend_name(backend)
        num_gates = self.num_tasks if num_gates is None else num_gates
        widths = (self.in_features, *self.expert_hidden)
        self.expert_weights = nn.ParameterList(
            uniform_(torch.empty(num_experts, k, n), k) for k, n in zip(widths[:-1], widths[1:])
        )
        self.expert_biases = nn.ParameterList(
            uniform_(torch.empty(num_experts, n), k) for k, n in zip(widths[:-1], widths[1:])
        )
        self.gate_weight = nn.Parameter(uniform_(torch.empty(num_gates, in_features, num_experts), in_features))
        if gate_bias:
            self.gate_bias = nn.Parameter(uniform_(torch.empty(num_gates, num_experts), in_features))
        else:
            self.register_parameter("gate_bias", None)

    @property
    def out_features(self) -> int:
        return self.expert_hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        kw = dict(activation=self.activation, backend=self.backend)
        weights, biases = list(self.expert_weights), list(self.expert_biases)
        if len(weights) == 1:
            m = ops.mmoe(x, weights[0], biases[0], self.gate_weight, self.gate_bias, **kw)
        else:
            h = x
            for w, b in zip(weights[:-1], biases[:-1]):
                h = ops.grouped_linear(h, w, b, **kw)
            gates = ops.gate_softmax(x, self.gate_weight, self.gate_bias, backend=self.backend)
            m = ops.expert_mixture(h, weights[-1], biases[-1], gates, **kw)
        if m.shape[0] != self.num_tasks:  # one shared gate (OMoE): every task sees the same mixture
            m = m.expand(self.num_tasks, -1, -1)
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_experts={self.num_experts}, "
                f"expert_hidden={self.expert_hidden}, num_tasks={self.num_tasks}, "
                f"num_gates={self.gate_weight.shape[0]}, activation={self.activation!r}, backend={self.backend!r}")


class OMoELayer(MMoELayer):
    """One-gate MoE: a single softmax gate shared by every task (the paper's OMoE baseline)."""

    def __init__(
        self, in_features: int, num_experts: int, expert_hidden: int | Sequence[int], num_tasks: int, *,
        gate_bias: bool = True, activation: str = "relu", backend: str = "auto",
    ) -> None:
        super().__init__(in_features, num_experts, expert_hidden, num_tasks, gate_bias=gate_bias,
                         activation=activation, backend=backend, num_gates=1)


class MMoE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018): ``x[B, D] -> [B, T]``."""

    layer_class = MMoELayer

    def __init__(
        self, in_features: int, num_tasks: int = 2, *, num_experts: int = 8,
        expert_hidden: int | Sequence[int] = 16, tower_hidden: int | Sequence[int] = (8,),
        task_types: Sequence[str] | None = None, gate_bias: bool = True, activation: str = "relu",
        backend: str = "auto",
    ) -> None:
        super().__init__(num_tasks, task_types)
        self.mixture = self.layer_class(in_features, num_experts, expert_hidden, num_tasks, gate_bias=gate_bias,
                                        activation=activation, backend=backend)
        self.towers = Towers(num_tasks, self.mixture.out_features, sizes(tower_hidden, "tower_hidden"), backend)

    def forward(self, x: Tensor) -> Tensor:
        grad = torch.is_grad_enabled()
        if not grad:
            out = live_forward(self, x, self._live_forward)
            if out is not None:
                return out
        args = self._one_node(x, grad)
        if args is not None:
            return _MMoEModel.apply(*args) if grad else _one_node_forward(args, save=False)[0]
        return self.towers(self.mixture(x))

    def fused_training_forward(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], list]] | None:
        """``(out[B, T], backward)`` with no autograd graph, where the whole model runs on the fused kernels
        alone (as ``_MMoEModel``); ``backward(dout[B, T])`` returns ``(parameter, gradient)`` for every
        parameter that requires one. None where the model cannot (a subclass's ``forward``, hooks on the model, the
        reference backend: the caller then uses autograd). ``fit`` takes this path to skip autograd's
        bookkeeping, most of a small model's training step."""
        if type(self).forward is not _ORIGINAL_FORWARDS[MMoE] or _hooked(self):  # another forward or a hook runs
            return None
        args = self._one_node(x)
        if args is None or x.requires_grad or backends.resolve(args[-4], x.device, x.dtype) is reference_backend:
            return None  # the reference backend: plain PyTorch and autograd throughout, as it is there to check
        with torch.no_grad():
            out, state = _one_node_forward(args)

        def backward(dout: Tensor) -> list:
            with torch.no_grad():
                grads = _one_node_backward(args, state, dout, input_grad=False)
            params = args[1:-_OTHERS]
            return [(p, g) for p, g in zip(params, grads[1:]) if p is not None and p.requires_grad]

        return out, backward

    def fused_training_step(self, x: Tensor, y: Tensor, coef: Tensor, weight: Tensor | None
                            ) -> tuple[list[float], list[tuple[Tensor, Tensor]]] | None:
        """One training step in one C++ call (``cpp.TrainStep``): the per-task loss sums of ``out[B, T]``
        against ``y`` (``cpp.loss_grad``'s losses, rows weighted by ``weight[B, T]`` or None; not scaled) and
        ``(parameter, gradient)`` for every parameter that requires one, the gradient of ``sum_t coef[t] *
        sums[t]``. It applies where ``fused_training_forward`` does, the experts are one layer and small enough
        (``cpp.step_in_one_call``, ``common.STEP_TOWERS_MAX_MACS``); else None. It runs the C++ backend's own
        kernels in the order the layer by layer path runs them, so the same bits where that path runs the own
        kernels too (not where it hands its GEMMs to torch's BLAS or its towers to batched GEMMs). The gradients
        are buffers kept on the model and written in place at every call: at a small batch the Python between
        the kernels is most of a step."""
        if type(self).forward is not _ORIGINAL_FORWARDS[MMoE] or _hooked(self):
            return None
        args = self._one_node(x)
        if args is None or args[-2] != 1 or x.requires_grad or x.dtype not in cpp_backend.DTYPES:
            return None
        x, wg, bg, w, b, *towers = args[:-_OTHERS]
        activation, backend, tower_backend = args[-_OTHERS : -_OTHERS + 3]
        if (backends.resolve(backend, x.device, x.dtype) is not cpp_backend
                or not cpp_backend.step_in_one_call(x.shape[0], w)
                or not _towers_in_cpp(x, towers, tower_backend, whole_step=True)):
            return None
        key = (self.__dict__["_guard"], activation, backend, tower_backend,
               tuple(t == "binary" for t in self.task_types))
        cached = self.__dict__.get("_train_step")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_train_step"] = (key, *_train_step_runner(args[:-_OTHERS], activation, key[-1]))
        step, params, grads = cached[1:]
        if step is None:
            return None
        B, T = x.shape[0], self.num_tasks
        for name, t, shape in (("y", y, (B, T)), ("coef", coef, (T,)), ("weight", weight, (B, T))):
            if (t is not None or name != "weight") and (
                    not isinstance(t, Tensor) or tuple(t.shape) != shape or t.device != x.device):
                raise ValueError(f"fused_training_step: {name} must be a tensor of shape {shape} on {x.device} "
                                 f"(x has {B} rows, the model {T} tasks), got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if x.is_neg() or not x.is_contiguous() or x.data_ptr() % x.element_size():
            x = x.clone(memory_format=torch.contiguous_format)  # plain, aligned memory
        y, coef = (t.to(x.dtype).resolve_neg().contiguous() for t in (y, coef))
        weight = None if weight is None else weight.to(x.dtype).resolve_neg().contiguous()
        sums = step.run(x.data_ptr(), y.data_ptr(), coef.data_ptr(), 0 if weight is None else weight.data_ptr(), B,
                        params, grads)
        return sums, [(p, g) for p, g in zip(params, grads) if p is not None and p.requires_grad]

    def _one_node(self, x: Tensor, grad: bool = True) -> tuple | None:
        """``_MMoEModel``'s arguments where the whole model can run as one node (plain eager mode, plain towers
        of matching widths, one per task, no hooks on the layers, no shared parameters; with ``grad``,
        something to differentiate), else None (the layers run one by one): ``(x, wg, bg, w_0, b_0, ...,
        w_L-1, b_L-1, *tower_params, activation, backend, tower_backend, expert_layers, tower_layers)``.
        Under no_grad the same kernels then run with no op dispatch and no checks repeated: the forward of a
        small model is mostly those."""
        if not isinstance(x, Tensor) or x.dim() != 2:
            return None
        plan = guarded(self, x, self._one_node_modules, lambda: self._one_node_plan(x))
        if plan is None or x.shape[1] != plan[0].shape[1] or x.shape[0] == 0:
            return None  # the layers' own path says what is wrong (or handles B = 0)
        if grad and not (x.requires_grad or any(p is not None and p.requires_grad for p in plan[:-2])):
            return None
        # Plain attributes, read at every call (the guard watches modules and parameters, not these).
        layer = self._modules["mixture"]
        activation, backend = layer.__dict__.get("activation"), layer.__dict__.get("backend")
        if activation not in activations.ACTIVATIONS or not isinstance(backend, str):
            return None  # the layer's own checks say what is wrong
        return (x, *plan[:-2], activation, backend, self._modules["towers"].__dict__.get("backend"), *plan[-2:])

    def _live_forward(self, x: Tensor) -> Tensor | bool | None:
        """The no-grad forward as one C++ call on the parameters read in place (``cpp.Live``: an
        ``InferenceSession``'s kernels without its packed copy, so never stale), where the whole model runs as
        one node on a CPU and the C++ backend runs the layers and the towers; else None or False (the general
        path). ``common.live_forward`` calls this where the call it keeps no longer answers."""
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_cpu:
            return None
        plan = guarded(self, x, self._one_node_modules, lambda: self._one_node_plan(x))
        if plan is None:
            return None
        # the plain attributes read at every call (the guard watches modules and parameters)
        layer, towers = self._modules["mixture"].__dict__, self._modules["towers"].__dict__
        attrs = ((layer, "activation"), (layer, "backend"), (towers, "backend"))
        return live_call(self, x, plan[0].shape[1], attrs,
                         lambda: _live_runner(x, plan, layer.get("activation"), layer.get("backend"),
                                              towers.get("backend")))

    def _one_node_modules(self) -> list[nn.Module]:
        return [self, self.mixture, self.mixture.expert_weights, self.mixture.expert_biases,
                *self.towers._tower_modules()]

    def _one_node_plan(self, x: Tensor) -> tuple | None:
        layer, towers = self.mixture, self.towers
        if (_hooked(layer) or type(layer).forward is not _ORIGINAL_FORWARDS[MMoELayer]
                or type(towers).forward is not _ORIGINAL_FORWARDS[Towers]):  # a patched or subclass forward runs
            return None
        weights = list(layer.expert_weights._parameters.values())
        biases = list(layer.expert_biases._parameters.values())
        if len(weights) != len(biases) or not weights or layer.gate_weight.shape[0] not in (1, self.num_tasks):
            return None
        if len(towers.towers._modules) != self.num_tasks:
            return None
        tower_params = towers._stacked_params(weights[-1].new_empty((self.num_tasks, 1, weights[-1].shape[-1])))
        if tower_params is None:
            return None
        wg, bg = layer.gate_weight, layer.gate_bias
        _checks.check_gate(x, wg, bg)
        a = x
        for w, b in zip(weights, biases):  # each layer's shapes, as the layers would check them
            _checks.check_experts(a, w, b, a_name="x" if a is x else "a")
            a = w.new_empty((x.shape[0] if a is x else 1, w.shape[0], w.shape[2]))
        if weights[-1].shape[0] != wg.shape[2]:
            return None
        experts = [t for pair in zip(weights, biases) for t in pair]
        tensors = [t for t in (wg, bg, *experts, *tower_params) if t is not None]
        if len({id(t) for t in tensors}) != len(tensors):  # a shared parameter: its gradients would have to add up
            return None
        return (wg, bg, *experts, *tower_params, len(weights), len(tower_params) // (2 * self.num_tasks))


_OTHERS = 5  # the non-tensor arguments that end MMoE._one_node's tuple


def _split(args: tuple) -> tuple:
    """``MMoE._one_node``'s tuple as ``(x, wg, bg, experts, tower_params, activation, backend, tower_backend,
    tower_layers)``, ``experts`` the ``(w, b)`` pairs."""
    activation, backend, tower_backend, layers, tower_layers = args[-_OTHERS:]
    x, wg, bg = args[:3]
    flat = args[3 : 3 + 2 * layers]
    return (x, wg, bg, list(zip(flat[::2], flat[1::2])), args[3 + 2 * layers : -_OTHERS], activation, backend,
            tower_backend, tower_layers)


def _one_node_forward(args: tuple, save: bool = True) -> tuple[Tensor, tuple]:
    """``(out[B, T], state)``: the layers' training forwards (``ops``' eager paths, pre-activations kept; not
    ``save``: their plain forwards, nothing kept), then the towers' (``towers_forward``). ``state``: groups of
    tensors (``_one_node_backward`` reads them) and whether the towers ran in C++."""
    x, wg, bg, experts, tower_params, activation, backend, tower_backend, tower_layers = _split(args)
    groups: list[tuple] = []
    if len(experts) == 1:  # gates and mixture in one op
        (w, b), = experts
        if save:
            m, saved = ops._mmoe_train(False, x, w, b, wg, bg, activation, backend)
        else:
            m, saved = ops._mmoe_forward(x, w, b, wg, bg, activation, backend), ()
        groups.append(saved)
    else:
        a = x
        for w, b in experts[:-1]:
            if save:
                out, saved = ops._grouped_linear_train(False, a, w, b, activation, backend, expert_major=True)
            else:
                out, saved = ops._grouped_linear_forward(a, w, b, activation, backend), ()
            groups += [(a,), saved]
            a = out
        G = ops._gate_softmax_forward(x, wg, bg, backend)
        w, b = experts[-1]
        if save:
            m, saved = ops._expert_mixture_train(False, a, w, b, G, activation, backend)
        else:
            m, saved = ops._expert_mixture_forward(a, w, b, G, activation, backend), ()
        groups += [(a, G), saved]
    h = m if wg.shape[0] != 1 else m[0]  # one shared gate (OMoE): every tower sees the same mixture
    out, tower_saved, in_cpp = towers_forward(h, tower_layers, tower_backend, tower_params)
    return out, ([(h,), tower_saved, *groups], in_cpp)


def _one_node_backward(args: tuple, state: tuple, grad: Tensor, input_grad: bool) -> list:
    """Gradients of ``args``' tensors (``x``, ``wg``, ``bg``, the experts', the towers') from ``grad[B, T]``:
    ``x``'s None unless ``input_grad``, ``bg``'s None without a gate bias."""
    x, wg, bg, experts, tower_params, activation, backend, tower_backend, tower_layers = _split(args)
    groups, in_cpp = state
    (h,), tower_saved, *groups = groups
    dh, tower_grads = towers_backward(grad, h, tower_layers, tower_params, tower_saved, in_cpp, True)
    dm = dh if wg.shape[0] != 1 else dh.unsqueeze(0)
    if len(experts) == 1:
        (w, b), = experts
        dx, dw, db, dwg, dbg = ops._mmoe_backward_from(dm, x, w, b, wg, bg, activation, backend, input_grad,
                                                       groups[0])
        expert_grads = [dw, db]
    else:
        (a, G), saved = groups[-2], groups[-1]
        w, b = experts[-1]
        da, dw, db, dG = ops._expert_mixture_eager_backward(dm, a, w, b, G, activation, backend, True, saved)
        dx, dwg, dbg = ops._gate_softmax_eager_backward(dG, x, wg, bg, backend, input_grad, (G,))
        expert_grads = [dw, db]
        for layer in reversed(range(len(experts) - 1)):
            (a,), saved = groups[2 * layer], groups[2 * layer + 1]
            w, b = experts[layer]
            first = layer == 0
            da, dw, db = ops._grouped_linear_eager_backward(da, a, w, b, activation, backend,
                                                            input_grad if first else True, saved)
            expert_grads = [dw, db, *expert_grads]
        if input_grad:
            dx = da + dx
    return [dx if input_grad else None, dwg, None if bg is None else dbg, *expert_grads, *tower_grads]


def _live_runner(x: Tensor, plan: tuple, activation, backend, tower_backend) -> tuple:
    """``live_forward``'s ``(cpp.Live or None, parameters, tasks)`` for ``MMoE._one_node_plan``'s ``plan``
    (``wg, bg, w_0, b_0, ..., tower parameters, expert layers, tower layers``): None where the C++ backend does
    not run both the layers and the towers for ``x`` or a parameter is not plain memory (the general path then
    runs, and says what is wrong with a bad attribute)."""
    tensors = plan[:-2]
    wg, expert_layers, tower_layers = plan[0], plan[-2], plan[-1]
    tower_params = plan[2 + 2 * expert_layers : -2]
    num_tasks = len(tower_params) // (2 * tower_layers)
    if activation not in activations.ACTIVATIONS or not live_applies(x, (backend, tower_backend or "auto"), tensors):
        return None, tensors, num_tasks
    experts = plan[2 : 2 + 2 * expert_layers : 2]
    layers = [[*w.shape, ACTIVATION_CODES[activation], 0] for w in experts]
    widths = [experts[-1].shape[2]] + [tower_params[2 * num_tasks * layer].shape[0] for layer in range(tower_layers)]
    live = cpp_backend.live_class(x.dtype)(x.shape[1], num_tasks, wg.shape[0], layers, widths)
    return live, tensors, num_tasks


def _train_step_runner(tensors: tuple, activation: str, binary: tuple[bool, ...]) -> tuple:
    """``MMoE.fused_training_step``'s ``(cpp.TrainStep or None, parameters, gradient buffers)`` for
    ``_one_node``'s tensors ``(x, wg, bg, w, b, *tower parameters)`` of a one-layer model (checked by its
    plan): None where a parameter is not plain contiguous memory of ``x``'s dtype."""
    x, wg, bg, w, b, *towers = tensors
    params = (wg, bg, w, b, *towers)
    if activation not in activations.ACTIVATIONS or not live_applies(x, (), params) or any(
            p is not None and p.dtype != x.dtype for p in params):
        return None, params, ()
    E, D, H = w.shape
    widths = [H] + [towers[2 * len(binary) * layer].shape[0] for layer in range(len(towers) // (2 * len(binary)))]
    step = cpp_backend.train_step_class(x.dtype)(D, E, H, wg.shape[0], widths, ACTIVATION_CODES[activation],
                                                 list(binary))
    grads = tuple(None if p is None else torch.empty_like(p, memory_format=torch.contiguous_format) for p in params)
    return step, params, grads


class _MMoEModel(torch.autograd.Function):
    """A whole MMoE/OMoE as one autograd node: ``_one_node_forward``/``_one_node_backward``, the same kernels as
    the layers run one by one, in a fraction of the Python and autograd work, which is most of a training step
    at small batches (no input gradient unless ``x`` needs one). Under ``create_graph`` the backward runs the
    layers' own differentiable paths instead."""

    @staticmethod
    def forward(ctx, *args):
        out, (groups, ctx.in_cpp) = _one_node_forward(args)
        tensors = args[:-_OTHERS]
        ctx.save_for_backward(*tensors, *(t for g in groups for t in g))
        ctx.others, ctx.sizes = args[-_OTHERS:], (len(tensors), [len(g) for g in groups])
        return out

    @staticmethod
    def backward(ctx, grad):
        count, sizes = ctx.sizes
        saved = ctx.saved_tensors
        tensors, rest = saved[:count], saved[count:]
        args = (*tensors, *ctx.others)
        flags = ctx.needs_input_grad[:count]
        if torch.is_grad_enabled():  # create_graph: the layers' differentiable paths
            x, wg, bg, experts, tower_params, activation, backend, _, tower_layers = _split(args)
            wanted = [t for t, need in zip(tensors, flags) if need]
            a = x
            for w, b in experts[:-1]:
                a = ops.grouped_linear(a, w, b, activation=activation, backend=backend)
            w, b = experts[-1]
            if len(experts) == 1:
                m = ops.mmoe(x, w, b, wg, bg, activation=activation, backend=backend)
            else:
                m = ops.expert_mixture(a, w, b, ops.gate_softmax(x, wg, bg, backend=backend), activation=activation,
                                       backend=backend)
            out = _stacked_towers(m if wg.shape[0] != 1 else m[0], tower_layers, tower_params)[0]
            got = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
            grads = [next(got) if need else None for need in flags]
        else:
            groups, start = [], 0
            for n in sizes:
                groups.append(tuple(rest[start : start + n]))
                start += n
            grads = _one_node_backward(args, (groups, ctx.in_cpp), grad, flags[0])
            grads = [g if need else None for g, need in zip(grads, flags)]
        return (*grads, *(None,) * _OTHERS)


# The forwards the one-node paths stand in for, as defined (a class-level patch later makes them step aside).
_ORIGINAL_FORWARDS = {MMoELayer: MMoELayer.forward, Towers: Towers.forward, MMoE: MMoE.forward}


class OMoE(MMoE):
    """One-gate Mixture-of-Experts baseline: the same experts, one gate for all tasks."""

    layer_class = OMoELayer
