"""``fit_many``: many independent training runs as one job.

A study of the paper's kind (Figures 4 and 5) is hundreds of runs of one small model. One at a time, each
step of each run pays Python, the dispatcher and thread wake-ups for a few microseconds of arithmetic. Packed as
replicas (``models.replicas.ReplicaStack``), a step of S runs is two batched GEMMs and one C++ call, one run per
thread: ``python benchmarks/bench_fit_many.py`` measures the gain per run-step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .backends import cpp as cpp_backend
from .models.replicas import ReplicaStack, survey
from .train import _as_tensor, _check_fit_args, _cpp_checks, fit, task_losses, task_metrics

_BETAS = (0.9, 0.999)  # torch's Adam/AdamW defaults, which fit uses
_EPS = 1e-8
_OPTIMIZERS = ("adam", "adamw")


def _per_run(value, S: int, name: str) -> list:
    """``value`` for each of S runs: one value for all, or a sequence of S."""
    if isinstance(value, (list, tuple)) or (isinstance(value, Tensor) and value.dim() == 1):
        values = list(value.tolist() if isinstance(value, Tensor) else value)
        if len(values) != S:
            raise ValueError(f"{name}: one value for all runs or one per run ({S}), got {len(values)}")
        return values
    return [value] * S


class _Data:
    """One input of ``fit_many``: a tensor (or array, DataFrame) shared by every run, or one per run (a
    sequence of S, or a tensor ``[S, N, ...]`` with ``per_run``)."""

    def __init__(self, value, S: int, name: str, dtype: torch.dtype, per_run: bool) -> None:
        self.name, self.S = name, S
        self.shared: Tensor | None = None
        self.stacked: Tensor | None = None
        if value is None:
            return
        if isinstance(value, (list, tuple)):
            if len(value) != S:
                raise ValueError(f"{name}: one for all runs or one per run ({S}), got a sequence of {len(value)}")
            parts = [_as_tensor(v, f"{name}[{s}]", dtype) for s, v in enumerate(value)]
            shapes = {tuple(p.shape) for p in parts}
            if len(shapes) != 1:
                raise ValueError(f"{name}: every run's data must have one shape, got {sorted(shapes)}")
            self.stacked = torch.stack(parts).contiguous()
        else:
            t = _as_tensor(value, name, dtype)
            if per_run:
                if t.dim() != 3 or t.shape[0] != S:
                    raise ValueError(f"{name}: per-run data as one tensor must be [{S}, N, ...], got {tuple(t.shape)}")
                self.stacked = t.contiguous()
            else:
                self.shared = t.contiguous()

    def __bool__(self) -> bool:
        return self.shared is not None or self.stacked is not None

    def run(self, s: int) -> Tensor | None:
        return self.shared if self.shared is not None else None if self.stacked is None else self.stacked[s]

    def rows(self, index: Tensor) -> Tensor:
        """``[S, B, ...]``: run s's rows ``index[s]`` (index_select: 3-4x faster than indexing here)."""
        S, B = index.shape
        if self.shared is not None:
            t = self.shared
        else:
            t = self.stacked
            index = index + torch.arange(S)[:, None] * t.shape[1]
            t = t.view(S * t.shape[1], *t.shape[2:])
        out = cpp_backend.fresh(t, (S * B, *t.shape[1:]))  # the pool's: a fresh MB-sized buffer faults its pages
        return torch.index_select(t, 0, index.reshape(-1), out=out).view(S, B, *t.shape[1:])

    def source(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(t[N, ...], rows[S, B])``: run s's rows ``index[s]`` are ``t[rows[s]]`` (no copy of the data)."""
        if self.shared is not None:
            return self.shared, index.contiguous()
        S, n = index.shape[0], self.stacked.shape[1]
        return (self.stacked.view(S * n, *self.stacked.shape[2:]),
                (index + torch.arange(S)[:, None] * n).contiguous())

    def all_rows(self) -> Tensor:
        """``[N, ...]`` shared, or ``[S, N, ...]``."""
        return self.shared if self.shared is not None else self.stacked


# Fewer runs than this train one by one rather than as a FuncStack: vmap's per-step cost pays off only over many
# (paper-sized models, 2 threads, per run-step, 30-step calls: at S = 8 PLE 4.6 ms vmapped vs 3.9 one by one,
# a two-layer MMoE 1.9 vs 1.8; at S = 64 2.2-4x faster, benchmarks/bench_fit_many_models.py).
VMAP_MIN_RUNS = 16


class FuncStack:
    """S models of one architecture trained as one through ``torch.func``: their weights stacked
    (``stack_module_state``), a step is ``vmap(grad(...))`` of ``functional_call`` over the model's own forward,
    whose fused ops run through their vmap rules (on the C++ backend: every op's kernels over the S replicas in
    one call; on the Triton backend: one launch per kernel). The interface of ``ReplicaStack`` (``params``,
    ``step``, ``forward``, ``write_back``), for any model ``vmap`` can run: ``why_not_vmapped`` says which."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        params, buffers = torch.func.stack_module_state(list(models))
        self.names = list(params)
        # Contiguous, as their gradients are made below: torch's fused Adam reads each tensor as flat memory
        # (a model's column-major parameter, a QR factor say, stacked with a gradient of other strides was
        # updated from the wrong elements).
        self.params = [params[n].detach().contiguous() for n in self.names]
        self.buffers = {k: v.detach() for k, v in buffers.items()}
        self.base = copy.deepcopy(models[0]).to("meta")
        self.task_types = tuple(models[0].task_types)
        self.S = len(models)

        def loss(p, b, x, y, coef):
            sums = task_losses(torch.func.functional_call(self.base, (p, b), (x,)), y, self.task_types,
                               reduction="sum")
            return (coef * sums).sum(), sums

        self._step = torch.func.vmap(torch.func.grad(loss, has_aux=True), in_dims=(0, 0, 0, 0, None))
        self._outputs = {dim: torch.func.vmap(lambda p, b, x: torch.func.functional_call(self.base, (p, b), (x,)),
                                              in_dims=(0, 0, dim)) for dim in (None, 0)}

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def step(self, x: Tensor, y: Tensor, coef: Tensor, active: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """``(sums[S, T] float64, grads)``, as ``ReplicaStack.step`` (every replica computed; ``active`` unused:
        a stopped run's gradients are not applied)."""
        self.base.train()
        grads, sums = self._step(dict(zip(self.names, self.params)), self.buffers, x, y.to(self.dtype),
                                 coef.to(self.dtype))
        return sums.double(), [grads[n].contiguous() for n in self.names]

    def finite(self, sums: Tensor, grads: list[Tensor]) -> Tensor:
        """``[S]``: whether each replica's loss sums and gradients are finite."""
        total = sums.sum(1)
        for g in grads:
            total = total + g.reshape(self.S, -1).sum(1, dtype=torch.float64)
        return torch.isfinite(total)

    def forward(self, x: Tensor, chunk: int = 4096) -> Tensor:
        """``out[S, N, T]`` on the same rows ``x[N, D]`` or each replica's ``x[S, N, D]`` (eval mode)."""
        self.base.eval()
        p = dict(zip(self.names, self.params))
        with torch.no_grad():
            if x.dim() == 2:
                parts = [self._outputs[None](p, self.buffers, x[i : i + chunk]) for i in range(0, len(x), chunk)]
            else:
                parts = [self._outputs[0](p, self.buffers, x[:, i : i + chunk]) for i in range(0, x.shape[1], chunk)]
        return torch.cat(parts, 1)

    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Copy replica s's weights into ``models[s]``."""
        with torch.no_grad():
            for s, model in enumerate(models):
                named = dict(model.named_parameters())
                for name, stacked in zip(self.names, self.params):
                    named[name].copy_(stacked[s])


def why_not_vmapped(models: Sequence[nn.Module], x: Tensor, y: Tensor) -> str | None:
    """Why ``models`` cannot train as one ``FuncStack`` (a sentence), or None: one architecture, a model with
    ``task_types``, every parameter trained, no ``extra_loss``, and a probe step and forward on two rows of ``x``,
    ``y`` that ``vmap`` runs (randomness such as dropout, a buffer updated in place such as batch norm's,
    data-dependent control flow: refused)."""
    if not isinstance(x, Tensor) or not all(hasattr(m, "task_types") for m in models):
        return "the inputs are not one tensor, or a model has no task_types"
    if any(not p.requires_grad for m in models for p in m.parameters()):
        return "a model freezes a parameter (fit leaves it as it is; the stack would train it)"
    if any(callable(getattr(m, "extra_loss", None)) for m in models):
        return "a model has an extra_loss (fit adds it to the loss; the stack's loss is the tasks' alone)"
    try:
        stack = FuncStack(models)
        rows = x[:2] if x.dim() == 2 else x[:, :2]
        xs = rows.expand(len(models), *rows.shape) if x.dim() == 2 else rows
        ys = (y[:2] if y.dim() == 2 else y[:, :2]).expand(len(models), 2, y.shape[-1])
        stack.step(xs.to(stack.dtype), ys, torch.ones(ys.shape[-1]))
        stack.forward(xs)
    except Exception as exc:  # noqa: BLE001 - any failure means: train them one by one
        return f"torch.func cannot run them ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive stretches ``[a, b)`` of sorted ``indices``."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def fit_many(
    models: Sequence[nn.Module], x, y, *, x_val=None, y_val=None, per_run_data: bool = False, epochs: int = 10,
    batch_size: int = 128, lr: float | Sequence[float] = 1e-3, seed: int | Sequence[int] = 0,
    steps: int | None = None, loss_weights: Sequence[float] | None = None, optimizer: str = "adam",
    weight_decay: float = 0.0, main_task: int = 0, patience: int | None = None, packed: bool | None = None,
    progress: bool = True, log: Callable[[str], None] = print,
) -> list[dict]:
    """Train each of ``models`` as ``fit(models[s], ..., lr=lr[s], seed=seed[s])`` would, all at once.

    Returns one dict per model: ``history`` (``fit``'s per-epoch records), ``error`` (None, or why the run
    stopped, as ``fit``'s FloatingPointError says it: a non-finite loss or gradient, the step not applied and the
    model keeping its last finite weights; or an update that made a weight non-finite, applied, as ``fit``
    leaves its model) and ``stopped_early`` (``patience`` ended it; its best epoch's weights are restored).
    Runs are independent: one that diverges or stops early leaves the others as they would be alone.

    - ``x``, ``y`` (and ``x_val``, ``y_val``): one data set for every run (a tensor, NumPy array or DataFrame),
      or one per run: a sequence of S of one shape, or, with ``per_run_data=True``, tensors ``[S, N, ...]``.
    - ``lr``, ``seed`` (the batch order's, as ``fit``'s): one value, or one per run. The models' initial
      weights are the models' own.
    - ``packed``: None (default) packs the runs into one ``ReplicaStack`` where they can be (MMoE, OMoE,
      Shared-Bottom, Single-Task or L2-Constrained with one expert/bottom/task layer and plain towers, one
      architecture, float32/float64 on the CPU, the C++ kernels built); otherwise trains them as one
      ``FuncStack`` (``torch.func``: any model ``vmap`` runs, its fused ops through their replica kernels) where
      ``why_not_vmapped`` allows and there are at least ``VMAP_MIN_RUNS`` runs, else one after another with
      ``fit``. True refuses (ValueError, saying why) what cannot be packed; False always runs them one by one.
      Each gives each run's ``fit`` results within floating-point rounding (sums in another order); each
      result's ``engine`` says which ran ("packed", "vmapped", "one by one").
    - ``epochs``, ``batch_size``, ``steps``, ``loss_weights``, ``optimizer`` ("adam" or "adamw", fused as fit's),
      ``weight_decay``, ``main_task``, ``patience``: as ``fit``'s, the same for every run.
    """
    models = list(models)
    S = len(models)
    if S == 0:
        raise ValueError("fit_many needs at least one model")
    lrs = [float(v) for v in _per_run(lr, S, "lr")]
    seeds = [int(v) for v in _per_run(seed, S, "seed")]
    if any(not (math.isfinite(v) and v >= 0) for v in lrs):
        raise ValueError(f"lr must be finite and >= 0, got {lrs}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(_OPTIMIZERS)}, got {optimizer!r}")
    reason, parts = survey(models)
    if packed and reason is not None:
        raise ValueError(f"fit_many(packed=True): these runs cannot be packed: {reason}")
    dtype = next(models[0].parameters()).dtype
    data = [_Data(v, S, n, dtype, per_run_data) for v, n in ((x, "x"), (y, "y"), (x_val, "x_val"), (y_val, "y_val"))]
    common = dict(epochs=epochs, batch_size=batch_size, steps=steps, loss_weights=loss_weights, optimizer=optimizer,
                  weight_decay=weight_decay, main_task=main_task, patience=patience)
    if packed is False:
        return _one_by_one(models, data, lrs, seeds, common, progress, log)
    if reason is None:
        return _packed(models, data, lrs, seeds, common, progress, log, ReplicaStack(models, parts), "packed")
    X, Y = data[0], data[1]
    if S < VMAP_MIN_RUNS or why_not_vmapped(models, *(d.all_rows() for d in (X, Y))) is not None:
        return _one_by_one(models, data, lrs, seeds, common, progress, log)
    return _packed(models, data, lrs, seeds, common, progress, log, FuncStack(models), "vmapped")


def _one_by_one(models, data, lrs, seeds, common, progress, log) -> list[dict]:
    results = []
    bar = tqdm(total=len(models), desc=f"{len(models)} runs, one by one", disable=not progress)
    with bar:
        for s, model in enumerate(models):
            xs, ys, xv, yv = (d.run(s) for d in data)
            try:
                history = fit(model, xs, ys, x_val=xv, y_val=yv, lr=lrs[s], seed=seeds[s], progress=False,
                              log=lambda _: None, **common)
                stopped = common["patience"] is not None and _stopped(history, common)
                results.append({"history": history, "error": None, "stopped_early": stopped, "engine": "one by one"})
            except FloatingPointError as exc:
                results.append({"history": getattr(exc, "history", []), "error": str(exc), "stopped_early": False,
                                "engine": "one by one"})
            bar.update()
    log(_summary(results))
    return results


def _stopped(history: list[dict], common: dict) -> bool:
    """Whether ``fit`` ended before its length (early stopping)."""
    steps, last = common["steps"], history[-1]["step"] if history else 0
    if steps is not None:
        return last < steps
    return len(history) < common["epochs"]


def _overflowed(params: list[Tensor], S: int, stretches: list[tuple[int, int]]) -> Tensor | None:
    """None where the runs in ``stretches`` (``[a, b)`` of the stacks ``params``, ``[S, ...]`` each) have finite
    weights (one C++ pass over a stretch's memory where it can read it), else ``[S]`` bool: the runs with a
    non-finite weight (``isfinite`` per run of a stretch that has one: exact, where a sum of large finite weights
    could overflow). A stopped run's weights, left as its last update made them, are outside the stretches and
    cost nothing."""
    bad = None
    for a, z in stretches:
        part = [t[a:z] for t in params] if z - a < S else params
        if _cpp_checks(part) and cpp_backend.first_non_finite(part) is None:
            continue
        finite = torch.stack([p.reshape(z - a, -1).isfinite().all(1) for p in part]).all(0)
        if not bool(finite.all()):
            bad = torch.zeros(S, dtype=torch.bool) if bad is None else bad
            bad[a:z] = ~finite
    return bad


def _summary(results: list[dict]) -> str:
    bad = sum(r["error"] is not None for r in results)
    early = sum(r["stopped_early"] for r in results)
    return f"fit_many: {len(results)} runs, {bad} diverged, {early} stopped early"


def _packed(models, data, lrs, seeds, common, progress, log, stack, engine: str) -> list[dict]:
    X, Y, XV, YV = data
    S = len(models)
    model = models[0]
    task_types = tuple(model.task_types)
    T = len(task_types)
    main_task, patience, batch_size = common["main_task"], common["patience"], common["batch_size"]
    loss_weights = common["loss_weights"]
    weights = torch.ones(T) if loss_weights is None else torch.as_tensor(loss_weights, dtype=torch.float32)
    for s in range(S):  # fit's checks, run by run (its messages name x, y: the run is added); shared data once
        if s > 0 and all(d.stacked is None for d in data):
            break
        try:
            _check_fit_args(models[s], X.run(s), Y.run(s), XV.run(s), YV.run(s), weights, common["optimizer"],
                            main_task, patience, None, None, batch_size, common["steps"])
        except ValueError as exc:
            raise ValueError(f"run {s}: {exc}") from None
    params = stack.params
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    count = torch.zeros((), dtype=torch.float32)
    kernel = torch._fused_adamw_ if common["optimizer"] == "adamw" else torch._fused_adam_
    n = len(X.all_rows()) if X.shared is not None else X.stacked.shape[1]
    per_epoch = math.ceil(n / batch_size)
    total = common["steps"] if common["steps"] is not None else common["epochs"] * per_epoch
    gens = [torch.Generator().manual_seed(sd) for sd in seeds]
    higher_is_better = task_types[main_task] == "binary"
    main_metric = "auc" if higher_is_better else "mse"
    results = [{"history": [], "error": None, "stopped_early": False, "engine": engine} for _ in range(S)]
    active = [True] * S
    best: list = [None] * S
    best_state: list = [None] * S
    bad_epochs = [0] * S
    step, epoch = 0, 1  # epochs count from 1, as fit's
    coefs: dict[int, Tensor] = {}  # the loss gradient's scale per batch size
    plans: dict[tuple, list] = {}
    updated: list[tuple[int, int]] = []  # the stretches of runs the last plan updates
    bar = tqdm(total=total, desc=f"{S} runs, {engine}", disable=not progress)
    has_penalty = getattr(stack, "alphas", None) is not None  # L2-Constrained: fit adds its extra_loss
    # ReplicaStack's Adam in each replica's thread, right after its gradients (one pass over the weights fewer)
    in_step = getattr(stack, "updates_in_step", False)
    lr_runs = torch.tensor(lrs, dtype=torch.float64)
    trainer = None

    def stop(s: int, message: str) -> None:
        active[s] = False
        results[s]["error"] = message

    with bar, torch.no_grad():
        while step < total and any(active):
            orders = torch.stack([torch.randperm(n, generator=g) for g in gens])
            full = n // batch_size  # the epoch's batches, each a contiguous [S, rows] (its rows: no copy a step)
            parts = list(orders[:, : full * batch_size].reshape(S, full, batch_size).transpose(0, 1).contiguous())
            if full * batch_size < n:
                parts.append(orders[:, full * batch_size :].contiguous())
            loss_sum = torch.zeros((S, T), dtype=torch.float64)
            extra_sum = torch.zeros(S, dtype=torch.float64)  # L2-Constrained's penalty, as fit's extra_loss
            rows_seen, batches = 0, 0
            started = list(active)
            for b in range(per_epoch):
                if step >= total or not any(active):
                    break
                index = parts[b]
                rows = index.shape[1]
                if in_step:  # the kernel gathers each run's rows in its thread
                    (xb, xrow), (yb, yrow) = X.source(index), Y.source(index)
                    if trainer is None:
                        trainer = stack.trainer(xb, yb, (exp_avgs, exp_avg_sqs), common["weight_decay"],
                                                common["optimizer"] == "adamw", _BETAS, _EPS)
                else:
                    xb, yb = X.rows(index), Y.rows(index)
                if rows not in coefs:
                    coefs[rows] = weights.to(dtype=stack.dtype) * (1.0 / rows)
                mask = None if all(active) else torch.tensor(active)
                overflowed = None  # the runs whose update made a weight non-finite
                if in_step:  # the same check and update, in the kernel
                    sums, failed, overflowed = trainer(xrow, yrow, coefs[rows], lr_runs, step + 1, mask)
                else:
                    sums, grads = stack.step(xb, yb, coefs[rows], mask)
                extra = stack.add_penalty(grads) if has_penalty else None
                # One check per run: its loss sums and bias gradient (the column sums of its dY) finite.
                if in_step:
                    finite = None if failed is None else ~failed
                else:
                    finite = (stack.finite(sums, grads) if hasattr(stack, "finite") else
                              torch.isfinite(sums.sum(1) + grads[1].sum(1, dtype=torch.float64)))
                if extra is not None:
                    finite &= torch.isfinite(extra)  # finite weights (checked) give it a finite gradient
                if finite is not None and not bool(finite.all()):
                    for s in (~finite).nonzero().flatten().tolist():
                        if active[s]:
                            part = "" if extra is None else f", extra_loss {extra[s].item()}"
                            stop(s, f"training diverged at epoch {epoch}, step {step + 1}: non-finite training "
                                    f"loss or gradient before the update (per-task sums {sums[s].tolist()}{part}); "
                                    f"nothing of this step was applied; lower the learning rate (now {lrs[s]}) "
                                    "or check the inputs")
                key = () if in_step else tuple(active)
                if key not in plans:  # the runs still going, by learning rate, in stretches of the stacks
                    live = [s for s in range(S) if active[s]]
                    plans = {key: [(value, a, z) for value in sorted({lrs[s] for s in live})
                                   for a, z in _runs([s for s in live if lrs[s] == value])]}
                    updated = _runs(live)  # what the weight check reads (whatever the learning rates)
                if not in_step:
                    count.add_(1)
                for value, a, z in plans[key] if not in_step else ():
                    sl = [t[a:z] for t in params] if z - a < S else params
                    kernel(sl, [g[a:z] for g in grads] if z - a < S else grads,
                           [t[a:z] for t in exp_avgs] if z - a < S else exp_avgs,
                           [t[a:z] for t in exp_avg_sqs] if z - a < S else exp_avg_sqs,
                           [], [count] * len(sl), amsgrad=False, lr=value, beta1=_BETAS[0], beta2=_BETAS[1],
                           weight_decay=common["weight_decay"], eps=_EPS, maximize=False, grad_scale=None,
                           found_inf=None)
                if not in_step and plans[key]:  # the weights after the update, as fit's every step (the kernel's own)
                    overflowed = _overflowed(params, S, updated)
                if overflowed is not None:  # as fit: the update was applied, the run ends
                    for s in overflowed.nonzero().flatten().tolist():
                        if active[s]:
                            stop(s, f"training diverged at epoch {epoch}, step {step + 1}: the update made the "
                                    f"weights non-finite; lower the learning rate (now {lrs[s]}) or check the inputs")
                loss_sum += sums
                if extra is not None:
                    extra_sum += extra
                rows_seen += rows
                batches += 1
                step += 1
                bar.update()
            out = stack.forward(XV.all_rows()) if XV else None
            for s in range(S):
                if not (started[s] and active[s]):
                    continue
                record = {"epoch": epoch, "step": step, "train_loss": (loss_sum[s] / rows_seen).tolist(),
                          "lr": lrs[s]}
                if has_penalty:
                    record["train_extra_loss"] = extra_sum[s].item() / batches
                if out is not None:
                    yv = YV.run(s).to(out)
                    record["val_loss"] = task_losses(out[s], yv, task_types).double().tolist()
                    record["val_metrics"] = task_metrics(out[s], yv, task_types)
                    value = record["val_metrics"][main_task][main_metric]
                    if math.isnan(value) and patience is not None:
                        stop(s, f"epoch {epoch}: task{main_task}'s validation {main_metric} is nan (non-finite "
                                "predictions): early stopping cannot compare it")
                        continue
                    improved = best[s] is None or (value > best[s] if higher_is_better else value < best[s])
                    if improved and not math.isnan(value):
                        best[s], bad_epochs[s] = value, 0
                        if patience is not None:
                            best_state[s] = (epoch, [p[s].clone() for p in params])
                    else:
                        bad_epochs[s] += 1
                    if patience is not None and bad_epochs[s] >= patience:
                        active[s] = False
                        results[s]["stopped_early"] = True
                results[s]["history"].append(record)
            running = sum(active)
            text = f"epoch {epoch}: {running} of {S} runs going"
            if out is not None:
                finals = [mean for r in results if r["history"] and r["history"][-1]["epoch"] == epoch
                          for mean in [sum(r["history"][-1]["val_loss"]) / T] if math.isfinite(mean)]
                if finals:
                    text += f", mean validation loss {sum(finals) / len(finals):.4f}"
            log(text)
            epoch += 1
        for s in range(S):
            if best_state[s] is not None:
                for p, kept in zip(params, best_state[s][1]):
                    p[s].copy_(kept)
        stack.write_back(models)
    log(_summary(results))
    return results
