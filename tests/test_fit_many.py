"""Many runs as one job: the replicas' C++ step against plain PyTorch, ReplicaStack's packing, and fit_many against
separate fit runs (packed and one by one), bad input included."""

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

import mmoe_fast as mf
from mmoe_fast import fit_many
from mmoe_fast.backends import cpp as cpp_backend

try:
    from mmoe_fast.backends import triton as triton_backend
except ImportError:  # triton not installed
    triton_backend = None
from mmoe_fast.models.replicas import ReplicaStack, why_not_packed
from mmoe_fast.testing import assert_close
from mmoe_fast.train import fit

needs_cpp = pytest.mark.skipif(cpp_backend.unavailable_reason() is not None, reason="mmoe_fast._C is not built")
ACT = {"relu": torch.relu, "silu": F.silu, "gelu": lambda z: F.gelu(z, approximate="tanh")}


def _reference_step(x, W, bias, E, H, nG, towers, L, act, y, binary, coef, weight):
    """Plain PyTorch (autograd) of ReplicaStep, replica by replica: out, sums, dW, dbias, tower grads."""
    S, D, C = W.shape
    B = x.shape[-2]
    T = len(towers) // (2 * L)
    outs, sums, dWs, dbs, dts = [], [], [], [], [[] for _ in towers]
    for s in range(S):
        ws, bs = W[s].detach().requires_grad_(True), bias[s].detach().requires_grad_(True)
        z = (x[s] if x.dim() == 3 else x) @ ws + bs
        tw = [p[s].detach().requires_grad_(True) for p in towers]
        f = ACT[act](z[:, : E * H]).view(B, E, H)
        if nG == 0:  # E == 1: one bottom for every task; E == T: task t's own network
            hs = [f[:, t if E > 1 else 0] for t in range(T)]
        else:
            G = torch.softmax(z[:, E * H :].view(B, nG, E), -1)
            hs = [(G[:, t if nG > 1 else 0, :, None] * f).sum(1) for t in range(T)]
        cols = []
        for t in range(T):
            a = hs[t]
            for layer in range(L):
                a = a @ tw[2 * T * layer + t].t() + tw[2 * T * layer + T + t]
                a = torch.relu(a) if layer < L - 1 else a
            cols.append(a[:, 0])
        out = torch.stack(cols, 1)
        w = torch.ones_like(out) if weight is None else weight[s]
        per = torch.where(torch.tensor(binary), F.binary_cross_entropy_with_logits(out, y[s], reduction="none"),
                          (out - y[s]).square())
        task_sums = (w * per).sum(0)
        grads = torch.autograd.grad((coef * task_sums).sum(), [ws, bs, *tw])
        outs.append(out.detach())
        sums.append(task_sums.detach().double())
        dWs.append(grads[0])
        dbs.append(grads[1])
        for k, g in enumerate(grads[2:]):
            dts[k].append(g)
    return (torch.stack(outs), torch.stack(sums), torch.stack(dWs), torch.stack(dbs), [torch.stack(g) for g in dts])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("kind,T,E,H,hidden,B,D", [
    ("mmoe", 2, 8, 16, (8,), 128, 100), ("mmoe", 1, 1, 1, (), 1, 1), ("mmoe", 3, 5, 17, (4, 6), 33, 9),
    ("omoe", 2, 3, 5, (3,), 7, 17), ("omoe", 4, 2, 33, (), 2, 8), ("sb", 2, 1, 13, (8,), 65, 3),
    ("sb", 1, 1, 1, (2,), 1, 2), ("sb", 2, 1, 64, (2,), 19, 16), ("st", 2, 2, 16, (8,), 33, 7),
    ("st", 3, 3, 5, (), 1, 33), ("st", 4, 4, 17, (3, 2), 9, 5)])
def test_replicas_step_equals_plain_pytorch(kind, T, E, H, hidden, B, D, act, dtype, isa):
    torch.manual_seed(T * 1000 + E * 100 + H + B + D)
    S = 3
    nG = {"mmoe": T, "omoe": 1, "sb": 0, "st": 0}[kind]
    C = E * H + nG * E
    widths = [H, *hidden, 1]
    L = len(widths) - 1
    towers = [torch.randn(S, widths[layer + 1], widths[layer], dtype=dtype) for layer in range(L) for _ in range(T)]
    towers = [p for layer in range(L) for p in (towers[layer * T : (layer + 1) * T]
                                                 + [torch.randn(S, widths[layer + 1], dtype=dtype) for _ in range(T)])]
    x, W, bias = torch.randn(S, B, D, dtype=dtype), torch.randn(S, D, C, dtype=dtype), torch.randn(S, C, dtype=dtype)
    binary = [t % 2 == 1 for t in range(T)]
    y = torch.where(torch.tensor(binary), (torch.rand(S, B, T) > 0.5).to(dtype), torch.randn(S, B, T, dtype=dtype))
    coef = torch.rand(T, dtype=dtype)
    weight = torch.rand(S, B, T, dtype=dtype) * (torch.rand(S, B, T) > 0.2)
    act = act if kind != "sb" else "relu"
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for w in (None, weight):
        got = cpp_backend.replicas_step(x, W, bias, E, H, nG, towers, L, act, y=y, binary=binary, coef=coef, weight=w)
        want = _reference_step(x, W, bias, E, H, nG, towers, L, act, y, binary, coef, w)
        for name, a, b in zip(("out", "sums", "dW", "dbias"), got[:4], want[:4]):
            assert_close(a, b, tol, f"{kind} {name}")
        for k, (a, b) in enumerate(zip(got[4], want[4])):
            assert_close(a, b, tol, f"{kind} tower grad {k}")
    out = cpp_backend.replicas_step(x, W, bias, E, H, nG, towers, L, act)
    assert_close(out, want[0], tol, f"{kind} forward only")
    # One x for every replica (xs = 0), as evaluation passes it.
    shared = cpp_backend.replicas_step(x[1], W, bias, E, H, nG, towers, L, act)
    assert_close(shared, _reference_step(x[1], W, bias, E, H, nG, towers, L, act, y, binary, coef, None)[0], tol,
                 f"{kind} one x for all")
    # A replica left out is not computed: zeros, while the others are unchanged.
    full = cpp_backend.replicas_step(x, W, bias, E, H, nG, towers, L, act, y=y, binary=binary, coef=coef)
    got = cpp_backend.replicas_step(x, W, bias, E, H, nG, towers, L, act, y=y, binary=binary, coef=coef,
                                    active=torch.tensor([True, False, True]))
    for a, b in zip(got[:4], full[:4]):
        assert torch.equal(a[[0, 2]], b[[0, 2]]) and a[1].abs().max() == 0


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("adamw", [False, True])
@pytest.mark.parametrize("kind,T,E,H,hidden,B,D", [
    ("mmoe", 2, 8, 16, (8,), 128, 100), ("mmoe", 1, 1, 1, (), 1, 1), ("omoe", 3, 5, 17, (4, 6), 33, 9),
    ("sb", 2, 1, 13, (8,), 7, 3), ("st", 2, 2, 16, (8,), 9, 17)])
def test_replica_trainer_gathers_rows_and_updates_as_torch_adam(kind, T, E, H, hidden, B, D, adamw, dtype, isa):
    torch.manual_seed(B + D + T)
    S, N, M = 4, 40, 50
    nG = {"mmoe": T, "omoe": 1, "sb": 0, "st": 0}[kind]
    C = E * H + nG * E
    widths = [H, *hidden, 1]
    L = len(widths) - 1
    towers = [p for layer in range(L) for p in ([torch.randn(S, widths[layer + 1], widths[layer], dtype=dtype)
                                                 for _ in range(T)]
                                                + [torch.randn(S, widths[layer + 1], dtype=dtype) for _ in range(T)])]
    params = [torch.randn(S, D, C, dtype=dtype) * 0.3, torch.randn(S, C, dtype=dtype), *towers]
    moments = ([torch.randn_like(p) * 0.1 for p in params], [torch.rand_like(p) * 0.1 for p in params])
    x, y = torch.randn(N, D, dtype=dtype), torch.randn(M, T, dtype=dtype)
    binary = [t % 2 == 1 for t in range(T)]
    y[:, binary] = (y[:, binary] > 0).to(dtype)
    xrow, yrow = torch.randint(0, N, (S, B)), torch.randint(0, M - 1, (S, B))
    yrow[3] = M - 1
    y[M - 1, 0] = float("inf")  # replica 3's loss is not finite: it stays as it was
    coef, lr, step = torch.rand(T, dtype=dtype), torch.tensor([1e-3, 1e-2, 3e-3, 1e-2], dtype=torch.float64), 3
    active = torch.tensor([True, False, True, True])  # replica 1 is not run
    act = "relu" if kind == "sb" else "silu"
    before = [p.clone() for p in params], [m.clone() for m in moments[0]], [v.clone() for v in moments[1]]
    # the reference: plain PyTorch's gradients on the gathered rows, then torch's fused Adam/AdamW run by run
    want = [[p.clone() for p in part] for part in before]
    _, sums, dW, dbias, tgrads = _reference_step(x[xrow], params[0], params[1], E, H, nG, towers, L, act, y[yrow],
                                                 binary, coef, None)
    grads = [dW, dbias, *tgrads]
    kernel = torch._fused_adamw_ if adamw else torch._fused_adam_
    for s in (0, 2):
        kernel([p[s] for p in want[0]], [g[s].contiguous() for g in grads], [m[s] for m in want[1]],
               [v[s] for v in want[2]], [], [torch.tensor(float(step))] * len(params), amsgrad=False, lr=float(lr[s]),
               beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, maximize=False, grad_scale=None, found_inf=None)
    trainer = cpp_backend.ReplicaTrainer(x, y, params[0], params[1], E, H, nG, towers, L, act, binary, moments,
                                         weight_decay=0.01, adamw=adamw)
    got_sums, failed, overflowed = trainer(xrow, yrow, coef, lr, step, active)
    assert failed.tolist() == [False, False, False, True] and not overflowed.any()
    assert_close(got_sums[[0, 2]], sums[[0, 2]], 1e-12 if dtype == torch.float64 else 2e-5, f"{kind} sums")
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, got, ref in zip(("weights", "exp_avg", "exp_avg_sq"), (params, *moments), want):
        for k, (a, b) in enumerate(zip(got, ref)):
            assert_close(a, b, tol, f"{kind} {name} {k}")
    assert trainer(xrow, yrow, coef, lr, step + 1, torch.tensor([True, True, True, False]))[1:] == (None, None)
    # bad rows are refused by name before the kernel reads them, nothing changed
    kept = [p.clone() for p in params]
    with pytest.raises(ValueError, match=r"a row of x out of range \[0, 40\)"):
        trainer(xrow + N, yrow, coef, lr, step)
    with pytest.raises(ValueError, match=r"a row of y out of range \[0, 50\)"):
        trainer(xrow, yrow - M, coef, lr, step)
    assert all(torch.equal(p, q) for p, q in zip(params, kept))
    with pytest.raises(ValueError, match="y's rows must be contiguous int64"):
        trainer(xrow, yrow.int(), coef, lr, step)
    # an update that makes a weight non-finite is applied and reported (a step of inf: 1e39 in float32)
    huge = lr.clone()
    huge[2] = float("inf") if dtype == torch.float64 else 1e39
    _, failed, overflowed = trainer(xrow, yrow, coef, huge, step + 2, torch.tensor([True, True, True, False]))
    assert not failed.any() and overflowed.tolist() == [False, False, True, False]
    assert not all(bool(p[2].isfinite().all()) for p in params) and all(bool(p[0].isfinite().all()) for p in params)


@needs_cpp
def test_replicas_step_on_no_rows_gives_zero_gradients_and_the_trainer_refuses_them(monkeypatch):
    # every uninitialized tensor starts as NaN (-1 for integers): fresh memory may well be zeros already
    for owner, name in ((torch.Tensor, "new_empty"), (torch, "empty_like"), (torch, "empty")):
        make = getattr(owner, name)

        def poisoned(*args, _make=make, **kwargs):
            out = _make(*args, **kwargs)
            return out.fill_(float("nan") if out.is_floating_point() else -1)

        monkeypatch.setattr(owner, name, poisoned)
    S, D, E, H, T = 3, 5, 2, 4, 2
    towers = [torch.randn(S, 1, H) for _ in range(T)] + [torch.randn(S, 1) for _ in range(T)]
    W, bias = torch.randn(S, D, E * H + T * E), torch.randn(S, E * H + T * E)
    x, y = torch.randn(S, 0, D), torch.randn(S, 0, T)
    out, sums, dW, dbias, grads = cpp_backend.replicas_step(x, W, bias, E, H, T, towers, 1, "relu", y=y,
                                                            binary=[False, True], coef=torch.ones(T))
    assert out.shape == (S, 0, T) and sums.abs().max() == 0 and dW.abs().max() == 0 and dbias.abs().max() == 0
    assert all(g.abs().max() == 0 for g in grads)
    assert cpp_backend.replicas_step(x, W, bias, E, H, T, towers, 1, "relu").shape == (S, 0, T)
    moments = ([torch.zeros_like(p) for p in (W, bias, *towers)], [torch.zeros_like(p) for p in (W, bias, *towers)])
    trainer = cpp_backend.ReplicaTrainer(torch.randn(4, D), torch.randn(4, T), W, bias, E, H, T, towers, 1, "relu",
                                         [False, True], moments)
    rows = torch.zeros((S, 0), dtype=torch.int64)
    with pytest.raises(ValueError, match="at least one row"):
        trainer(rows, rows, torch.ones(T), torch.full((S,), 1e-3, dtype=torch.float64), 1)


@needs_cpp
def test_replicas_step_refuses_shapes_it_cannot_run():
    x, W, bias = torch.randn(2, 4, 5), torch.randn(2, 5, 8 + 3 * 2), torch.randn(2, 14)
    towers = [torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.randn(2, 1), torch.randn(2, 1)]
    with pytest.raises(ValueError, match="nG"):  # 3 gates for 2 tasks
        cpp_backend.replicas_step(x, W, bias, 2, 4, 3, towers, 1, "relu")
    with pytest.raises(ValueError, match="E in"):  # no gates: one expert, or one per task (2), not 3
        cpp_backend.replicas_step(x, W[..., :12].contiguous(), bias[:, :12].contiguous(), 3, 4, 0, towers, 1, "relu")
    with pytest.raises(ValueError, match="belongs"):  # towers of another width
        cpp_backend.replicas_step(x, W[..., :10].contiguous(), bias[:, :10].contiguous(), 2, 5, 0, towers, 1, "relu")
    with pytest.raises(ValueError, match="belongs"):  # not contiguous
        cpp_backend.replicas_step(x.transpose(0, 1).contiguous().transpose(0, 1), W, bias, 2, 4, 2, towers, 1, "relu")
    with pytest.raises(ValueError, match="belongs"):  # rows of another width than W's
        cpp_backend.replicas_step(x[..., :4].contiguous(), W, bias, 2, 4, 2, towers, 1, "relu")
    with pytest.raises(ValueError, match="belongs"):  # another dtype than W's
        cpp_backend.replicas_step(x.double(), W, bias, 2, 4, 2, towers, 1, "relu")
    with pytest.raises(ValueError, match="belongs"):  # targets of another shape
        cpp_backend.replicas_step(x, W, bias, 2, 4, 2, towers, 1, "relu", y=torch.zeros(2, 4, 3), binary=[0, 0],
                                  coef=torch.ones(2))


def _models(name, S, D=6, T=2, dtype=torch.float64, seed=0, **options):
    out = []
    for s in range(S):
        torch.manual_seed(seed + s)
        out.append(mf.build_model(name, D, T, **options).to(dtype))
    return out


@needs_cpp
@pytest.mark.parametrize("name,options", [("mmoe", {}), ("omoe", {}), ("shared-bottom", {"bottom_hidden": 9}),
                                          ("mmoe", {"gate_bias": False, "activation": "gelu", "num_experts": 1}),
                                          ("mmoe", {"tower_hidden": (4, 3)}), ("single-task", {"task_hidden": 7}),
                                          ("l2-constrained", {"alpha": 0.3, "activation": "silu"})])
def test_replica_stack_packs_steps_and_writes_back_exactly(name, options):
    models = _models(name, 3, task_types=["regression", "binary"], **options)
    before = [copy.deepcopy(m.state_dict()) for m in models]
    stack = ReplicaStack(models)
    stack.write_back(models)
    for m, sd in zip(models, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k
    x, y = torch.randn(3, 11, 6, dtype=torch.float64), torch.randn(3, 11, 2, dtype=torch.float64)
    y[..., 1] = (y[..., 1] > 0).double()
    coef = torch.tensor([0.5, 2.0], dtype=torch.float64)
    sums, grads = stack.step(x, y, coef)
    penalties = []
    assert_close(stack.forward(x), torch.stack([m(x[s]) for s, m in enumerate(models)]), 1e-12, "forward")
    assert_close(stack.forward(x[0], chunk=4), torch.stack([m(x[0]) for m in models]), 1e-12, "shared rows, chunks")
    # The gradient of each model, by autograd, packed the same way, is the stack's.
    for s, m in enumerate(models):
        out = m(x[s])
        loss = (coef * torch.stack([(out[:, 0] - y[s, :, 0]).square().sum(), F.binary_cross_entropy_with_logits(
            out[:, 1], y[s, :, 1], reduction="sum")])).sum()
        assert_close(sums[s], torch.stack([(out[:, 0] - y[s, :, 0]).square().sum(), F.binary_cross_entropy_with_logits(
            out[:, 1], y[s, :, 1], reduction="sum")]).detach(), 1e-12, "sums")
        m.zero_grad()
        if name == "l2-constrained":  # fit's objective: the penalty too
            extra = m.extra_loss()
            (loss + extra).backward()
            penalties.append(extra.detach())
        else:
            loss.backward()
        for p in m.parameters():
            p.data = p.grad.clone()  # the gradients as weights: packing them gives the stack's gradient layout
    if name == "l2-constrained":
        assert_close(stack.add_penalty(grads), torch.stack(penalties), 1e-12, "penalty")
    else:
        assert stack.add_penalty(grads) is None
    packed = ReplicaStack(models)
    for k, (got, want) in enumerate(zip(grads, packed.params)):
        assert_close(got, want, 1e-12, f"gradient {k}")


def _data(S, n=50, D=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, D, generator=g, dtype=dtype) for _ in range(S)]
    ys = [torch.stack([torch.randn(n, generator=g, dtype=dtype), (torch.rand(n, generator=g) > 0.5).to(dtype)], 1)
          for _ in range(S)]
    return xs, ys


def _separately(models, xs, ys, lrs, seeds, **kw):
    out = []
    for s, m in enumerate(models):
        try:
            out.append((fit(m, xs[s], ys[s], lr=lrs[s], seed=seeds[s], progress=False, log=lambda _: None,
                            **{k: (v[s] if k in ("x_val", "y_val") and isinstance(v, list) else v)
                               for k, v in kw.items()}), None))
        except FloatingPointError as exc:
            out.append((exc.history, str(exc)))
    return out


def _same_runs(models, copies, results, alone, tol):
    for s, ((history, error), result) in enumerate(zip(alone, results)):
        assert (error is None) == (result["error"] is None), (s, error, result["error"])
        assert len(history) == len(result["history"]), s
        for a, b in zip(history, result["history"]):
            assert a["epoch"] == b["epoch"] and a["step"] == b["step"] and a["lr"] == b["lr"]
            # fit's autograd path (Shared-Bottom) reports its loss sums in float32
            assert math.isclose(sum(a["train_loss"]), sum(b["train_loss"]), rel_tol=max(tol, 1e-6)), (s, a, b)
            if "val_loss" in a:
                assert math.isclose(sum(a["val_loss"]), sum(b["val_loss"]), rel_tol=tol), (s, a, b)
            assert ("train_extra_loss" in a) == ("train_extra_loss" in b), (s, a, b)
            if "train_extra_loss" in a:
                assert math.isclose(a["train_extra_loss"], b["train_extra_loss"], rel_tol=max(tol, 1e-6)), (s, a, b)
        for p, q in zip(models[s].parameters(), copies[s].parameters()):
            assert_close(p, q, tol, f"run {s} weights")


@needs_cpp
@pytest.mark.parametrize("name,options", [("mmoe", {}), ("omoe", {}), ("shared-bottom", {}), ("single-task", {}),
                                          ("l2-constrained", {"alpha": 0.5}), ("mmoe", {"gate_bias": False})])
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fit_many_equals_separate_fit_runs_in_float64(name, options, optimizer):
    S = 4
    models = _models(name, S, task_types=["regression", "binary"], **options)
    # Adam in the kernel, or (a penalty to add, columns without a bias) the gradients out and torch's fused Adam
    assert ReplicaStack(models).updates_in_step == (name != "l2-constrained" and options.get("gate_bias", True))
    copies = copy.deepcopy(models)
    xs, ys = _data(S)
    xv, yv = _data(S, n=30, seed=1)
    lrs, seeds = [1e-3, 1e-2, 3e-3, 1e-2], [3, 4, 5, 3]
    kw = dict(epochs=3, batch_size=16, optimizer=optimizer, weight_decay=0.01, loss_weights=[1.0, 0.5])
    results = fit_many(models, xs, ys, x_val=xv, y_val=yv, lr=lrs, seed=seeds, packed=True, progress=False,
                       log=lambda _: None, **kw)
    alone = _separately(copies, xs, ys, lrs, seeds, x_val=xv, y_val=yv, **kw)
    _same_runs(models, copies, results, alone, 1e-9)


@needs_cpp
def test_fit_many_shared_data_steps_and_early_stopping_equal_fit():
    S = 5
    models = _models("mmoe", S, task_types=["binary", "regression"])
    copies = copy.deepcopy(models)
    xs, ys = _data(1, n=70)
    ys[0] = ys[0].flip(1)  # task 0 binary
    xv, yv = _data(1, n=40, seed=7)
    yv[0] = yv[0].flip(1)
    kw = dict(steps=25, batch_size=8, patience=1, x_val=xv[0], y_val=yv[0])
    lrs, seeds = [0.05] * S, list(range(S))
    results = fit_many(models, xs[0], ys[0], lr=lrs, seed=seeds, packed=True, progress=False, log=lambda _: None, **kw)
    alone = _separately(copies, xs * S, ys * S, lrs, seeds, **kw)
    assert any(r["stopped_early"] for r in results)  # the study has runs that stop and runs that go on
    _same_runs(models, copies, results, alone, 1e-9)


@needs_cpp
def test_fit_many_per_run_data_as_one_tensor_and_float32():
    S = 3
    models = _models("omoe", S, dtype=torch.float32, task_types=["regression", "regression"])
    copies = copy.deepcopy(models)
    x, y = torch.randn(S, 40, 6), torch.randn(S, 40, 2)
    results = fit_many(models, x, y, per_run_data=True, epochs=2, batch_size=16, lr=1e-2, seed=1, packed=True,
                       progress=False, log=lambda _: None)
    alone = _separately(copies, list(x), list(y), [1e-2] * S, [1] * S, epochs=2, batch_size=16)
    _same_runs(models, copies, results, alone, 2e-4)


@needs_cpp
@pytest.mark.parametrize("name,engine", [("mmoe", "packed"), ("ple", "vmapped")])
def test_a_diverging_run_stops_alone_with_its_last_finite_weights(name, engine, monkeypatch):
    from mmoe_fast import train_many

    monkeypatch.setattr(train_many, "VMAP_MIN_RUNS", 2)
    S = 3
    models = _models(name, S, dtype=torch.float32, task_types=["regression", "regression"])
    copies = copy.deepcopy(models)
    xs, ys = _data(S, dtype=torch.float32)
    ys = [y.clone() for y in ys]
    ys[1][:, 1] = 3e19  # its squared error overflows float32: a non-finite loss at the first step
    results = fit_many(models, xs, ys, epochs=2, batch_size=16, lr=1e-3, seed=0, progress=False, log=lambda _: None)
    assert [r["engine"] for r in results] == [engine] * S
    alone = _separately(copies, xs, ys, [1e-3] * S, [0] * S, epochs=2, batch_size=16)
    assert "diverged" in results[1]["error"] and results[1]["history"] == []
    assert alone[1][1] is not None
    _same_runs(models, copies, results, alone, 2e-4)


@needs_cpp
@pytest.mark.parametrize("name,options,engine", [("mmoe", {}, "packed"), ("mmoe", {"gate_bias": False}, "packed"),
                                                 ("ple", {}, "vmapped")])
def test_an_update_that_makes_weights_non_finite_ends_its_run_as_fit_does(name, options, engine, monkeypatch):
    from mmoe_fast import train_many

    monkeypatch.setattr(train_many, "VMAP_MIN_RUNS", 2)
    S = 3
    models = _models(name, S, dtype=torch.float32, task_types=["regression", "regression"], **options)
    copies = copy.deepcopy(models)
    xs, ys = _data(S, dtype=torch.float32)
    lrs = [1e-3, 1e39, 1e-3]  # finite, but the float32 step is not: the first update makes run 1's weights inf/nan
    results = fit_many(models, xs, ys, epochs=2, batch_size=16, lr=lrs, seed=0, progress=False, log=lambda _: None)
    assert [r["engine"] for r in results] == [engine] * S
    alone = _separately(copies, xs, ys, lrs, [0] * S, epochs=2, batch_size=16)
    assert "step 1: the update made the weight" in alone[1][1]
    assert "step 1: the update made the weights non-finite" in results[1]["error"] and results[1]["history"] == []
    # the update was applied, as fit leaves its model
    assert not all(bool(p.isfinite().all()) for p in models[1].parameters())
    keep = [0, 2]
    _same_runs([models[s] for s in keep], [copies[s] for s in keep], [results[s] for s in keep],
               [alone[s] for s in keep], 2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_weight_check_reads_only_the_runs_it_is_given(dtype):
    from mmoe_fast.train_many import _overflowed

    params = [torch.randn(4, 3, 2, dtype=dtype), torch.randn(4, 5, dtype=dtype)]
    assert _overflowed(params, 4, [(0, 4)]) is None
    params[0][1, 2, 1] = float("inf")  # run 1: stopped, its weights left as its last update made them
    assert _overflowed(params, 4, [(0, 4)]).tolist() == [False, True, False, False]
    assert _overflowed(params, 4, [(0, 1), (2, 4)]) is None
    params[1][3, 4] = float("nan")  # a later overflow in a run still going is found beside the stopped one
    assert _overflowed(params, 4, [(0, 1), (2, 4)]).tolist() == [False, False, False, True]
    assert _overflowed(params, 4, [(2, 3)]) is None
    if dtype == torch.float64:  # finite weights whose sum overflows are still finite
        params[0][2] = 1e308
        assert _overflowed(params, 4, [(0, 1), (2, 3)]) is None
        assert _overflowed([p[:, :1] for p in params], 4, [(2, 3)]) is None  # not contiguous: torch's check


@needs_cpp
def test_fit_many_falls_back_to_one_by_one_and_says_why_it_cannot_pack():
    models = _models("mmoe", 2, task_types=["regression", "regression"], expert_hidden=(5, 4))
    reason = why_not_packed(models)
    assert "more than one expert" in reason
    with pytest.raises(ValueError, match="more than one expert"):
        fit_many(models, torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64),
                 packed=True, progress=False, log=lambda _: None)
    copies = copy.deepcopy(models)
    xs, ys = _data(2)
    ys = [y[:, :1].repeat(1, 2) for y in ys]
    results = fit_many(models, xs, ys, epochs=2, batch_size=16, lr=[1e-3, 1e-2], seed=[1, 2], progress=False,
                       log=lambda _: None)
    alone = _separately(copies, xs, ys, [1e-3, 1e-2], [1, 2], epochs=2, batch_size=16)
    _same_runs(models, copies, results, alone, 1e-15)
    mixed = [*_models("mmoe", 1), *_models("omoe", 1)]
    assert "OMoE" in why_not_packed(mixed)
    assert "differs" in why_not_packed([*_models("mmoe", 1), *_models("mmoe", 1, num_experts=3)])
    assert "PLE" in why_not_packed(_models("ple", 2))
    hooked = _models("mmoe", 2)
    hooked[1].towers.register_forward_hook(lambda *a: None)
    assert "hooks" in why_not_packed(hooked)
    patched = _models("omoe", 2)
    patched[0].forward = lambda x: x
    assert "replaced forward" in why_not_packed(patched)
    swapped = _models("mmoe", 2)
    swapped[0].mixture.forward = lambda x: x
    assert "changed layer" in why_not_packed(swapped)


def test_fit_many_refuses_bad_input_by_name():
    models = _models("mmoe", 2, task_types=["regression", "regression"])
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    quiet = dict(progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="at least one model"):
        fit_many([], x, y, **quiet)
    with pytest.raises(ValueError, match="lr: one value for all runs or one per run"):
        fit_many(models, x, y, lr=[1e-3, 1e-3, 1e-3], **quiet)
    with pytest.raises(ValueError, match="lr must be finite"):
        fit_many(models, x, y, lr=float("nan"), **quiet)
    with pytest.raises(ValueError, match="x: every run's data must have one shape"):
        fit_many(models, [x, x[:10]], [y, y], **quiet)
    with pytest.raises(ValueError, match=r"must be \[2, N, \.\.\.\]"):
        fit_many(models, x, y, per_run_data=True, **quiet)
    with pytest.raises(ValueError, match="optimizer"):
        fit_many(models, x, y, optimizer="sgd", **quiet)
    if cpp_backend.unavailable_reason() is None:
        with pytest.raises(ValueError, match="run 1: y: task1"):
            bad = y.clone()
            bad[3, 1] = float("nan")
            fit_many(models, [x, x], [y, bad], packed=True, **quiet)


@pytest.mark.parametrize("name,options", [
    ("mmoe", dict(expert_hidden=(5, 4))), ("ple", {}), ("cross-stitch", {}), ("single-task", dict(task_hidden=(5, 4))),
    ("tensor-factorization", {}),
    pytest.param("mmoe", dict(expert_hidden=(5, 4), backend="triton"), id="mmoe-triton", marks=pytest.mark.skipif(
        triton_backend is None or triton_backend.unavailable_reason() is not None, reason="Triton cannot run here")),
])
def test_fit_many_vmapped_equals_separate_fit_runs(name, options, monkeypatch):
    """Models the replicas cannot pack train as one FuncStack (torch.func over the fused ops' vmap rules; on the
    Triton backend its replica launches): each run's history and weights equal its own fit's in float64, per-run
    data, learning rates and orders, validation and early stopping included."""
    from mmoe_fast import train_many

    monkeypatch.setattr(train_many, "VMAP_MIN_RUNS", 2)
    S = 3
    models = _models(name, S, task_types=["regression", "binary"], **options)
    copies = copy.deepcopy(models)
    xs, ys = _data(S)
    xv, yv = _data(S, n=30, seed=1)
    lrs, seeds = [1e-3, 1e-2, 3e-3], [3, 4, 5]
    kw = dict(epochs=3, batch_size=16, weight_decay=0.01, loss_weights=[1.0, 0.5], patience=1)
    results = fit_many(models, xs, ys, x_val=xv, y_val=yv, lr=lrs, seed=seeds, progress=False, log=lambda _: None,
                       **kw)
    assert [r["engine"] for r in results] == ["vmapped"] * S
    alone = _separately(copies, xs, ys, lrs, seeds, x_val=xv, y_val=yv, **kw)
    _same_runs(models, copies, results, alone, 1e-9)


class _Dropped(torch.nn.Module):
    """A model vmap cannot run as fit does (dropout draws randomness)."""

    task_types = ("regression", "regression")

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))

    def forward(self, x):
        return self.net(x)


def test_models_vmap_cannot_run_or_too_few_runs_train_one_by_one(monkeypatch):
    from mmoe_fast import train_many

    x, y = torch.randn(40, 6), torch.randn(40, 2)
    assert "torch.func cannot run them" in train_many.why_not_vmapped([_Dropped(), _Dropped()], x, y)
    monkeypatch.setattr(train_many, "VMAP_MIN_RUNS", 2)
    results = fit_many([_Dropped(), _Dropped()], x, y, epochs=1, batch_size=20, progress=False, log=lambda _: None)
    assert [r["engine"] for r in results] == ["one by one"] * 2
    monkeypatch.setattr(train_many, "VMAP_MIN_RUNS", 3)
    plain = _models("ple", 2, dtype=torch.float32, task_types=["regression", "regression"])
    assert train_many.why_not_vmapped(plain, x, y) is None
    results = fit_many(plain, x, y, epochs=1, batch_size=20, progress=False, log=lambda _: None)
    assert [r["engine"] for r in results] == ["one by one"] * 2  # fewer runs than VMAP_MIN_RUNS
    plain[0].towers.requires_grad_(False)
    assert "freezes" in train_many.why_not_vmapped(plain, x, y)


def test_a_model_with_an_extra_loss_trains_packed_only_where_the_replicas_form_it(monkeypatch):
    """L2-Constrained's penalty (extra_loss, which fit minimizes too) is formed by the replicas: packed, the runs
    equal fit's, penalty and its per-epoch mean included. Any other extra_loss (a model's own) cannot be: not
    packed, not a FuncStack (whose loss is the tasks' alone), but one by one, as fit."""
    from mmoe_fast import train_many

    monkeypatch.setattr(train_many, "VMAP_MIN_RUNS", 2)
    models = _models("l2-constrained", 2, task_types=["regression", "binary"], alpha=0.2)
    copies = copy.deepcopy(models)
    xs, ys = _data(2)
    assert "extra_loss" in train_many.why_not_vmapped(models, xs[0], ys[0])
    results = fit_many(models, xs, ys, epochs=2, batch_size=16, lr=1e-2, seed=[1, 2], progress=False,
                       log=lambda _: None)
    assert [r["engine"] for r in results] == ["packed"] * 2
    assert all(rec["train_extra_loss"] > 0 for r in results for rec in r["history"])
    _same_runs(models, copies, results, _separately(copies, xs, ys, [1e-2] * 2, [1, 2], epochs=2, batch_size=16),
               1e-9)
    own = _models("mmoe", 2, task_types=["regression", "binary"])
    for m in own:  # bound: a deep copy's penalty is its own
        m.extra_loss = types.MethodType(lambda self: 0.1 * sum(p.square().sum() for p in self.towers.parameters()), m)
    assert "extra_loss of its own" in why_not_packed(own)
    copies = copy.deepcopy(own)
    results = fit_many(own, xs, ys, epochs=2, batch_size=16, lr=1e-2, seed=[1, 2], progress=False,
                       log=lambda _: None)
    assert [r["engine"] for r in results] == ["one by one"] * 2
    assert all("train_extra_loss" in rec for r in results for rec in r["history"])
    _same_runs(own, copies, results, _separately(copies, xs, ys, [1e-2] * 2, [1, 2], epochs=2, batch_size=16), 1e-15)
