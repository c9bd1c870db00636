"""The backend table and contract: selection, the environment override, registration, clear errors.

opcheck, gradcheck and the bad-input table run per backend in test_conformance.py.
"""

import types

import pytest
import torch

import mmoe_fast as mf
from mmoe_fast import backends, contract
from mmoe_fast.testing import Shape, bad_calls, make_inputs


def _args(dtype=torch.float64, B=5, bias=True, per_expert=False):
    inp = make_inputs(Shape(B, 6, 3, 4, 2), dtype=dtype, bias=bias, gate_bias=bias)
    x, w, b, wg, bg = inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"]
    gates = mf.gate_softmax(x, wg, bg)
    a = x[:, None, :].expand(-1, 3, -1).contiguous() if per_expert else x
    return x, w, b, wg, bg, gates, a


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


def test_register_refuses_a_module_missing_required_members():
    half = types.ModuleType("half_backend")
    half.unavailable_reason = lambda: None
    with pytest.raises(ValueError, match="gate_softmax_backward"):
        backends.register("half_backend", half)
    with pytest.raises(ValueError, match="identifier"):
        backends.register("auto", half)
    assert "half_backend" not in backends.BACKENDS


def test_tolerance_is_the_backends_own_when_it_has_one():
    strict, loose = types.ModuleType("strict"), types.ModuleType("loose")
    loose.tolerance = lambda dtype: 1e-3
    assert contract.tolerance(strict, torch.float32) == contract.TOLERANCE[torch.float32] == 1e-5
    assert contract.tolerance(loose, torch.float32) == 1e-3


def test_status_names_every_backend_and_why_not():
    status = backends.status()
    assert set(status) == set(backends.BACKENDS) and status["reference"] is None
    assert all(reason is None or name in reason for name, reason in status.items())


def test_run_concurrently_raises_what_a_thread_raised():
    from mmoe_fast.testing import run_concurrently

    def boom():
        raise RuntimeError("in a thread")

    with pytest.raises(RuntimeError, match="in a thread"):
        run_concurrently([boom, lambda: 1])
