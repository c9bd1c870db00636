"""Modules: equal to the loop reference, compile-safe, backend-independent state, size matching."""

import pytest
import torch

import mmoe_fast as mf
from mmoe_fast import reference
from mmoe_fast.testing import assert_close


def _assert_same_function(out, ref, params, what):
    """out equals ref (float64), and so do their gradients for every tensor of params under one random cotangent."""
    assert_close(out, ref, 1e-12, f"{what} forward")
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        assert_close(got, want, 1e-12, f"{what} grad")


def _layer_ref(layer, x):
    ws, bs = list(layer.expert_weights), list(layer.expert_biases)
    m = reference.mmoe_layer(x, ws, bs, layer.gate_weight, layer.gate_bias, layer.activation)
    return m.expand(layer.num_tasks, -1, -1)


@pytest.mark.parametrize("cls", [mf.MMoELayer, mf.OMoELayer])
@pytest.mark.parametrize("hidden", [7, (9, 5), (4, 6, 3)])
@pytest.mark.parametrize("gate_bias", [True, False])
def test_layer_matches_loop_reference(cls, hidden, gate_bias):
    torch.manual_seed(0)
    layer = cls(11, 3, hidden, 2, gate_bias=gate_bias, activation="silu").double()
    x = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    out, ref = layer(x), _layer_ref(layer, x)
    assert out.shape == (2, 6, layer.out_features)
    _assert_same_function(out, ref, [x, *layer.parameters()], "layer")


def test_omoe_gives_every_task_the_same_mixture():
    layer = mf.OMoELayer(5, 4, 6, 3)
    m = layer(torch.randn(7, 5))
    assert layer.gate_weight.shape == (1, 5, 4)
    torch.testing.assert_close(m[0], m[2])


def test_compiled_layer_matches_eager_fullgraph():
    torch.manual_seed(0)
    layer = mf.MMoELayer(12, 4, (10, 6), 3, activation="gelu")
    x = torch.randn(9, 12, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    g_eager = torch.autograd.grad(eager.sum(), [x, layer.gate_weight])
    g_comp = torch.autograd.grad(compiled.sum(), [x, layer.gate_weight])
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_does_not_depend_on_backend():
    torch.manual_seed(0)
    a = mf.MMoE(10, 2, expert_hidden=(8, 4), backend="reference")
    b = mf.MMoE(10, 2, expert_hidden=(8, 4), backend="auto")
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 10)
    torch.testing.assert_close(a(x), b(x))


def test_experts_are_initialized_independently_like_linear():
    torch.manual_seed(0)
    layer = mf.MMoELayer(64, 8, 32, 2)
    w = layer.expert_weights[0]
    assert w.abs().max() <= 64**-0.5
    assert not torch.allclose(w[0], w[1])
    assert abs(w.std().item() - (64**-0.5) / 3**0.5) < 0.01  # U(-k, k) has std k / sqrt(3)


@pytest.mark.parametrize("cls", [mf.MMoE, mf.OMoE, mf.SharedBottom])
def test_full_models_output_one_column_per_task(cls):
    model = cls(20, 3, task_types=("binary", "regression", "binary"))
    out = model(torch.randn(5, 20))
    assert out.shape == (5, 3)
    assert model.task_types == ("binary", "regression", "binary")


def test_paper_sizes_are_roughly_matched():
    # The paper: MMoE 8 experts x 16 units, towers of 8; Shared-Bottom 113 units, for about the same size.
    mmoe, sb = mf.count_parameters(mf.MMoE(100)), mf.count_parameters(mf.SharedBottom(100))
    assert abs(mmoe - sb) / mmoe < 0.15
    assert mf.count_parameters(mf.OMoE(100)) < mmoe


@pytest.mark.parametrize("kwargs,name", [
    (dict(task_types=("binary",)), "task_types"),
    (dict(task_types=("binary", "ranking")), "task_types"),
    (dict(num_experts=0), "num_experts"),
    (dict(expert_hidden=(4, 0)), "expert_hidden"),
    (dict(activation="tanh"), "activation"),
    (dict(backend="gpu"), "backend"),
])
def test_bad_model_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mf.MMoE(10, 2, **kwargs)


def test_model_rejects_wrong_input_width():
    with pytest.raises(ValueError, match="gate_weight|expert_weight"):
        mf.MMoE(10, 2)(torch.randn(4, 11))


def _towers_by_module(towers, h):
    """The towers one task at a time, module by module: what the stacked path must equal."""
    return torch.cat([tower(h if h.dim() == 2 else h[t]) for t, tower in enumerate(towers.towers)], dim=1)


@pytest.mark.parametrize("shared", [False, True], ids=["per-task", "shared"])
@pytest.mark.parametrize("T,K,hidden,B", [(1, 5, (), 1), (2, 16, (8,), 7), (3, 9, (4, 6), 33), (5, 33, (8,), 130)])
def test_stacked_towers_equal_the_towers_module_by_module(T, K, hidden, B, shared):
    torch.manual_seed(T + K)
    towers = mf.models.common.Towers(T, K, hidden).double()
    h = torch.randn(*((B, K) if shared else (T, B, K)), dtype=torch.float64, requires_grad=True)
    out, ref = towers(h), _towers_by_module(towers, h)
    assert type(out.grad_fn).__name__ == "_StackedTowersBackward"  # the stacked path ran
    _assert_same_function(out, ref, [h, *towers.parameters()], "towers")


def test_towers_under_autocast_run_module_by_module_and_train():
    torch.manual_seed(0)
    towers = mf.models.common.Towers(2, 4, (3,))
    h = torch.randn(2, 5, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = towers(h), _towers_by_module(towers, h)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    out.float().sum().backward()
    assert h.grad is not None and all(p.grad is not None for p in towers.parameters())
    meta = mf.models.common.Towers(2, 4, (3,)).to("meta")
    assert meta(torch.empty(2, 5, 4, device="meta")).shape == (5, 2)


def test_towers_that_are_no_longer_plain_run_module_by_module():
    """A hook, another module or a changed layer: the per-task loop runs the modules as they are."""
    torch.manual_seed(0)
    h = torch.randn(2, 6, 4, dtype=torch.float64)
    towers = mf.models.common.Towers(2, 4, (3,)).double()
    seen = []
    handle = towers.towers[1][0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert_close(towers(h), _towers_by_module(towers, h), 1e-12, "hooked")
    assert seen, "the hook did not run"
    handle.remove()
    towers.towers[0][1] = torch.nn.Tanh()
    assert_close(towers(h), _towers_by_module(towers, h), 1e-12, "tanh")
    assert towers(h)[:, 0].ne(mf.models.common.Towers(2, 4, (3,)).double()(h)[:, 0]).any()
    towers.towers[0][1] = torch.nn.ReLU()
    towers.towers[1][0] = torch.nn.Linear(4, 3, bias=False).double()
    assert_close(towers(h), _towers_by_module(towers, h), 1e-12, "no bias")


@pytest.mark.parametrize("shared", [False, True], ids=["per-task", "shared"])
def test_stacked_towers_second_derivatives_equal_the_modules(shared):
    torch.manual_seed(1)
    towers = mf.models.common.Towers(2, 4, (3,)).double()
    h = torch.randn(*((5, 4) if shared else (2, 5, 4)), dtype=torch.float64, requires_grad=True)
    params = [h, *towers.parameters()]

    def second(f):
        gs = torch.autograd.grad(f(h).square().sum(), params, create_graph=True)
        return torch.autograd.grad(sum(g.sin().sum() for g in gs), params)

    for got, want in zip(second(towers), second(lambda v: _towers_by_module(towers, v))):
        assert_close(got, want, 1e-12, "second derivative")
