"""What every multi-task model shares: the base class (task types, constructor record), the towers, and the
size checks and initialization of the layers.

Every model maps ``x[B, D]`` to ``[B, T]``: one output per task, a logit for ``"binary"`` tasks and a
value for ``"regression"`` ones (``model.task_types`` tells the trainer which loss to use).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules import module

from .. import backends, features, ops
from ..backends import cpp as cpp_backend

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


def towers_forward(h: Tensor, num_layers: int, backend: str | None, params: Sequence[Tensor]
                   ) -> tuple[Tensor, tuple[Tensor, ...], bool]:
    """``(out[B, T], saved, in_cpp)``: every tower's output, what ``towers_backward`` needs, and whether the C++
    backend ran it (see ``Towers``). ``params`` as in ``_stacked_towers``."""
    if _towers_in_cpp(h, params, backend):
        out, save = cpp_backend.towers_forward(h.resolve_neg().contiguous(), num_layers, params)
        return out, (save,), True
    out, inputs, weights = _stacked_towers(h, num_layers, params)
    return out, (*inputs[1:], *weights), False


def towers_backward(grad: Tensor, h: Tensor, num_layers: int, params: Sequence[Tensor], saved: Sequence[Tensor],
                    in_cpp: bool, input_grad: bool) -> tuple[Tensor | None, list[Tensor]]:
    """``(dh or None, one gradient per parameter)`` from ``grad[B, T]`` and ``towers_forward``'s ``saved``; the
    backward uses ``relu'(z) = [relu(z) > 0]`` on the saved layer outputs."""
    L = num_layers
    if in_cpp:
        return cpp_backend.towers_backward(grad, h.resolve_neg().contiguous(), L, params, saved[0], input_grad)
    inputs, weights = [h if h.dim() == 3 else None, *saved[: L - 1]], saved[L - 1 :]
    dz = grad.t().unsqueeze(-1)  # [T, B, 1]
    grads_w, grads_b, dh = [None] * L, [None] * L, None
    for layer in reversed(range(L)):
        a = inputs[layer] if layer > 0 or h.dim() == 3 else h.expand(weights[0].shape[0], *h.shape)
        grads_w[layer] = torch.bmm(dz.transpose(1, 2), a)
        grads_b[layer] = dz.sum(1)
        if layer > 0 or input_grad:
            da = torch.bmm(dz, weights[layer])
            if layer > 0:
                dz = da * (a > 0)
            else:
                dh = da if h.dim() == 3 else da.sum(0)
    param_grads: list[Tensor] = []
    for layer in range(L):
        param_grads += [*grads_w[layer].unbind(0), *grads_b[layer].unbind(0)]
    return dh, param_grads


class _StackedTowers(torch.autograd.Function):
    """Every task's tower as one autograd node: ``forward(h, num_layers, backend, *params) -> [B, T]`` (see
    ``towers_forward``); ``h[T, B, K]`` or shared ``[B, K]``. A per-task loop costs a few ops and autograd nodes
    per task and layer, most of a training step at small batches. Under ``create_graph`` the backward
    differentiates the plain formulas instead, so that higher derivatives stay exact.
    """

    @staticmethod
    def forward(ctx, h, num_layers, backend, *params):
        out, saved, ctx.in_cpp = towers_forward(h, num_layers, backend, params)
        ctx.save_for_backward(h, *params, *saved)
        ctx.num_layers, ctx.num_params = num_layers, len(params)
        return out

    @staticmethod
    def backward(ctx, grad):
        L, P = ctx.num_layers, ctx.num_params
        saved = ctx.saved_tensors
        h, params = saved[0], saved[1 : 1 + P]
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:])
        if torch.is_grad_enabled():  # create_graph: differentiate the formulas, differentiably
            wanted = [t for t, need in zip((h, *params), needs) if need]
            out = _stacked_towers(h, L, params)[0]
            got = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
            grads = [next(got) if need else None for need in needs]
            return (grads[0], None, None, *grads[1:])
        dh, param_grads = towers_backward(grad, h, L, params, saved[1 + P :], ctx.in_cpp, needs[0])
        return (dh, None, None, *param_grads)


# Up to this many multiply-adds per training forward (batch x every tower weight), the towers run in one C++
# call (row by row, vectorized over each layer's inputs); above it, as batched GEMMs, which then win (measured
# on this project's 2-core VM, forward and backward: 272 MACs 198 vs 235 us, 35k 232 vs 293 us, 279k a tie,
# 4.2M 1.14 vs 0.90 ms in torch's favour). Since the towers' backward works in blocks of 32 rows (2026-12-07) the
# large cases are even: a whole training step of D=128, 8 experts of 256, towers of 8 (4.2M tower MACs at
# B=1024) 7.58 ms with C++ towers against 7.70 with batched GEMMs, 16.8M (towers of 64) 5.38 against 5.31:
# within this VM's noise, so the limit stays.
CPP_TOWERS_MAX_MACS = 1 << 18
# The same limit where the whole training step is one C++ call (``MMoE.fused_training_step``), which saves more:
# at the paper's size (272 MACs a row) B=1024 runs 1.12 ms a step against 1.55 with the towers as GEMMs.
STEP_TOWERS_MAX_MACS = 1 << 19


def _towers_in_cpp(h: Tensor, params: Sequence[Tensor], backend: str | None, whole_step: bool = False) -> bool:
    """Whether the C++ backend runs these towers: ``backend`` (the model's; None: ``"auto"``) resolves to it for
    ``h``, the parameters are contiguous, and the towers are small enough (``CPP_TOWERS_MAX_MACS``, batch
    included; in a training step that is one C++ call, ``STEP_TOWERS_MAX_MACS``)."""
    if not h.is_cpu or backends.resolve(backend or "auto", h.device, h.dtype) is not cpp_backend:
        return False
    macs = 0
    for p in params:
        if not p.is_contiguous() or p.is_neg():  # the kernel reads memory: a negative-bit view's is not its value
            return False
        if p.dim() == 2:
            macs += p.shape[0] * p.shape[1]
    return macs * h.shape[-2] <= (STEP_TOWERS_MAX_MACS if whole_step else CPP_TOWERS_MAX_MACS)


# The forwards the stacked towers reproduce: a class-level patch of either makes them step aside.
_PLAIN_FORWARDS = {nn.Sequential: nn.Sequential.forward, nn.Linear: nn.Linear.forward, nn.ReLU: nn.ReLU.forward}


def _hooked(m: nn.Module) -> bool:
    """Hooks on ``m``, or a forward that is not its class's original one (patched on the class or the instance)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__
                or (type(m) in _PLAIN_FORWARDS and type(m).forward is not _PLAIN_FORWARDS[type(m)]))


def _global_hooks() -> bool:
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks or module._global_backward_hooks
                or module._global_backward_pre_hooks)


class Guard:
    """What a fused path read off a module tree, with the cheapest checks that it still holds for an input ``t``.

    Working a path out again at every forward costs a hundred microseconds of Python (module attributes are
    slow), as much as the step it saves at small batches. ``holds(t)`` checks, in a few microseconds, what could
    have changed since: plain eager mode (``plain_eager``), hooks or an instance ``forward`` on any module but the
    owner (whose ``__call__`` runs its own), each module's class and its class's ``forward``, the child modules
    and every parameter slot by identity (an empty slot too) and how many each module holds, and each parameter's
    dtype, device, shape, strides and neg/conj bits against ``t`` and what was read. ``value``
    is what the path computed (``None``: it does not apply); plain attributes (an activation's name, a backend)
    are the path's to read at each call.
    """

    __slots__ = ("modules", "types", "children", "params", "slots", "counts", "forwards", "value", "tensors",
                 "dtype", "device", "metadata")

    def __init__(self, modules: Sequence[nn.Module], value, owner: nn.Module | None = None) -> None:
        every = tuple(modules)
        # The owner's own hooks are its __call__'s to run, around the forward that checks this guard; its class
        # and forward too (another forward would not be here). Its children and parameters are watched.
        self.modules = tuple(m for m in every if m is not owner)
        self.types = tuple(type(m) for m in self.modules)
        self.children = tuple((m, tuple(m._modules.values())) for m in every if m._modules)
        self.params = tuple((m, name, p, None if p is None else p.shape, p is not None and p.is_contiguous())
                            for m in every for name, p in m._parameters.items())
        self.slots = tuple((m, name, p) for m, name, p, _, _ in self.params)
        # how many parameters each module holds: one added (a layer appended to a ParameterList) is a change
        self.counts = tuple((m, len(m._parameters)) for m in every)
        self.forwards = tuple({(type(m), type(m).forward) for m in self.modules})
        self.value = value
        self.tensors = tuple(p for _, _, p, _, _ in self.params if p is not None)
        # one dtype and device for every parameter (else None: the guard never holds, as t can match only one)
        kinds = {(p.dtype, p.device) for p in self.tensors}
        self.dtype, self.device = kinds.pop() if len(kinds) == 1 else (None, None)
        # what each parameter's metadata is now, checked by one call per inference-mode state (under
        # inference_mode a tensor's dispatch keys read differently): taken here, never later
        self.metadata = []
        for mode in (False, True):
            with torch.inference_mode(mode):
                self.metadata.append(_metadata_check(self.tensors))

    def holds(self, t: Tensor) -> bool:
        if not plain_eager(t):
            return False
        c = cpp_backend._C
        if c is not None:
            if not c.modules_unchanged(self.modules, self.types, self.children, self.slots, self.forwards,
                                       self.counts):
                return False
        elif not self._modules_unchanged():
            return False
        if not self.tensors:
            return True
        if t.dtype != self.dtype or t.device != self.device:
            return False
        return self.metadata[_is_inference_mode_enabled()](*self.tensors)

    def _modules_unchanged(self) -> bool:
        """``_C.modules_unchanged`` in Python (where the extension is not built)."""
        for m, cls in zip(self.modules, self.types):
            if (type(m) is not cls or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                    or m._backward_pre_hooks or "forward" in m.__dict__):
                return False
        for m, kids in self.children:
            if tuple(m._modules.values()) != kids:
                return False
        if any(cls.forward is not forward for cls, forward in self.forwards):
            return False
        if any(len(m._parameters) != n for m, n in self.counts):
            return False
        return all(name in m._parameters and m._parameters[name] is p for m, name, p in self.slots)


def _metadata_check(tensors: Sequence[Tensor]) -> Callable[..., bool]:
    """A function of ``tensors`` that says whether each still has the metadata it has now: torch's C++ tensor
    check where this torch has it (TorchDynamo's ``TensorGuards``: dtype, device, sizes, strides, dispatch keys,
    requires_grad, in one call), else the same in Python."""
    if _TensorGuards is not None:
        try:
            return _TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None).check
        except Exception:  # another torch's signature: the Python check below
            pass

    def read(p: Tensor) -> tuple:
        return p.dtype, p.device, p.shape, p.stride(), p.is_neg(), p.is_conj(), p.requires_grad

    then = [read(p) for p in tensors]

    def check(*now: Tensor) -> bool:
        return all(read(p) == r for p, r in zip(now, then))

    return check


try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # a torch without it: _metadata_check's Python path
    _TensorGuards = None


class KeepsCaches:
    """A module whose fused paths keep caches in its ``__dict__`` (``guarded``'s guard, ``live_forward``'s and
    ``fused_training_step``'s C++ objects, which cannot be pickled): they are built again on demand, so a copy
    or a pickle of the module leaves them out."""

    _CACHES = ("_guard", "_live", "_train_step")

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # nn.Module's (which drops a compiled call)
        for key in self._CACHES:
            state.pop(key, None)
        return state


def guarded(owner: nn.Module, t: Tensor, modules: Callable[[], Sequence[nn.Module]], compute: Callable[[], object]):
    """``compute()`` for ``owner``'s fused path on input ``t`` (called from ``owner``'s forward), kept on ``owner``
    with a ``Guard`` over ``modules()`` and computed again only when the guard no longer holds."""
    guard = owner.__dict__.get("_guard")
    if guard is not None and guard.holds(t):
        return guard.value
    value = compute() if plain_eager(t) else None
    guard = owner.__dict__["_guard"] = Guard(modules(), value, owner) if value is not None else None
    # a value is used only under a guard that holds (compute() need not have checked every module: a hook on
    # one that another guard skips as its owner, say)
    return value if guard is not None and guard.holds(t) else None


def live_forward(owner: nn.Module, x, build: Callable[[Tensor], Tensor | bool | None]) -> Tensor | None:
    """A whole model's no-grad forward as one C++ call on its parameters read in place (``cpp.Live``: an
    ``InferenceSession``'s forward without its packed copy, so never stale, with a session's bits), or None where
    it does not apply (the model's modules then run). The ``LiveCall`` kept on ``owner`` answers where its checks
    hold; else ``build(x)`` (the owner's: its guard, then ``live_call``) works it out again."""
    call = owner.__dict__.get("_live")
    out = call.run(x) if call is not None else None
    if out is None:
        out = build(x)
        if out is None:  # no call applies now (a hook, another mode, this x): none is kept
            owner.__dict__.pop("_live", None)
    return None if out is None or out is False else out


def live_call(owner: nn.Module, x: Tensor, width: int, attrs: tuple,
              build: Callable[[], tuple]) -> Tensor | bool | None:
    """``LiveCall.run(x)`` of the call kept on ``owner``, built again (``build()``: ``(cpp.Live or None, the
    parameters in its order, number of tasks)``) unless it was built under ``owner``'s current guard with the
    same plain attributes (``attrs``: ``(module __dict__, name)`` pairs) and ``$MMOE_FAST_BACKEND`` (what
    ``"auto"`` resolves to). The caller's guard holds for ``x`` (a 2-D CPU tensor); ``width``: the model's
    input width."""
    guard = owner.__dict__["_guard"]
    values = tuple(d.get(name) for d, name in attrs)
    env = backends.env_backend()
    call = owner.__dict__.get("_live")
    if call is None or call.guard is not guard or call.values != values or call.env != env:
        call = owner.__dict__["_live"] = LiveCall(guard, attrs, values, env, width, *build())
    return call.run(x)


class LiveCall:
    """A model's no-grad forward in one C++ call (``cpp.Live``, or None where it does not apply) and, in one
    function, every check that it still may run for ``x``: those of its ``Guard`` (plain eager mode, the module
    tree, each parameter's metadata), the plain attributes and ``$MMOE_FAST_BACKEND`` it was built with, and
    ``x`` (a 2-D CPU tensor of the parameters' dtype and the model's width, B > 0). At B = 1 these checks are
    most of the forward's Python: two frames, not five, one C++ crossing, and nothing built per call."""

    __slots__ = ("guard", "values", "env", "live", "params", "tasks", "width", "dtype", "watch")

    def __init__(self, guard: Guard, attrs: tuple, values: tuple, env, width: int, live, params: tuple,
                 tasks: int) -> None:
        self.guard, self.values, self.env, self.width = guard, values, env, width
        self.live, self.params, self.tasks, self.dtype = live, params, tasks, guard.dtype
        # what _C.watch_holds checks, in one call: the guard's module tree, its parameters' metadata (a check per
        # inference-mode state) and the plain attributes with the values read
        self.watch = (guard.modules, guard.types, guard.children, guard.slots, guard.forwards, guard.counts,
                      tuple(guard.metadata), guard.tensors,
                      tuple((d, name, value) for (d, name), value in zip(attrs, values)))

    def run(self, x) -> Tensor | bool | None:
        """``out[B, T]``; False where every check holds but ``cpp.Live`` does not apply; None where a check
        fails (the caller works the call out again)."""
        if not isinstance(x, Tensor) or not x.is_cpu or x.dtype != self.dtype:
            return None
        shape = x.shape
        if len(shape) != 2 or shape[1] != self.width or shape[0] == 0:
            return None
        if not plain_eager(x) or backends.env_backend() != self.env:  # and what "auto" resolves to
            return None
        c, live = cpp_backend._C, self.live
        if self.guard.device.type != "cpu":
            return None
        if c is None:  # no C++ extension: no call is live, the guard's checks in Python
            return False if self.guard.holds(x) else None
        if live is None:
            return False if c.watch_holds(self.watch, _is_inference_mode_enabled()) else None
        if x.is_neg() or not x.is_contiguous() or x.data_ptr() % x.element_size():
            x = x.clone(memory_format=torch.contiguous_format)  # plain, aligned memory
        B = shape[0]
        out = x.new_empty(B, self.tasks)  # x's device and dtype (torch.empty's follow the defaults)
        if not live.run_watched(x.data_ptr(), out.data_ptr(), B, self.params, self.watch,
                                _is_inference_mode_enabled()):
            return None
        return out


def live_applies(x: Tensor, backends_: Sequence[str], tensors: Sequence[Tensor | None]) -> bool:
    """Whether ``cpp.Live`` may run for ``x``: every backend name resolves to the C++ backend for its device and
    dtype, and every tensor is plain contiguous memory (a negative-bit view's memory is not its value)."""
    if any(not isinstance(b, str) or backends.resolve(b, x.device, x.dtype) is not cpp_backend for b in backends_):
        return False
    return all(t is None or (t.is_contiguous() and not t.is_neg()) for t in tensors)


class Towers(KeepsCaches, nn.Module):
    """One small MLP per task, ``in_features -> tower_hidden... -> 1``; ``forward(h)`` -> ``[B, T]``.

    ``h`` is ``[T, B, in_features]`` (one input per task) or ``[B, in_features]`` (shared). In eager mode all
    towers are one autograd node: on CPU, where ``backend`` (the model's; None: ``"auto"``) resolves to the C++
    backend and the towers are small (``CPP_TOWERS_MAX_MACS``), one C++ call each way; else one batched GEMM per
    layer over the tasks. When compiling, tracing, transforming or under autocast, or when a tower is no longer
    plain ``Linear``/``ReLU`` (another module, a hook), one task at a time, module by module.
    """

    def __init__(self, num_tasks: int, in_features: int, tower_hidden: Sequence[int] = (8,),
                 backend: str | None = None) -> None:
        super().__init__()
        self.towers = nn.ModuleList(mlp((in_features, *tower_hidden), 1) for _ in range(num_tasks))
        self.backend = backend

    def forward(self, h: Tensor) -> Tensor:
        params = self._stacked_params(h)
        if params is not None:
            return _StackedTowers.apply(h, len(params) // (2 * len(self.towers._modules)), self.backend, *params)
        outs = [tower(h if h.dim() == 2 else h[t]) for t, tower in enumerate(self.towers)]
        return torch.cat(outs, dim=1)

    def _stacked_params(self, h: Tensor) -> list[Tensor] | None:
        """The towers' parameters in ``_StackedTowers``'s order, or None where it does not apply (``h`` not
        ``[T, B, K]`` or ``[B, K]`` for these towers: the modules then say what is wrong)."""
        params = guarded(self, h, self._tower_modules,
                         lambda: None if _hooked(self) else _tower_params(self.towers, h))
        if params is None or h.dim() not in (2, 3) or h.shape[-1] != params[0].shape[1]:
            return None
        if h.dim() == 3 and h.shape[0] != len(self.towers._modules):
            return None
        return params

    def _tower_modules(self) -> list[nn.Module]:
        """Every module the stacked towers stand in for (what their ``Guard`` watches)."""
        return [self, self.towers, *(m for seq in self.towers._modules.values() for m in (seq, *seq._modules.values()))]


def plain_eager(t: Tensor) -> bool:
    """Whether ops on ``t`` run in plain eager mode on a CPU or CUDA device: nothing compiles, traces, exports,
    transforms (``torch.func``, forward-mode AD) or autocasts, the fused ops are not decomposed
    (``ops.decomposed``), and no global module hook is set (the fused paths that stand in for several modules
    apply only then; otherwise the modules run as they are)."""
    if t.is_cpu:
        if _is_autocast_enabled("cpu"):
            return False
    elif not t.is_cuda or _is_autocast_enabled("cuda"):  # meta, fake, other devices: the modules as they are
        return False
    # (read at every no-grad forward: the C functions themselves, not their Python wrappers, where eager)
    return not (torch.compiler.is_compiling() or torch._C._is_tracing() or ops.is_decomposing()
                or _peek_interpreter_stack() is not None or _forward_ad._current_level >= 0 or _global_hooks())


_is_autocast_enabled = torch.is_autocast_enabled
_is_inference_mode_enabled = torch.is_inference_mode_enabled
_peek_interpreter_stack = torch._C._functorch.peek_interpreter_stack
_forward_ad = torch.autograd.forward_ad


def _tower_params(towers: nn.ModuleList, h: Tensor) -> list[Tensor] | None:
    """The parameters of plain ``Linear, ReLU, ..., Linear(-> 1)`` towers of one shape, layer by layer (the T
    weights, then the T biases), all of ``h``'s dtype and device; None for anything else (a parameter shared by
    two towers included: the modules then run, and autograd adds its gradients up). Reads the modules' own
    dicts (attribute access on modules costs a microsecond a time); a ``Guard`` keeps the answer."""
    if _hooked(towers):
        return None
    seqs = list(towers._modules.values())
    if not seqs or any(type(seq) is not nn.Sequential or _hooked(seq) for seq in seqs):
        return None
    layers = [list(seq._modules.values()) for seq in seqs]
    depth = len(layers[0])
    if depth % 2 == 0 or any(len(mods) != depth for mods in layers):
        return None
    params: list[Tensor] = []
    for i in range(0, depth, 2):
        linears = [mods[i] for mods in layers]
        if any(type(lin) is not nn.Linear or _hooked(lin) for lin in linears):
            return None
        params += [lin._parameters["weight"] for lin in linears]
        params += [lin._parameters["bias"] for lin in linears]
        if i + 1 < depth and any(type(mods[i + 1]) is not nn.ReLU or _hooked(mods[i + 1]) for mods in layers):
            return None
    T = len(seqs)
    width = params[0].shape[1]
    for layer in range(0, len(params), 2 * T):
        shape = params[layer].shape
        if len(shape) != 2 or shape[1] != width or any(w.shape != shape for w in params[layer + 1 : layer + T]):
            return None  # each layer must take the previous one's outputs (else the modules' error is the answer)
        if any(b is None or b.shape != (shape[0],) for b in params[layer + T : layer + 2 * T]):
            return None
        width = shape[0]
    if params[-2 * T].shape[0] != 1:  # the last layer's weight [1, K]: one output per task
        return None
    if len({id(p) for p in params}) != len(params):  # a module shared by towers
        return None
    dtype, cuda = h.dtype, h.is_cuda
    if any(p.dtype != dtype or p.is_cuda != cuda for p in params):
        return None
    if cuda and any(p.get_device() != h.get_device() for p in params):
        return None
    return params


class FusedModule(nn.Module):
    """Base of every module that calls the fused ops: TorchScript cannot compile them, so scripting says so."""

    def __prepare_scriptable__(self):
        raise TypeError(f"torch.jit.script cannot compile {type(self).__name__} (mmoe_fast's fused ops are Python "
                        "custom ops); use torch.jit.trace, torch.export.export, torch.compile or "
                        "mmoe_fast.InferenceSession")


class MultiTaskModel(KeepsCaches, FusedModule):
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
