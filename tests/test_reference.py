"""The batched reference backend equals the loop-form oracle (float64), forward and every gradient."""

import pytest
import torch

import mmoe_fast as mf
from mmoe_fast import reference
from mmoe_fast.activations import ACTIVATIONS
from mmoe_fast.testing import SHAPES, Shape, assert_close, check_layer, make_inputs


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_backend_matches_loop_float64(shape, activation):
    check_layer("reference", shape, dtype=torch.float64, activation=activation)


@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
@pytest.mark.parametrize("bias,gate_bias", [(False, False), (True, False), (False, True)])
def test_reference_without_biases(shape, bias, gate_bias):
    check_layer("reference", shape, dtype=torch.float64, bias=bias, gate_bias=gate_bias, split=True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_reference_two_layer_experts(shape, activation):
    check_layer("reference", shape, dtype=torch.float64, activation=activation, hidden=(9,))


@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_reference_float32_within_contract(shape):
    check_layer("reference", shape, dtype=torch.float32, activation="silu", hidden=(6,))


def test_non_contiguous_inputs():
    inp = make_inputs(Shape(9, 6, 3, 5, 2), dtype=torch.float64)
    x_t = inp["x"].t().contiguous().t()  # same values, column-major strides
    assert not x_t.is_contiguous()
    w_nc = inp["weights"][0].transpose(1, 2).contiguous().transpose(1, 2)
    out = mf.mmoe(x_t, w_nc, inp["biases"][0], inp["gate_weight"], inp["gate_bias"])
    ref = reference.mmoe(inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"])
    assert_close(out, ref, 1e-12, "non-contiguous forward")


def test_mmoe_equals_gate_softmax_then_expert_mixture():
    inp = make_inputs(Shape(11, 7, 4, 6, 3), dtype=torch.float64)
    x, w, b = inp["x"], inp["weights"][0], inp["biases"][0]
    gates = mf.gate_softmax(x, inp["gate_weight"], inp["gate_bias"])
    split = mf.expert_mixture(x, w, b, gates, activation="gelu")
    fused = mf.mmoe(x, w, b, inp["gate_weight"], inp["gate_bias"], activation="gelu")
    torch.testing.assert_close(fused, split, rtol=0, atol=1e-13)


def test_softmax_is_stable_for_huge_logits():
    x = torch.tensor([[1e4, -1e4]], dtype=torch.float32)
    wg = torch.eye(2).reshape(1, 2, 2)
    g = mf.gate_softmax(x, wg)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, torch.tensor([[[1.0, 0.0]]]))


def test_nan_in_nan_out():
    inp = make_inputs(Shape(4, 5, 3, 6, 2))
    inp["x"][1, 2] = float("nan")
    out = mf.mmoe(inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"])
    assert torch.isnan(out[:, 1]).all() and torch.isfinite(out[:, [0, 2, 3]]).all()


def test_gradients_reach_every_input_that_requires_them():
    inp = make_inputs(Shape(5, 4, 3, 6, 2), dtype=torch.float64)
    x = inp["x"].requires_grad_()
    w = inp["weights"][0]  # no grad wanted for the expert weight
    out = mf.mmoe(x, w, inp["biases"][0], inp["gate_weight"].requires_grad_(), None)
    out.sum().backward()
    assert x.grad is not None and inp["gate_weight"].grad is not None and w.grad is None
