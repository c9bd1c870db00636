"""The other baselines, ESMM, CGC and PLE: shapes, training, the plain loop form, ESMM's probabilities."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import mmoe_fast as mf
from mmoe_fast import backends
from mmoe_fast.models import MODELS
from mmoe_fast.testing import TOLERANCE, assert_close
from mmoe_fast.train import evaluate, fit, task_losses

NEW_MODELS = ("single-task", "l2-constrained", "cross-stitch", "tensor-factorization", "esmm", "cgc", "ple")
SMALL = {  # tiny but complete versions of each model (two hidden layers where a model has layers to stack)
    "single-task": dict(task_hidden=(6, 5)),
    "l2-constrained": dict(task_hidden=(6, 5), alpha=0.1),
    "cross-stitch": dict(task_hidden=(6, 5)),
    "tensor-factorization": dict(task_hidden=(6, 5), ranks=(2, 3, 4)),
    "esmm": dict(bottom_hidden=(6,)),
    "cgc": dict(num_specific_experts=2, num_shared_experts=3, expert_hidden=(6, 5)),
    "ple": dict(num_levels=3, num_specific_experts=1, num_shared_experts=2, expert_hidden=5),
}
ACT = {"relu": F.relu, "silu": F.silu, "gelu": lambda t: F.gelu(t, approximate="tanh")}


def _cpu_backends() -> list[str]:
    """Every backend that runs float32 on the CPU here (triton only under TRITON_INTERPRET=1)."""
    names = []
    for name in mf.available_backends():
        try:
            backends.resolve(name, torch.device("cpu"), torch.float32)
        except ValueError:
            continue
        names.append(name)
    return names


def _click_data(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [click, click and conversion] (so ESMM's too), learnable from x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 2, generator=g)
    click = (x @ w[:, 0] > 0).float()
    return x, torch.stack([click, click * (x @ w[:, 1] > 0).float()], dim=1)


def _plain_ple(model: mf.PLE, x: torch.Tensor) -> torch.Tensor:
    """PLE as the paper reads: every expert, gate and mixture one at a time, on the model's parameters."""
    T = model.num_tasks
    reps = [x] * (T + 1)  # task t's input, then the shared input
    for level in model.levels:
        S, E, act = level.num_specific_experts, level.num_experts, ACT[level.activation]

        def expert(e, inp, level=level, act=act):
            for w, b in zip(level.expert_weights, level.expert_biases):
                inp = act(inp @ w[e] + b[e])
            return inp

        outs = [expert(e, reps[e // S if e < T * S else T]) for e in range(E)]
        new = []
        for t in range(T):
            own = list(range(t * S, (t + 1) * S)) + list(range(T * S, E))
            gate = torch.softmax(reps[t] @ level.task_gate_weight[t] + level.task_gate_bias[t], dim=-1)
            new.append(sum(gate[:, j : j + 1] * outs[e] for j, e in enumerate(own)))
        if level.shared_gate_weight is not None:
            gate = torch.softmax(reps[T] @ level.shared_gate_weight[0] + level.shared_gate_bias[0], dim=-1)
            new.append(sum(gate[:, e : e + 1] * outs[e] for e in range(E)))
        reps = new
    return torch.cat([tower(reps[t]) for t, tower in enumerate(model.towers.towers)], dim=1)


@pytest.mark.parametrize("name", NEW_MODELS)
def test_forward_shapes_and_losses_on_a_tiny_batch(name):
    torch.manual_seed(0)
    model = MODELS[name](7, 2, **SMALL[name])
    x, y = _click_data(5, 7)
    out = model(x)
    assert out.shape == (5, 2) and torch.isfinite(out).all()
    losses = task_losses(out, y, model.task_types)
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    losses.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in NEW_MODELS if n != "esmm"])
def test_models_take_any_number_of_tasks_and_regression(name):
    types = ("regression", "binary", "regression")
    model = MODELS[name](7, 3, task_types=types, **SMALL[name])
    assert model(torch.randn(4, 7)).shape == (4, 3)
    assert model.task_types == types


@pytest.mark.parametrize("name", NEW_MODELS)
def test_default_construction_is_paper_scale(name):
    # The experiments build every model as cls(D, T, task_types=...): about MMoE's size (8 x 16 experts).
    model = MODELS[name](100, 2, task_types=("binary", "binary"))
    mmoe = mf.count_parameters(mf.MMoE(100, 2))
    assert abs(mf.count_parameters(model) - mmoe) / mmoe < 0.15


@pytest.mark.parametrize("name", NEW_MODELS)
def test_training_with_fit_lowers_the_loss(name):
    torch.manual_seed(0)
    x, y = _click_data(256, 10)
    model = MODELS[name](10, 2)
    before = sum(evaluate(model, x, y))
    fit(model, x, y, epochs=8, batch_size=64, lr=1e-2, progress=False, log=lambda s: None)
    assert sum(evaluate(model, x, y)) < 0.5 * before


@pytest.mark.parametrize("name", NEW_MODELS)
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    a = MODELS[name](7, 2, **SMALL[name])
    torch.manual_seed(1)
    b = MODELS[name](7, 2, **SMALL[name])
    x = torch.randn(4, 7)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_ple_checkpoints_do_not_depend_on_mixture_or_backend():
    a = mf.PLE(7, 2, num_specific_experts=1, num_shared_experts=3, mixture="one-call", backend="reference")
    b = mf.PLE(7, 2, num_specific_experts=1, num_shared_experts=3, mixture="per-group")
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 7)
    torch.testing.assert_close(b(x), a(x))


@pytest.mark.parametrize("specific,shared", [(1, 3), (3, 1), (2, 2), (0, 2), (2, 0)],
                         ids=["more-shared", "fewer-shared", "equal", "no-specific", "no-shared"])
@pytest.mark.parametrize("mixture", mf.models.MIXTURES)
def test_ple_equals_the_plain_loop_form(specific, shared, mixture):
    torch.manual_seed(0)
    model = mf.PLE(6, 3, num_levels=3, num_specific_experts=specific, num_shared_experts=shared,
                   expert_hidden=(5, 4), activation="silu", mixture=mixture).double()
    assert model.levels[0].num_experts == 3 * specific + shared
    x = torch.randn(7, 6, dtype=torch.float64)
    out, ref = model(x), _plain_ple(model, x)
    assert_close(out, ref, 1e-12, "PLE forward")
    dy = torch.randn_like(ref)
    params = list(model.parameters())
    for g, r in zip(torch.autograd.grad(out, params, dy), torch.autograd.grad(ref, params, dy)):
        assert_close(g, r, 1e-12, "PLE grad")


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("cls", [mf.CGC, mf.PLE])
@pytest.mark.parametrize("mixture", mf.models.MIXTURES)
def test_cgc_and_ple_on_every_backend_equal_the_plain_form(backend, cls, mixture):
    torch.manual_seed(0)
    levels = dict(num_levels=3) if cls is mf.PLE else {}  # 3: an inner level reads a shared representation
    model = cls(5, 2, num_specific_experts=1, num_shared_experts=2, expert_hidden=(4, 3), activation="gelu",
                backend=backend, mixture=mixture, **levels)
    oracle = copy.deepcopy(model).double()
    x = torch.randn(3, 5)
    out, ref = model(x), _plain_ple(oracle, x.double())
    tol = 10 * TOLERANCE[torch.float32]  # a model composes several float32 ops
    assert_close(out, ref, tol, f"{backend} forward")
    dy = torch.randn(ref.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, list(model.parameters()), dy.float())
    for g, r in zip(grads, torch.autograd.grad(ref, list(oracle.parameters()), dy)):
        assert_close(g, r, tol, f"{backend} grad")


@pytest.mark.parametrize("name,kwargs", [
    # PLE's two levels: the inner one (shared gate, per-expert inputs) and the last one, which is CGC.
    ("ple", dict(num_specific_experts=1, num_shared_experts=2, expert_hidden=5)),
    ("tensor-factorization", dict(task_hidden=(5, 4), ranks=(2, 3, 3))),  # weights built in the graph
])
def test_models_compile_fullgraph_and_match_eager(name, kwargs):
    torch.manual_seed(0)
    model = MODELS[name](6, 2, **kwargs)
    x = torch.randn(4, 6)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(compiled.sum(), params), torch.autograd.grad(eager.sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cgc_is_one_level_without_a_shared_gate():
    model = mf.CGC(6, 2)
    (level,) = model.levels
    assert level.shared_gate_weight is None and level.num_experts == 8
    assert level.task_gate_weight.shape == (2, 6, 5)


def test_ple_inner_shared_gate_mixes_all_experts():
    model = mf.PLE(6, 2, num_levels=3, num_specific_experts=2, num_shared_experts=3)
    assert [lv.shared_gate_weight is not None for lv in model.levels] == [True, True, False]
    assert model.levels[0].shared_gate_weight.shape == (1, 6, 7)
    assert model.levels[0].task_gate_weight.shape == (2, 6, 5)
    no_shared = mf.PLE(6, 2, num_levels=3, num_specific_experts=2, num_shared_experts=0)
    assert all(lv.shared_gate_weight is None for lv in no_shared.levels)  # it would feed nothing


def test_esmm_outputs_probabilities_with_ctcvr_at_most_ctr():
    torch.manual_seed(0)
    model = mf.ESMM(7, 2)
    x = torch.randn(64, 7) * 30  # large inputs push the logits to saturation
    p = model.predict_proba(x)
    ctr, ctcvr = p.unbind(1)
    assert ((p >= 0) & (p <= 1)).all()
    assert (ctcvr <= ctr).all()
    torch.testing.assert_close(ctcvr.double(), (ctr * model.predict_cvr(x)).double(), rtol=1e-5, atol=1e-7)
    logits = model(x)
    assert torch.isfinite(logits).all() and (logits[:, 1] <= logits[:, 0]).all()


def test_esmm_ctcvr_logit_is_exact_and_finite_at_saturation():
    a = torch.tensor([-800.0, -3.0, 0.0, 2.0, 40.0, 800.0], dtype=torch.float64)
    b = torch.tensor([5.0, 1.0, 0.0, -2.0, 40.0, 800.0], dtype=torch.float64, requires_grad=True)
    ctcvr = mf.ESMM.ctcvr_logit(a, b)
    middle = slice(1, 4)  # where the naive formula is itself accurate
    torch.testing.assert_close(ctcvr[middle], torch.logit(torch.sigmoid(a) * torch.sigmoid(b))[middle])
    # logit(p) = log p - log(1 - p): a tiny p gives log p = a + log sigmoid(b); two sure events give 800 - log 2
    expected = torch.tensor([-800.0 - math.log1p(math.exp(-5.0)), 800.0 - math.log(2.0)], dtype=torch.float64)
    torch.testing.assert_close(ctcvr[[0, 5]].detach(), expected)
    assert (ctcvr <= a).all()
    ctcvr.sum().backward()
    assert torch.isfinite(b.grad).all()


def test_l2_constrained_extra_loss_is_alpha_times_squared_distance():
    torch.manual_seed(0)
    model = mf.L2Constrained(7, 2, alpha=0.25, task_hidden=(6, 5))

    def theta(t):
        tower = model.towers.towers[t]
        parts = [*(w[t] for w in model.task_weights), *(b[t] for b in model.task_biases), *tower.parameters()]
        return torch.cat([p.reshape(-1) for p in parts])

    expected = 0.25 * (theta(0) - theta(1)).pow(2).sum()
    torch.testing.assert_close(model.extra_loss(), expected)
    assert theta(0).numel() == mf.count_parameters(model) // 2


def test_l2_constrained_extra_loss_vanishes_for_equal_tasks_and_pulls_them_together():
    model = mf.L2Constrained(7, 2, alpha=1.0)
    with torch.no_grad():
        for p in [*model.task_weights, *model.task_biases]:
            p[1] = p[0]
        for a, b in zip(model.towers.towers[0].parameters(), model.towers.towers[1].parameters()):
            b.copy_(a)
    assert model.extra_loss().item() == 0.0
    with torch.no_grad():
        model.task_weights[0][1] += 0.1
    model.extra_loss().backward()
    grad = model.task_weights[0].grad
    assert (grad[0] < 0).all() and (grad[1] > 0).all()


def test_cross_stitch_starts_mostly_on_its_own_task():
    model = mf.CrossStitch(7, 3, task_hidden=(6, 5))
    (s0, s1) = model.stitch_weights
    torch.testing.assert_close(s0, torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]]))
    torch.testing.assert_close(s1.sum(1), torch.ones(3))


def test_cross_stitch_with_identity_stitches_is_single_task():
    torch.manual_seed(0)
    stitched = mf.CrossStitch(7, 2, task_hidden=(6, 5))
    single = mf.SingleTask(7, 2, task_hidden=(6, 5))
    single.load_state_dict(stitched.state_dict(), strict=False)
    with torch.no_grad():
        for s in stitched.stitch_weights:
            s.copy_(torch.eye(2))
    x = torch.randn(4, 7)
    torch.testing.assert_close(stitched(x), single(x))


def test_tensor_factorization_weights_are_a_tucker_product_of_the_given_ranks():
    torch.manual_seed(0)
    model = mf.TensorFactorization(20, 3, task_hidden=(12,), ranks=(2, 5, 4))
    (layer,) = model.layers
    assert layer.core.shape == (2, 5, 4)
    w = layer.weight()
    assert w.shape == (3, 20, 12)
    assert torch.linalg.matrix_rank(w.reshape(3, -1).detach()) == 2  # task mode
    assert torch.linalg.matrix_rank(w.permute(1, 0, 2).reshape(20, -1).detach()) == 5  # input mode
    assert abs(w.std().item() - 20**-0.5 / 3**0.5) < 0.05  # nn.Linear's initial scale


def test_tensor_factorization_caps_ranks_at_the_dimensions():
    model = mf.TensorFactorization(4, 2, task_hidden=(3,), ranks=(9, 9, 9))
    assert model.layers[0].core.shape == (2, 4, 3)


@pytest.mark.parametrize("cls,kwargs,name", [
    (mf.SingleTask, dict(task_hidden=(4, 0)), "task_hidden"),
    (mf.SingleTask, dict(tower_hidden=-1), "tower_hidden"),
    (mf.SingleTask, dict(task_types=("binary",)), "task_types"),
    (mf.SingleTask, dict(backend="gpu"), "backend"),
    (mf.L2Constrained, dict(alpha=-1.0), "alpha"),
    (mf.CrossStitch, dict(activation="tanh"), "activation"),
    (mf.TensorFactorization, dict(ranks=(2, 3)), "ranks"),
    (mf.TensorFactorization, dict(ranks=(2, 0, 3)), "ranks"),
    (mf.ESMM, dict(task_types=("binary", "regression")), "task_types"),
    (mf.ESMM, dict(bottom_hidden=0), "bottom_hidden"),
    (mf.CGC, dict(num_specific_experts=-1), "num_specific_experts"),
    (mf.CGC, dict(num_shared_experts=1.5), "num_shared_experts"),
    (mf.CGC, dict(num_specific_experts=0, num_shared_experts=0), "num_specific_experts"),
    (mf.CGC, dict(mixture="masked"), "mixture"),
    (mf.PLE, dict(num_levels=0), "num_levels"),
    (mf.PLE, dict(expert_hidden=()), "expert_hidden"),
])
def test_bad_constructor_arguments_are_named(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(10, 2, **kwargs)


@pytest.mark.parametrize("cls", [mf.SingleTask, mf.ESMM, mf.PLE])
def test_bad_sizes_are_named(cls):
    with pytest.raises(ValueError, match="in_features"):
        cls(0, 2)
    with pytest.raises(ValueError, match="num_tasks"):
        cls(10, 0)


def test_every_model_is_registered_and_exported():
    for name in NEW_MODELS:
        assert MODELS[name].__name__ in mf.__all__
    assert {"mmoe", "omoe", "shared-bottom"} <= MODELS.keys()
