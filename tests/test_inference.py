"""InferenceSession equals model.eval()(x); export_onnx writes the same model (checked with onnxruntime)."""


import numpy as np
import pytest
import torch
from torch import nn

import mmoe_fast as mf
from mmoe_fast.backends import cpp
from mmoe_fast.testing import run_concurrently

NATIVE = cpp.unavailable_reason() is None

MODELS = {
    "mmoe": lambda: mf.MMoE(13, 2, num_experts=3, expert_hidden=17),
    "mmoe-deep-gelu": lambda: mf.MMoE(13, 3, num_experts=4, expert_hidden=(9, 33), tower_hidden=(8, 5),
                                      activation="gelu"),
    "mmoe-silu-no-gate-bias": lambda: mf.MMoE(13, 2, num_experts=8, expert_hidden=70, gate_bias=False,
                                              activation="silu"),
    "omoe": lambda: mf.OMoE(13, 3, num_experts=4, expert_hidden=(40, 33), activation="identity"),
    "shared-bottom": lambda: mf.SharedBottom(13, 2, bottom_hidden=(20, 7)),
}


def _model(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]().to(dtype).eval()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_session_equals_model(name, dtype):
    model = _model(name, dtype)
    session = mf.InferenceSession(model)
    assert session.backend == ("cpp" if NATIVE else "eager")
    for B in (1, 7, 130):
        x = torch.randn(B, 13, dtype=dtype)
        with torch.no_grad():
            want = model(x)
        got = session.run(x)
        assert got.dtype == dtype and got.shape == (B, model.num_tasks)
        torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
        got_np = session.run(x.numpy())
        assert isinstance(got_np, np.ndarray)
        np.testing.assert_array_equal(got_np, got.numpy())


@pytest.mark.skipif(not NATIVE, reason="mmoe_fast._C not built")
@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_session_on_narrower_instruction_sets(isa):
    order = ["base", "avx2", "avx512"]
    if order.index(isa) > order.index(cpp._C.best_isa()):
        pytest.skip(f"this CPU has no {isa}")
    model = _model("mmoe-deep-gelu")
    before = cpp._C.isa()
    cpp._C.set_isa(isa)
    try:
        session = mf.InferenceSession(model)
    finally:
        cpp._C.set_isa(before)
    x = torch.randn(50, 13)
    torch.testing.assert_close(session.run(x), model(x).detach(), rtol=1e-5, atol=1e-6)


def test_session_keeps_a_bottom_layer_without_relu_linear():
    torch.manual_seed(0)
    model = mf.SharedBottom(13, 2, bottom_hidden=(20, 7)).eval()
    model.bottom = nn.Sequential(nn.Linear(13, 20), nn.ReLU(), nn.Linear(20, 7))  # no ReLU after the last
    x = torch.randn(30, 13)
    torch.testing.assert_close(mf.InferenceSession(model).run(x), model(x).detach(), rtol=1e-5, atol=1e-6)


def test_session_is_a_snapshot_and_has_no_autograd():
    model = _model("mmoe")
    session = mf.InferenceSession(model)
    x = torch.randn(4, 13, requires_grad=True)
    before = session.run(x)
    assert not before.requires_grad
    with torch.no_grad():
        model.mixture.expert_weights[0].add_(1.0)
    torch.testing.assert_close(session.run(x), before)


def test_eight_threads_equal_serial_calls():
    model = _model("mmoe-deep-gelu")
    session = mf.InferenceSession(model)
    xs = [torch.randn(1 + 37 * i, 13, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    serial = [session.run(x) for x in xs]
    results = run_concurrently([lambda x=x: session.run(x) for x in xs], repeats=20)
    for got, want in zip(results, serial):
        assert len(got) == 20 and all(torch.equal(g, want) for g in got)


def test_empty_batch_and_non_contiguous_input():
    model = _model("mmoe")
    session = mf.InferenceSession(model)
    assert session.run(torch.randn(0, 13)).shape == (0, 2)
    x = torch.randn(13, 6).t()
    torch.testing.assert_close(session.run(x), model(x).detach(), rtol=1e-5, atol=1e-6)


def test_bad_input_is_a_clear_error():
    session = mf.InferenceSession(_model("mmoe"))
    with pytest.raises(ValueError, match=r"x must have shape \[B, D\] = \[\?, 13\]"):
        session.run(torch.randn(3, 12))
    with pytest.raises(ValueError, match="x must have shape"):
        session.run(np.zeros(13, dtype=np.float32))
    with pytest.raises(TypeError, match="dtype"):
        session.run(torch.randn(3, 13, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be"):
        session.run([[0.0] * 13])
    with pytest.raises(TypeError, match="MMoE, OMoE or SharedBottom"):
        mf.InferenceSession(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="runs on the CPU"):
        mf.InferenceSession(_model("mmoe").to("meta"))


def _onnxruntime():
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_matches_model(name, tmp_path):
    ort = _onnxruntime()
    model = _model(name)
    path = tmp_path / "model.onnx"
    mf.export_onnx(model, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for B in (1, 9):  # the batch dimension is dynamic
        x = torch.randn(B, 13)
        (got,) = sess.run(None, {"x": x.numpy()})
        np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_onnx_export_without_onnx_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ModuleNotFoundError, match=r"mmoe-fast\[onnx\]"):
        mf.export_onnx(_model("mmoe"), tmp_path / "m.onnx")


def test_run_into_a_given_output_buffer():
    model = _model("mmoe")
    session = mf.InferenceSession(model)
    x = torch.randn(5, 13)
    out = torch.full((5, 2), float("nan"))
    assert session.run(x, out=out) is out
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-5, atol=1e-6)
    out_np = np.full((5, 2), np.nan, dtype=np.float32)
    assert session.run(x.numpy(), out=out_np) is out_np
    np.testing.assert_allclose(out_np, out.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="out must be"):
        session.run(x, out=torch.empty(4, 2))
