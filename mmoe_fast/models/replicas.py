"""S models of one small architecture as one: ``ReplicaStack`` packs MMoE, OMoE, Shared-Bottom, Single-Task or
L2-Constrained replicas (one expert, bottom or task layer, plain towers) into stacked tensors, so that a training
step of all S is one C++ call, one replica per thread, its GEMMs included (``fit_many``'s engine).

The first layer of every replica is one matrix ``Wcat[D, C]``: the experts' weights side by side (``C = E * H``
columns; Single-Task's task networks are its E = T "experts", task t's tower reading expert t alone), then the
gates' (``num_gates * E``); ``_C.replicas_step`` does the GEMM, the gates' softmax, the mixture, the towers,
the loss and every gradient (``dWcat = x^T dY`` too) in the replica's thread. L2-Constrained's penalty
and its gradient are added on the stacked tensors (``add_penalty``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..backends import cpp as cpp_backend
from .baselines import L2Constrained, SingleTask
from .common import Towers, _hooked, _tower_params
from .mmoe import MMoE, MMoELayer, OMoE, OMoELayer
from .shared_bottom import SharedBottom

_TASK_NETS = (SingleTask, L2Constrained)  # per-task networks: task t's tower reads task layer t alone
_KINDS = (MMoE, OMoE, SharedBottom, *_TASK_NETS)
# What packing stands in for: each kind's forward (and the task networks' hidden layers and penalty), as defined.
_FORWARDS = {kind: kind.forward for kind in (*_KINDS, MMoELayer, Towers)}
_TASK_PARTS = {kind: (kind.hidden, kind._layer) for kind in _TASK_NETS}
_PENALTY = L2Constrained.extra_loss


def _first_layer(model: nn.Module) -> tuple | None:
    """``(W[D, C], bias[C] or None, absent bias columns, E, H, num_gates, activation)`` of a packable model, as
    views of its parameters; None where the model is not one ``ReplicaStack`` packs."""
    if type(model) in _TASK_NETS:
        if (len(model.task_weights) != 1 or "hidden" in model.__dict__ or "_layer" in model.__dict__
                or (type(model).hidden, type(model)._layer) != _TASK_PARTS[type(model)]):
            return None
        w, b = model.task_weights[0], model.task_biases[0]
        T, D, H = w.shape
        return w.permute(1, 0, 2).reshape(D, T * H), b.reshape(-1), [], T, H, 0, model.activation
    if isinstance(model, SharedBottom):
        bottom = model.bottom
        mods = list(bottom._modules.values())
        if (type(bottom) is not nn.Sequential or "forward" in bottom.__dict__ or len(mods) != 2
                or type(mods[0]) is not nn.Linear or type(mods[1]) is not nn.ReLU or _hooked(bottom)
                or any(_hooked(m) or "forward" in m.__dict__ for m in mods)):
            return None
        lin = mods[0]
        return lin.weight.t(), lin.bias, [], 1, lin.weight.shape[0], 0, "relu"
    layer = model.mixture
    if (type(layer) not in (MMoELayer, OMoELayer) or "forward" in layer.__dict__
            or MMoELayer.forward is not _FORWARDS[MMoELayer] or _hooked(layer) or len(layer.expert_weights) != 1):
        return None
    w, b, wg, bg = layer.expert_weights[0], layer.expert_biases[0], layer.gate_weight, layer.gate_bias
    E, D, H = w.shape
    G = wg.shape[0]
    if wg.shape[2] != E or G not in (1, model.num_tasks):
        return None
    W = torch.cat([w.permute(1, 0, 2).reshape(D, E * H), wg.permute(1, 0, 2).reshape(D, G * E)], 1)
    parts = [b.reshape(-1) if b is not None else w.new_zeros(E * H), bg.reshape(-1) if bg is not None
             else w.new_zeros(G * E)]
    absent = ([] if b is not None else list(range(E * H))) + ([] if bg is not None else
                                                               list(range(E * H, E * H + G * E)))
    return W, torch.cat(parts), absent, E, H, G, layer.activation


def why_not_packed(models: Sequence[nn.Module]) -> str | None:
    """Why ``models`` cannot be one ``ReplicaStack`` (a sentence), or None when they can."""
    return survey(models)[0]


def survey(models: Sequence[nn.Module]) -> tuple[str | None, tuple | None]:
    """``(why_not_packed(models), parts)``: where they pack, ``parts`` is what the check read (each model's
    ``_first_layer`` and tower parameters), for ``ReplicaStack(models, parts=parts)`` not to read it again."""
    if not models:
        return "there are no models", None
    if cpp_backend.unavailable_reason() is not None:
        return cpp_backend.unavailable_reason(), None
    first = models[0]
    layers, tower_lists = [], []
    for i, model in enumerate(models):
        kind = type(model)
        if kind not in _KINDS:
            return (f"model {i} is a {kind.__name__}; replicas pack MMoE, OMoE, SharedBottom, SingleTask and "
                    "L2Constrained only"), None
        if kind is not type(first):
            return f"model {i} is a {kind.__name__}, model 0 a {type(first).__name__}", None
        towers = model.__dict__["_modules"].get("towers")
        if ("forward" in model.__dict__ or kind.forward is not _FORWARDS[kind] or _hooked(model)
                or type(towers) is not Towers or "forward" in towers.__dict__ or Towers.forward is not _FORWARDS[Towers]
                or _hooked(towers)):
            return f"model {i} has hooks, a replaced forward or other towers", None
        extra = getattr(model, "extra_loss", None)
        if callable(extra) and (kind is not L2Constrained or "extra_loss" in model.__dict__
                                or kind.extra_loss is not _PENALTY):
            return (f"model {i} has an extra_loss of its own (fit adds it to the loss; the replicas cannot form "
                    "it)"), None
        if getattr(model, "backend", None) == "reference" or any(getattr(m, "backend", None) == "reference"
                                                                 for m in model.modules()):
            return f"model {i} asks for the reference backend (plain PyTorch, the oracle)", None
        params = list(model.parameters())
        if any(p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64) for p in params):
            return f"model {i} is not float32/float64 on the CPU", None
        if len({p.dtype for p in params}) != 1:
            return f"model {i} mixes dtypes", None
        if len({id(p) for p in params}) != len(params) or any(not p.requires_grad for p in params):
            return f"model {i} shares or freezes a parameter", None
        with torch.no_grad():  # the stacks' first layer: a copy, out of autograd
            layer = _first_layer(model)
        if layer is None:
            return f"model {i} has more than one expert/bottom/task layer or a changed layer", None
        towers = _tower_params(model.towers.towers, params[0].new_empty((1, layer[4])))
        if towers is None or len(towers) % (2 * model.num_tasks):
            return f"model {i}'s towers are not plain Linear/ReLU stacks of one shape", None
        shapes = ([tuple(p.shape) for p in params], layer[3:], tuple(model.task_types), params[0].dtype,
                  layer[2] == [])
        if i == 0:
            reference = shapes
        elif shapes != reference:
            return (f"model {i}'s architecture (shapes, activation, tasks, dtype or biases) differs from model "
                    "0's"), None
        layers.append(layer)
        tower_lists.append(towers)
    return None, (layers, tower_lists)


class ReplicaStack:
    """``models`` (``why_not_packed`` says which) as stacked tensors: ``params`` (``[S, ...]`` leaves: the first
    layer ``W[S, D, C]`` and ``bias[S, C]``, then the towers' parameters in ``_tower_params``' order). ``step``
    gives the loss sums and every gradient of a batch per replica; ``forward`` the outputs; ``write_back`` puts
    the weights into the models."""

    def __init__(self, models: Sequence[nn.Module], parts: tuple | None = None) -> None:
        """``parts``: ``survey(models)``'s, taken just now (the models are not read again)."""
        if parts is None:
            reason, parts = survey(models)
            if reason is not None:
                raise ValueError(f"these models cannot be packed as replicas: {reason}")
        layers, towers = parts
        self.kind = type(models[0])
        self.task_types = tuple(models[0].task_types)
        _, _, self.absent, self.E, self.H, self.num_gates, self.activation = layers[0]
        self.num_tasks = len(self.task_types)
        with torch.no_grad():
            self.num_tower_layers = len(towers[0]) // (2 * self.num_tasks)
            self.params = [torch.stack([lay[0] for lay in layers]).contiguous(),
                           torch.stack([lay[1] for lay in layers]).contiguous(),
                           *(torch.stack([t[k] for t in towers]).contiguous() for k in range(len(towers[0])))]
        self.S = len(models)
        # L2-Constrained's alpha per replica, [S, 1]; None: no penalty
        self.alphas = (torch.tensor([[m.alpha] for m in models], dtype=self.dtype) if self.kind is L2Constrained
                       else None)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def step(self, x: Tensor, y: Tensor, coef: Tensor, active: Tensor | None = None, weight: Tensor | None = None
             ) -> tuple[Tensor, list[Tensor]]:
        """``(sums[S, T] float64, grads)`` for the batches ``x[S, B, D]``, ``y[S, B, T]``: each replica's per-task
        loss sums (BCE with logits for binary tasks, squared error otherwise; rows weighted by ``weight[S, B, T]``)
        and the gradient of ``sum_t coef[t] * sums[t]``, one per ``params`` entry. ``active[S]`` (bool): the
        replicas to compute (the others' sums and gradients are zero)."""
        W, bias, *towers = self.params
        _, sums, dW, dbias, tower_grads = cpp_backend.replicas_step(
            x, W, bias, self.E, self.H, self.num_gates, towers, self.num_tower_layers, self.activation, y=y,
            binary=[t == "binary" for t in self.task_types], coef=coef, weight=weight, active=active)
        if self.absent:  # a layer without a bias: its columns stay zero
            dbias[:, self.absent] = 0
        return sums, [dW, dbias, *tower_grads]

    @property
    def updates_in_step(self) -> bool:
        """Whether ``trainer`` applies: every first-layer column has a bias and no penalty is added to the
        gradients (else ``step``, then ``add_penalty``, then an optimizer)."""
        return not self.absent and self.alphas is None

    def trainer(self, x: Tensor, y: Tensor, moments: tuple[list, list], weight_decay: float, adamw: bool,
                betas: tuple = (0.9, 0.999), eps: float = 1e-8) -> cpp_backend.ReplicaTrainer:
        """Where ``updates_in_step``: a ``cpp_backend.ReplicaTrainer`` that trains ``params`` on rows of ``x[N, D]``
        and ``y[M, T]``: each call a step (``step``'s loss and gradients) and each replica's Adam (AdamW) update in
        its thread right after its gradients (``moments``: ``(exp_avgs, exp_avg_sqs)`` laid out as ``params``),
        unless its loss or bias gradient is not finite (that replica is then left unchanged)."""
        W, bias, *towers = self.params
        return cpp_backend.ReplicaTrainer(x, y, W, bias, self.E, self.H, self.num_gates, towers,
                                          self.num_tower_layers, self.activation,
                                          [t == "binary" for t in self.task_types], moments, betas, eps,
                                          weight_decay, adamw)

    def add_penalty(self, grads: list[Tensor]) -> Tensor | None:
        """L2-Constrained's ``alpha * sum_{i<j} ||theta_i - theta_j||^2`` (``extra_loss``: theta_t being task t's
        task layer and tower) per replica, ``[S]`` float64, its gradient added to ``grads`` (``step``'s); None,
        and nothing added, for the other kinds."""
        if self.alphas is None:
            return None
        W, bias, *towers = self.params
        S, T, H = self.S, self.num_tasks, self.H
        # Each parameter group as T tensors [S, n], task t's: the task layer's columns, then each tower layer's
        # T weights and T biases (towers' order: layer by layer, the weights then the biases).
        groups = [([W.view(S, -1, T, H)[:, :, t] for t in range(T)], [grads[0].view(S, -1, T, H)[:, :, t]
                                                                      for t in range(T)]),
                  ([bias.view(S, T, H)[:, t] for t in range(T)], [grads[1].view(S, T, H)[:, t] for t in range(T)])]
        groups += [(towers[k : k + T], grads[2 + k : 2 + k + T]) for k in range(0, len(towers), T)]
        penalty = torch.zeros(S, dtype=torch.float64)
        for ps, gs in groups:
            for i in range(T):
                for j in range(i + 1, T):
                    d = ps[i] - ps[j]
                    penalty += d.reshape(S, -1).square().sum(1, dtype=torch.float64)
                    d = d.reshape(S, -1).mul_(2 * self.alphas).view_as(d)
                    gs[i].add_(d)
                    gs[j].sub_(d)
        return penalty.mul_(self.alphas[:, 0].double())

    def forward(self, x: Tensor, chunk: int = 1024) -> Tensor:
        """``out[S, N, T]`` of every replica on its rows ``x[S, N, D]``, or on the same rows ``x[N, D]`` (``chunk``
        rows at a time)."""
        W, bias, *towers = self.params
        outs = []
        for i in range(0, x.shape[-2], chunk):
            rows = (x[i : i + chunk] if x.dim() == 2 else x[:, i : i + chunk]).contiguous()
            outs.append(cpp_backend.replicas_step(rows, W, bias, self.E, self.H, self.num_gates, towers,
                                                  self.num_tower_layers, self.activation))
        return torch.cat(outs, 1) if len(outs) != 1 else outs[0]

    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Copy replica s's weights into ``models[s]`` (the models this stack was made from): each stacked tensor
        seen as the models' layout, split by replica and copied in one ``_foreach_copy_``."""
        W, bias, *towers = self.params
        S, E, H, G = self.S, self.E, self.H, self.num_gates
        D = W.shape[1]
        dst: list[Tensor] = []
        src: list[Tensor] = []

        def put(params: list, stacked: Tensor) -> None:
            dst.extend(params)
            src.extend(stacked.unbind(0))

        if self.kind is SharedBottom:
            put([m.bottom[0].weight for m in models], W.transpose(1, 2))
            put([m.bottom[0].bias for m in models], bias)
        elif self.kind in _TASK_NETS:
            put([m.task_weights[0] for m in models], W.reshape(S, D, E, H).permute(0, 2, 1, 3))
            put([m.task_biases[0] for m in models], bias.reshape(S, E, H))
        else:
            layers = [m.mixture for m in models]
            put([lay.expert_weights[0] for lay in layers], W[:, :, : E * H].reshape(S, D, E, H).permute(0, 2, 1, 3))
            put([lay.gate_weight for lay in layers], W[:, :, E * H :].reshape(S, D, G, E).permute(0, 2, 1, 3))
            if layers[0].expert_biases[0] is not None:
                put([lay.expert_biases[0] for lay in layers], bias[:, : E * H].reshape(S, E, H))
            if layers[0].gate_bias is not None:
                put([lay.gate_bias for lay in layers], bias[:, E * H :].reshape(S, G, E))
        params = [_tower_params(m.towers.towers, W.new_empty((1, H))) for m in models]
        for k, stacked in enumerate(towers):
            put([p[k] for p in params], stacked)
        with torch.no_grad():
            torch._foreach_copy_(dst, src)
