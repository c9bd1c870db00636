"""The op contract: opcheck, gradcheck, backend selection and clear errors for bad input."""

import pytest
import torch

import mmoe_fast as mf
from mmoe_fast import backends
from mmoe_fast.testing import Shape, bad_calls, case_id, make_inputs, op_cases, run_gradcheck, run_opcheck


def _args(dtype=torch.float64, B=5, bias=True, per_expert=False):
    inp = make_inputs(Shape(B, 6, 3, 4, 2), dtype=dtype, bias=bias, gate_bias=bias)
    x, w, b, wg, bg = inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"]
    gates = mf.gate_softmax(x, wg, bg)
    a = x[:, None, :].expand(-1, 3, -1).contiguous() if per_expert else x
    return x, w, b, wg, bg, gates, a


@pytest.mark.parametrize("name,op,args", list(op_cases("reference")), ids=case_id)
def test_opcheck(name, op, args):
    run_opcheck(op, args)


@pytest.mark.parametrize("name,op,args", list(op_cases("reference")), ids=case_id)
def test_gradcheck_float64(name, op, args):
    run_gradcheck(op, args)


def test_empty_batch_returns_empty_outputs():
    x, w, b, wg, bg, gates, _ = _args(B=0)
    assert mf.gate_softmax(x, wg, bg).shape == (0, 2, 3)
    x.requires_grad_()
    out = mf.mmoe(x, w, b, wg, bg)
    assert out.shape == (2, 0, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 6)


def test_available_backends_lists_reference():
    assert "reference" in mf.available_backends()
    assert "reference" in backends.describe()


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve("auto", torch.device("cpu"), torch.float32).__name__.endswith(".reference")
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.resolve("auto", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("B", [5, 0])
def test_unavailable_backend_is_a_clear_error(monkeypatch, B):
    monkeypatch.setitem(backends._loaded, "numba", "backend 'numba' needs 'numba', which is not installed")
    monkeypatch.setattr(backends, "_resolved", {})
    x, w, b, wg, bg, _, _ = _args(B=B)
    with pytest.raises(ValueError, match="numba"):
        mf.mmoe(x, w, b, wg, bg, backend="numba")


def _bad_calls():
    yield from bad_calls()
    x, w, b, wg, bg, _, _ = _args(torch.float32)
    yield "backend", lambda: mf.mmoe(x, w, b, wg, bg, backend="cuda-magic"), ValueError


@pytest.mark.parametrize("name,call,exc", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_names_the_argument(name, call, exc):
    with pytest.raises(exc, match=name):
        call()


def test_run_concurrently_raises_what_a_thread_raised():
    from mmoe_fast.testing import run_concurrently

    def boom():
        raise RuntimeError("in a thread")

    with pytest.raises(RuntimeError, match="in a thread"):
        run_concurrently([boom, lambda: 1])
