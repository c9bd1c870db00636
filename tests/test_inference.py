"""InferenceSession equals model.eval()(x); export_onnx writes the same model (checked with onnxruntime)."""


import copy
import importlib.util
import sys

import numpy as np
import pytest
import torch
from torch import nn

import mmoe_fast as mf
from mmoe_fast import inference
from mmoe_fast.backends import cpp
from mmoe_fast.contract import ACTIVATION_CODES
from mmoe_fast.features import Categorical, Dense, Multi
from mmoe_fast.inference import ProbeMismatchError, UnsupportedModelError
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
# Built on feature columns: a table shared by two columns, sum and mean pooling, dense columns of 1 and 2 numbers.
COLUMNS = [Categorical("user", 30, 4), Categorical("item", 20, 3), Multi("history", 20, 3, table="item"),
           Multi("tags", 6, 2, pooling="sum"), Dense("age"), Dense("pos", 2, mean=(1.0, -1.0), std=(2.0, 0.5))]
COLUMN_MODELS = {
    "mmoe-columns": lambda: mf.MMoE(COLUMNS, 2, num_experts=3, expert_hidden=17),
    "omoe-columns": lambda: mf.OMoE(COLUMNS, 3, num_experts=4, expert_hidden=(9, 5)),
    "shared-bottom-columns": lambda: mf.SharedBottom(COLUMNS, 2, bottom_hidden=(20, 7)),
}
EVERY = [*MODELS, *COLUMN_MODELS]


def _model(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return {**MODELS, **COLUMN_MODELS}[name]().to(dtype).eval()


def _column_batch(B, dtype=torch.float32, seed=1):
    """Ids over each vocabulary (-1 pads multi-valued rows anywhere, some rows have none), dense values."""
    g = torch.Generator().manual_seed(seed)
    return {"user": torch.randint(0, 30, (B,), generator=g), "item": torch.randint(0, 20, (B,), generator=g),
            "history": torch.randint(-1, 20, (B, 4), generator=g), "tags": torch.randint(-1, 6, (B, 2), generator=g),
            "age": torch.randn(B, generator=g, dtype=dtype), "pos": torch.randn(B, 2, generator=g, dtype=dtype)}


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
    with pytest.raises(TypeError, match="takes the models of mmoe_fast.models.MODELS .*got Linear"):
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


# ---- what the session and the exporter refuse, and what they keep --------------------------------

@pytest.fixture(params=["session", "onnx"])
def build(request, tmp_path):
    """Either builder of a packed model: ``InferenceSession(model)`` or ``export_onnx(model, path)``."""
    if request.param == "session":
        return mf.InferenceSession
    _onnxruntime()
    return lambda model: mf.export_onnx(model, tmp_path / "model.onnx")


def _where(path):
    return f"'{path}" if path else "the model"


def _refused(build, model, *parts):
    with pytest.raises(UnsupportedModelError) as info:
        build(model)
    for part in parts:
        assert part in str(info.value)
    return str(info.value)


def _answers_like_eager(model, tmp_path):
    """The session and (with onnxruntime) the ONNX graph answer as the eager model on a few batches."""
    session = mf.InferenceSession(model)
    sess = None
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort

        mf.export_onnx(model, tmp_path / "model.onnx")
        sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for B in (1, 40):
        x = torch.randn(B, 13)
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(session.run(x), want, rtol=1e-5, atol=1e-6)
        if sess is not None:
            np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", EVERY)
@pytest.mark.parametrize("hook", ["forward", "forward-pre", "forward-kwargs"])
def test_a_forward_hook_on_any_module_is_refused_naming_it(build, name, hook):
    for path, _ in _model(name).named_modules():
        model = _model(name)
        module = model.get_submodule(path)
        if hook == "forward":
            module.register_forward_hook(lambda m, args, out: out)
        elif hook == "forward-pre":
            module.register_forward_pre_hook(lambda m, args: None)
        else:
            module.register_forward_hook(lambda m, args, kwargs, out: out, with_kwargs=True)
        _refused(build, model, _where(path), "hook")


def test_a_global_forward_hook_is_refused(build):
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: out)
    try:
        _refused(build, _model("mmoe"), "global forward hooks")
    finally:
        handle.remove()
    build(_model("mmoe"))


@pytest.mark.parametrize("name", EVERY)
@pytest.mark.parametrize("change", ["forward", "buffer", "parameter", "submodule", "subclass"])
def test_any_module_changed_beyond_its_class_is_refused_naming_it(build, name, change):
    """Every module, from the model down to a tower's ReLU: its forward replaced on the instance, an extra
    buffer, parameter or submodule, or its class swapped for a subclass (which may override forward)."""
    for path, _ in _model(name).named_modules():
        model = _model(name)
        module = model.get_submodule(path)
        if change == "forward":
            module.forward = module.forward
        elif change == "buffer":
            module.register_buffer("scale", torch.ones(1))
        elif change == "parameter":
            module.register_parameter("scale", nn.Parameter(torch.ones(1)))
        elif change == "submodule":
            module.add_module("extra", nn.Identity())
        else:
            module.__class__ = type(f"My{type(module).__name__}", (type(module),), {})
        _refused(build, model, type(module).__name__ if change == "subclass" and not path else _where(path))


@pytest.mark.parametrize("name", EVERY)
@pytest.mark.parametrize("where", ["dtype", "device"])
def test_any_parameter_of_another_dtype_or_device_is_refused_naming_it(build, name, where):
    for path, _ in _model(name).named_parameters():
        model = _model(name)
        owner, _, leaf = path.rpartition(".")
        module = model.get_submodule(owner)
        p = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(p.double() if where == "dtype" else p.to("meta"))
        _refused(build, model, f"'{path}'", "one dtype and one device")


NOT_PACKED = {  # modules a tower or a bottom may not hold: only nn.Linear and nn.ReLU are packed
    "dropout": lambda: nn.Dropout(0.0), "batchnorm": lambda: nn.BatchNorm1d(8), "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh, "identity": nn.Identity, "nested": lambda: nn.Sequential(nn.ReLU()),
    "linear-subclass": lambda: type("MyLinear", (nn.Linear,), {})(8, 8),
}


@pytest.mark.parametrize("layer", NOT_PACKED)
@pytest.mark.parametrize("name", MODELS)
def test_a_tower_or_bottom_layer_other_than_linear_relu_is_refused_naming_it(build, name, layer):
    model = _model(name)
    seqs = [f"towers.towers.{t}" for t in range(model.num_tasks)] + (["bottom"] if name == "shared-bottom" else [])
    for seq in seqs:
        for position in (0, 1):
            model = _model(name)
            model.get_submodule(seq).insert(position, NOT_PACKED[layer]())
            _refused(build, model, f"'{seq}.{position}'", "nn.Linear or nn.ReLU")


def _set_gates(layer, gates):
    layer.gate_weight = nn.Parameter(torch.randn(gates, *layer.gate_weight.shape[1:]))
    layer.gate_bias = nn.Parameter(torch.randn(gates, layer.gate_bias.shape[1]))


def _swap_layer(model, cls):
    old = model.mixture
    model.mixture = cls(13, old.num_experts, old.expert_hidden, old.num_tasks)


MISCONFIGURED = {  # (model, change, words the error must hold)
    "model-num-tasks": ("mmoe", lambda m: setattr(m, "num_tasks", 3), "num_tasks"),
    "model-num-tasks-bool": ("shared-bottom", lambda m: setattr(m, "num_tasks", True), "num_tasks"),
    "layer-num-tasks": ("mmoe", lambda m: setattr(m.mixture, "num_tasks", 1), "'mixture'"),
    "one-tower-short": ("mmoe-deep-gelu", lambda m: m.towers.towers.__delitem__(2), "2 towers for 3 tasks"),
    "one-tower-extra": ("shared-bottom", lambda m: m.towers.towers.append(m.towers.towers[0]),
                        "3 towers for 2 tasks"),
    "mmoe-with-one-gate": ("mmoe", lambda m: _set_gates(m.mixture, 1), "'mixture.gate_weight'"),
    "omoe-with-a-gate-per-task": ("omoe", lambda m: _set_gates(m.mixture, 3), "'mixture.gate_weight'"),
    "mmoe-with-omoe-layer": ("mmoe", lambda m: _swap_layer(m, mf.OMoELayer), "'mixture' (OMoELayer)"),
    "omoe-with-mmoe-layer": ("omoe", lambda m: _swap_layer(m, mf.MMoELayer), "'mixture' (MMoELayer)"),
    "gate-bias-deleted": ("mmoe", lambda m: delattr(m.mixture, "gate_bias"), "gate_bias"),
    "activation-unknown": ("mmoe", lambda m: setattr(m.mixture, "activation", "tanh"), "'tanh'"),
    "activation-not-a-string": ("omoe", lambda m: setattr(m.mixture, "activation", None), "activation None"),
    "backend-unknown": ("mmoe", lambda m: setattr(m.mixture, "backend", "bogus"), "backend"),
    "tower-weight-shape": ("mmoe", lambda m: setattr(m.towers.towers[1][0], "weight", nn.Parameter(
        torch.randn(8, 5))), "'towers.towers.1.0'"),
    "tower-bias-shape": ("mmoe", lambda m: setattr(m.towers.towers[0][0], "bias", nn.Parameter(torch.randn(3))),
                         "'towers.towers.0.0.bias'"),
    "tower-two-outputs": ("mmoe", lambda m: m.towers.towers[0].__setitem__(2, nn.Linear(8, 2)), "expected 1"),
    "tower-empty": ("omoe", lambda m: m.towers.towers.__setitem__(0, nn.Sequential()), "no nn.Linear"),
    "tower-relu-first": ("mmoe", lambda m: m.towers.towers[0].insert(0, nn.ReLU()), "before any nn.Linear"),
    "bottom-width": ("shared-bottom", lambda m: m.bottom.__setitem__(2, nn.Linear(19, 7)), "'bottom.2'"),
    "expert-weight-shape": ("mmoe-deep-gelu", lambda m: m.mixture.expert_weights.__setitem__(
        1, nn.Parameter(torch.randn(4, 8, 33))), "'mixture.expert_weights.1'"),
    "expert-bias-shape": ("mmoe", lambda m: m.mixture.expert_biases.__setitem__(
        0, nn.Parameter(torch.randn(3, 16))), "'mixture.expert_biases.0'"),
    "expert-count-differs": ("mmoe-deep-gelu", lambda m: m.mixture.expert_biases.append(
        nn.Parameter(torch.randn(4, 1))), "3 expert biases"),
    "gate-weight-none": ("mmoe", lambda m: setattr(m.mixture, "gate_weight", None), "'mixture.gate_weight'"),
    "sparse-weight": ("mmoe", lambda m: setattr(m.towers.towers[0][0], "weight", nn.Parameter(
        m.towers.towers[0][0].weight.detach().to_sparse())), "dense floating-point"),
}


@pytest.mark.parametrize("case", MISCONFIGURED)
def test_a_misconfigured_model_is_refused_saying_what(build, case):
    name, change, words = MISCONFIGURED[case]
    model = _model(name)
    change(model)
    _refused(build, model, words)


def test_refusals_are_type_and_value_errors_and_export_writes_nothing(tmp_path):
    model = _model("mmoe")
    model.towers.towers[0].append(nn.Sigmoid())
    for error in (TypeError, ValueError, UnsupportedModelError):
        with pytest.raises(error):
            mf.InferenceSession(model)
    if importlib.util.find_spec("onnx"):
        with pytest.raises(UnsupportedModelError):
            mf.export_onnx(model, tmp_path / "m.onnx")
        assert not (tmp_path / "m.onnx").exists()


def _negative_view_weight(m):
    lin = m.towers.towers[0][0]
    lin.weight = nn.Parameter(torch._neg_view(-lin.weight.detach()))


def _strided_weight(m):
    w = m.mixture.expert_weights[0].detach()
    m.mixture.expert_weights[0] = nn.Parameter(w.transpose(0, 2).contiguous().transpose(0, 2))


def _shared_tower(m):
    m.towers.towers[1] = m.towers.towers[0]


KEPT = {  # changes that keep the model within what is packed: the answers must still equal the eager model's
    "gate-bias-none": ("mmoe", lambda m: setattr(m.mixture, "gate_bias", None)),
    "activation-gelu": ("mmoe", lambda m: setattr(m.mixture, "activation", "gelu")),
    "activation-silu": ("omoe", lambda m: setattr(m.mixture, "activation", "silu")),
    "backend-reference": ("mmoe-deep-gelu", lambda m: setattr(m.mixture, "backend", "reference")),
    "inplace-relu": ("mmoe", lambda m: m.towers.towers[0].__setitem__(1, nn.ReLU(inplace=True))),
    "relu-twice": ("shared-bottom", lambda m: m.bottom.insert(1, nn.ReLU())),
    "tower-without-bias": ("mmoe", lambda m: setattr(m.towers.towers[1][2], "bias", None)),
    "train-mode": ("mmoe-deep-gelu", lambda m: m.train()),
    "negative-view-weight": ("mmoe", _negative_view_weight),
    "non-contiguous-weight": ("mmoe", _strided_weight),
    "shared-tower-module": ("mmoe", _shared_tower),
    "backward-hook": ("omoe", lambda m: m.towers.register_full_backward_hook(lambda *args: None)),
}


@pytest.mark.parametrize("case", KEPT)
def test_a_model_changed_within_what_is_packed_answers_as_eager(case, tmp_path):
    name, change = KEPT[case]
    model = _model(name)
    change(model)
    _answers_like_eager(model, tmp_path)


def _scaled_linear(monkeypatch):
    forward = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: forward(self, x) * 1.001)


@pytest.mark.parametrize("name", MODELS)
def test_the_probe_check_catches_a_forward_the_whitelist_cannot_see(build, name, monkeypatch):
    _scaled_linear(monkeypatch)  # a class-level patch: the types are still exactly nn.Linear
    with pytest.raises(ProbeMismatchError, match="differs from the eager model on the probe batch"):
        build(_model(name))


@pytest.mark.skipif(not NATIVE, reason="mmoe_fast._C not built")
def test_the_probe_check_catches_a_wrong_packing(monkeypatch):
    monkeypatch.setattr(inference, "ACTIVATION_CODES", {**ACTIVATION_CODES, "gelu": ACTIVATION_CODES["relu"]})
    with pytest.raises(ProbeMismatchError, match="the packed model differs"):
        mf.InferenceSession(_model("mmoe-deep-gelu"))


def test_the_probe_check_catches_a_wrong_onnx_graph(monkeypatch, tmp_path):
    _onnxruntime()
    monkeypatch.setattr(inference._Graph, "act", lambda self, h, activation: h)
    with pytest.raises(ProbeMismatchError, match=r"ONNX graph \(onnxruntime\) differs"):
        mf.export_onnx(_model("mmoe-deep-gelu"), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_the_probe_check_leaves_the_callers_random_state_alone(build):
    model = _model("mmoe")
    torch.manual_seed(3)
    state = torch.get_rng_state()
    build(model)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_model_that_fails_eagerly_is_refused(build, monkeypatch):
    def broken(self, x):
        raise RuntimeError("boom")

    monkeypatch.setattr(mf.Towers, "forward", broken)
    with pytest.raises(ProbeMismatchError, match="the eager model fails on the probe batch.*boom"):
        build(_model("mmoe"))


def test_onnx_export_without_onnxruntime_warns_that_answers_went_unchecked(monkeypatch, tmp_path):
    pytest.importorskip("onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.warns(UserWarning, match="onnxruntime is not installed"):
        mf.export_onnx(_model("omoe"), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("opset", [12, 10**6, "17", True, None])
def test_onnx_export_refuses_an_opset_it_cannot_write(opset, tmp_path):
    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match="opset must be an int"):
        mf.export_onnx(_model("mmoe"), tmp_path / "m.onnx", opset=opset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_onnx_export_matches_model_in_both_dtypes(dtype, tmp_path):
    ort = _onnxruntime()
    for name in MODELS:
        model = _model(name, dtype)
        mf.export_onnx(model, tmp_path / "m.onnx")
        sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
        x = torch.randn(6, 13, dtype=dtype)
        (got,) = sess.run(None, {"x": x.numpy()})
        np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


# ---- run(): what x and out may be ----------------------------------------------------------------

@pytest.fixture(params=["cpp", "eager"])
def session_of(request, monkeypatch):
    """Builds a session on the packed C++ path or on the eager fallback (as without ``_C``)."""
    if request.param == "cpp" and not NATIVE:
        pytest.skip("mmoe_fast._C not built")

    def make(model):
        with monkeypatch.context() as patch:
            if request.param == "eager":
                patch.setattr(cpp, "unavailable_reason", lambda: "switched off by the test")
            session = mf.InferenceSession(model)
        assert session.backend == request.param
        return session

    return make


def _read_only(a):
    a.flags.writeable = False
    return a


def _memmap_copy(tmp_path, a, mode="r"):
    """A memory-mapped copy of ``a`` (read-only for mode "r")."""
    path = tmp_path / f"buf-{mode}-{a.shape}.bin"
    a.tofile(path)
    return np.memmap(path, dtype=a.dtype, mode=mode, shape=a.shape)


def _unaligned_copy(a):
    """A copy of ``a`` one byte off its dtype's alignment."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = np.frombuffer(raw.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    return out


GOOD_X = {  # x that must be read as it is, equal to the eager model's answer
    "torch": lambda x, tmp: x,
    "torch-transposed": lambda x, tmp: x.t().contiguous().t(),
    "torch-strided-rows": lambda x, tmp: torch.cat([x, x]).view(2, *x.shape).transpose(0, 1)[:, 0],
    "torch-negative-view": lambda x, tmp: torch._neg_view(-x),
    "torch-requires-grad": lambda x, tmp: x.clone().requires_grad_(),
    "torch-unaligned": lambda x, tmp: torch.from_numpy(_unaligned_copy(x.numpy())),
    "numpy": lambda x, tmp: x.numpy(),
    "numpy-read-only": lambda x, tmp: _read_only(x.numpy().copy()),
    "numpy-from-bytes": lambda x, tmp: np.frombuffer(x.numpy().tobytes(), np.float32).reshape(x.shape),
    "numpy-fortran": lambda x, tmp: np.asfortranarray(x.numpy()),
    "numpy-every-other-row": lambda x, tmp: np.repeat(x.numpy(), 2, axis=0)[::2],
    "numpy-unaligned": lambda x, tmp: _unaligned_copy(x.numpy()),
    "numpy-read-only-memmap": lambda x, tmp: _memmap_copy(tmp, x.numpy()),
}


@pytest.mark.parametrize("kind", GOOD_X)
@pytest.mark.parametrize("name", ["mmoe-deep-gelu", "shared-bottom"])
def test_any_readable_x_is_read_as_it_is(session_of, name, kind, tmp_path):
    model = _model(name)
    session = session_of(model)
    for B in (1, 45):
        x = torch.randn(B, 13)
        with torch.no_grad():
            want = model(x)
        given = GOOD_X[kind](x, tmp_path)
        got = session.run(given)
        assert isinstance(got, torch.Tensor) == isinstance(given, torch.Tensor)
        torch.testing.assert_close(torch.as_tensor(np.asarray(got)), want, rtol=1e-5, atol=1e-6)


BAD_X = {  # (x from a good x[B, 13] float32, the error, words it must hold)
    "1-d": (lambda x: x[0], ValueError, "x must have shape"),
    "3-d": (lambda x: x[None], ValueError, "x must have shape"),
    "0-d": (lambda x: x[0, 0], ValueError, "x must have shape"),
    "narrow": (lambda x: x[:, :12], ValueError, r"\[\?, 13\]"),
    "wide": (lambda x: torch.cat([x, x], 1), ValueError, r"\[\?, 13\]"),
    "float64": (lambda x: x.double(), TypeError, "dtype"),
    "int": (lambda x: x.long(), TypeError, "dtype"),
    "bool": (lambda x: x > 0, TypeError, "dtype"),
    "numpy-float64": (lambda x: x.double().numpy(), TypeError, "dtype"),
    "numpy-big-endian": (lambda x: x.numpy().astype(">f4"), TypeError, "dtype"),
    "numpy-1-d": (lambda x: x.numpy()[0], ValueError, "x must have shape"),
    "meta": (lambda x: x.to("meta"), ValueError, "on device meta"),
    "sparse": (lambda x: x.to_sparse(), TypeError, "dense"),
    "list": (lambda x: x.tolist(), TypeError, "torch.as_tensor or numpy.asarray"),
    "tuple": (lambda x: tuple(map(tuple, x.tolist())), TypeError, "x must be a torch.Tensor or a numpy.ndarray"),
    "none": (lambda x: None, TypeError, "got NoneType"),
    "masked-array": (lambda x: np.ma.masked_array(x.numpy(), mask=x.numpy() > 0), TypeError, "MaskedArray"),
    "tensor-subclass": (lambda x: x.as_subclass(type("MyTensor", (torch.Tensor,), {})), TypeError, "MyTensor"),
}


@pytest.mark.parametrize("kind", BAD_X)
def test_any_unusable_x_is_a_clear_error(session_of, kind):
    session = session_of(_model("mmoe"))
    make, error, words = BAD_X[kind]
    for out in (None, "matching"):
        x = make(torch.randn(5, 13))
        out = None if out is None else (np.zeros((5, 2), np.float32) if isinstance(x, np.ndarray)
                                        else torch.zeros(5, 2))
        with pytest.raises(error, match=words):
            session.run(x, out=out)


def _overlapping_torch(x):
    buf = torch.zeros(x.numel() + 10)
    x_in = buf[:x.numel()].view(x.shape).copy_(x)
    return x_in, buf[3:3 + 2 * x.shape[0]].view(x.shape[0], 2)


def _overlapping_numpy(x):
    buf = np.zeros(x.numel() + 10, np.float32)
    x_in = buf[:x.numel()].reshape(x.shape)
    x_in[...] = x.numpy()
    return x_in, buf[3:3 + 2 * x.shape[0]].reshape(x.shape[0], 2)


def _grad_leaf_view(x):
    leaf = torch.zeros(x.shape[0], 2, requires_grad=True)
    return x, leaf[:]


BAD_OUT = {  # (x, out) from a good x[5, 13] float32; the error; words it must hold
    "numpy-read-only": (lambda x: (x.numpy(), _read_only(np.zeros((5, 2), np.float32))), ValueError, "read-only"),
    "numpy-from-bytes": (lambda x: (x.numpy(), np.frombuffer(bytes(40), np.float32).reshape(5, 2)), ValueError,
                         "read-only"),
    "numpy-read-only-memmap": (lambda x: (x.numpy(), "memmap-r"), ValueError, "read-only"),
    "torch-requires-grad": (lambda x: (x, torch.zeros(5, 2, requires_grad=True)), ValueError, "requires grad"),
    "torch-view-of-grad-leaf": (_grad_leaf_view, ValueError, "requires grad"),
    "torch-too-small": (lambda x: (x, torch.zeros(4, 2)), ValueError, r"shape \(5, 2\)"),
    "torch-too-big": (lambda x: (x, torch.zeros(6, 2)), ValueError, r"shape \(5, 2\)"),
    "torch-flat": (lambda x: (x, torch.zeros(10)), ValueError, r"shape \(5, 2\)"),
    "torch-transposed-shape": (lambda x: (x, torch.zeros(2, 5)), ValueError, r"shape \(5, 2\)"),
    "torch-non-contiguous": (lambda x: (x, torch.zeros(2, 5).t()), ValueError, "contiguous"),
    "torch-negative-view": (lambda x: (x, torch._neg_view(torch.zeros(5, 2))), ValueError, "negative-bit"),
    "torch-unaligned": (lambda x: (x, torch.from_numpy(_unaligned_copy(np.zeros((5, 2), np.float32)))),
                        ValueError, "aligned"),
    "torch-float64": (lambda x: (x, torch.zeros(5, 2, dtype=torch.float64)), TypeError, "dtype"),
    "torch-meta": (lambda x: (x, torch.zeros(5, 2, device="meta")), ValueError, "CPU"),
    "torch-overlapping-x": (_overlapping_torch, ValueError, "overlaps x"),
    "torch-inside-x": (lambda x: (x, x.view(-1)[3:13].view(5, 2)), ValueError, "overlaps x"),
    "numpy-for-torch-x": (lambda x: (x, np.zeros((5, 2), np.float32)), TypeError, "out must be a torch.Tensor"),
    "torch-for-numpy-x": (lambda x: (x.numpy(), torch.zeros(5, 2)), TypeError, "out must be a numpy.ndarray"),
    "list": (lambda x: (x, [[0.0, 0.0]] * 5), TypeError, "out must be a torch.Tensor"),
    "numpy-too-small": (lambda x: (x.numpy(), np.zeros((4, 2), np.float32)), ValueError, r"shape \(5, 2\)"),
    "numpy-float64": (lambda x: (x.numpy(), np.zeros((5, 2))), TypeError, "dtype"),
    "numpy-non-contiguous": (lambda x: (x.numpy(), np.zeros((2, 5), np.float32).T), ValueError, "C-contiguous"),
    "numpy-unaligned": (lambda x: (x.numpy(), _unaligned_copy(np.zeros((5, 2), np.float32))), ValueError,
                        "aligned"),
    "numpy-overlapping-x": (_overlapping_numpy, ValueError, "overlaps x"),
    "numpy-masked": (lambda x: (x.numpy(), np.ma.zeros((5, 2), np.float32)), TypeError, "MaskedArray"),
}


@pytest.mark.parametrize("kind", BAD_OUT)
def test_any_unwritable_out_is_a_clear_error_and_stays_untouched(session_of, kind, tmp_path):
    session = session_of(_model("mmoe"))
    make, error, words = BAD_OUT[kind]
    x, out = make(torch.randn(5, 13))
    if isinstance(out, str):
        out = _memmap_copy(tmp_path, np.zeros((5, 2), np.float32))
    before = copy.deepcopy(out) if isinstance(out, (list, np.ndarray)) else out.detach().clone()
    with pytest.raises(error, match=words) as info:
        session.run(x, out=out)
    assert isinstance(info.value, ValueError) and str(info.value).startswith("out ")  # as before: "out ..."
    if isinstance(out, torch.Tensor) and not out.is_meta:
        assert torch.equal(out.detach(), before.detach())
    elif isinstance(out, np.ndarray):
        np.testing.assert_array_equal(out, before)


def test_writable_memmap_and_plain_outputs_are_filled(session_of, tmp_path):
    model = _model("omoe")
    session = session_of(model)
    x = torch.randn(9, 13)
    want = model(x).detach()
    for out in (torch.full((9, 3), float("nan")), np.full((9, 3), np.nan, np.float32),
                _memmap_copy(tmp_path, np.zeros((9, 3), np.float32), mode="r+")):
        given = x if isinstance(out, torch.Tensor) else x.numpy()
        assert session.run(given, out=out) is out
        torch.testing.assert_close(torch.as_tensor(np.asarray(out)), want, rtol=1e-5, atol=1e-6)


def test_a_write_into_out_is_seen_by_autograd(session_of):
    session = session_of(_model("mmoe"))
    w = torch.randn(5, 2, requires_grad=True)
    out = torch.zeros(5, 2)
    loss = (w * out).sum()  # saves out for the backward
    session.run(torch.randn(5, 13), out=out)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("name", MODELS)
def test_nan_in_a_row_gives_nan_in_that_row_only(session_of, name):
    model = _model(name)
    session = session_of(model)
    x = torch.randn(40, 13)
    rows = [0, 17, 39]
    x[rows, [3, 0, 12]] = float("nan")
    with torch.no_grad():
        want = model(x)
    for given in (x, x.numpy()):
        got = torch.as_tensor(session.run(given))
        assert torch.isnan(got[rows]).all() and torch.isnan(want[rows]).all()
        keep = [r for r in range(40) if r not in rows]
        assert not torch.isnan(got[keep]).any()
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-6)


def test_a_non_string_backend_is_refused(build):
    model = _model("mmoe")
    model.mixture.backend = None
    _refused(build, model, "'mixture'", "backend")


def test_a_half_precision_model_runs_eagerly_and_equals_the_model():
    model = _model("mmoe", torch.bfloat16)
    session = mf.InferenceSession(model)
    assert session.backend == "eager"
    x = torch.randn(6, 13, dtype=torch.bfloat16)
    torch.testing.assert_close(session.run(x), model(x).detach())
    with pytest.raises(TypeError, match="dtype"):
        session.run(x.float().numpy())


# ---- models on feature columns --------------------------------------------------------------------


@pytest.mark.parametrize("name", COLUMN_MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_model_on_columns_serves_as_eager(session_of, name, dtype, tmp_path):
    model = _model(name, dtype)
    session = session_of(model)
    ort = _onnxruntime()
    mf.export_onnx(model, tmp_path / "m.onnx")
    graph = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in graph.get_inputs()][:3] == [
        ("user", "tensor(int64)"), ("item", "tensor(int64)"), ("history", "tensor(int64)")]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for B in (1, 7, 130):
        batch = _column_batch(B, dtype, seed=B)
        with torch.no_grad():
            want = model(batch)
        got = session.run(batch)
        assert type(got) is torch.Tensor and got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(session.run({k: v.numpy() for k, v in batch.items()}), want, **tol)
        onnx_out = graph.run(None, {k: v.numpy() for k, v in batch.items()})[0]
        np.testing.assert_allclose(onnx_out, want.numpy(), **tol)


def test_a_session_on_columns_is_a_snapshot_of_its_embeddings(session_of):
    model = _model("mmoe-columns")
    session = session_of(model)
    batch = _column_batch(9)
    before = session.run(batch)
    with torch.no_grad():
        model.encoder.table_weight("item").add_(1.0)  # the shared table: item and history both read it
        changed = model(batch)
    assert (changed - before).abs().max() > 1e-3  # the embeddings matter to the answer ...
    torch.testing.assert_close(session.run(batch), before, rtol=0, atol=0)  # ... and the session kept its own


def test_a_session_on_columns_refuses_bad_batches(session_of):
    session = session_of(_model("shared-bottom-columns"))
    with pytest.raises(TypeError, match="dict of column tensors .*'user'"):
        session.run(torch.randn(2, 15))
    batch = _column_batch(3)
    del batch["age"]
    with pytest.raises(ValueError, match="no column 'age'"):
        session.run(batch)
    batch = _column_batch(3)
    batch["user"][1] = 30
    with pytest.raises(ValueError, match=r"user: id 30 is outside \[0, 30\)"):
        session.run(batch)
    out = torch.empty(3, 2)
    assert session.run(_column_batch(3), out=out) is out
    torch.testing.assert_close(out, session.run(_column_batch(3)))
    with pytest.raises(ValueError, match="out must be"):
        session.run(_column_batch(3), out=torch.empty(4, 2))


@pytest.mark.parametrize("setting", ["max_norm", "mode", "padding_idx"])
def test_an_embedding_bag_that_changes_its_lookups_is_refused(build, setting):
    model = _model("omoe-columns")
    bag = model.encoder.bags["3_0"]
    if setting == "max_norm":
        bag.max_norm = 1.0  # renormalizes the rows it reads, in place
    elif setting == "mode":
        bag.mode = "max"
    else:
        bag.padding_idx = 0
    _refused(build, model, "'encoder.bags.3_0'", "mode 'sum'")


def test_a_model_whose_encoder_was_swapped_is_refused(build):
    model = _model("mmoe-columns")
    model.encoder = mf.features.FeatureEncoder(COLUMNS[:2])
    _refused(build, model, "'encoder'", "gives 7 features but the model takes")


# ---- every other model: traced through torch.onnx.export ------------------------------------------

TRACED = ["single-task", "l2-constrained", "cross-stitch", "tensor-factorization", "esmm", "cgc", "ple"]


def _traced(name, columns=False, dtype=torch.float32):
    torch.manual_seed(3)
    from mmoe_fast.models import build_model

    types = ("binary", "binary") if name == "esmm" else ("binary", "regression")
    return build_model(name, COLUMNS if columns else 13, 2, task_types=types).to(dtype).eval()


def _inputs(columns, B, dtype):
    return _column_batch(B, dtype, seed=B) if columns else torch.randn(B, 13, dtype=dtype)


@pytest.mark.parametrize("name", TRACED)
@pytest.mark.parametrize("columns", [False, True], ids=["dense", "columns"])
def test_every_other_model_serves_and_exports_as_eager(name, columns, tmp_path):
    ort = _onnxruntime()
    model = _traced(name, columns)
    session = mf.InferenceSession(model)
    assert session.backend == "onnxruntime"
    mf.export_onnx(model, tmp_path / "m.onnx")
    graph = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in graph.get_inputs()] == (["user", "item", "history", "tags", "age", "pos"] if columns
                                                    else ["x"])
    for B in (1, 7, 130):
        x = _inputs(columns, B, torch.float32)
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(session.run(x), want, rtol=1e-5, atol=1e-6)
        feed = {k: v.numpy() for k, v in x.items()} if columns else {"x": x.numpy()}
        np.testing.assert_allclose(graph.run(None, feed)[0], want.numpy(), rtol=1e-5, atol=1e-6)
    assert session.run(_inputs(columns, 0, torch.float32)).shape == (0, 2)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_traced_path_under_either_exporter_and_dtype(exporter, dtype, monkeypatch, tmp_path):
    _onnxruntime()
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    monkeypatch.setattr(inference, "_DYNAMO_EXPORTER", exporter == "dynamo")
    model = _traced("ple", dtype=dtype)
    session = mf.InferenceSession(model)
    x = torch.randn(33, 13, dtype=dtype)
    with torch.no_grad():
        want = model(x)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(session.run(x), want, **tol)
    np.testing.assert_allclose(session.run(x.numpy()), want.numpy(), **tol)
    out = torch.empty(33, 2, dtype=dtype)
    assert session.run(x, out=out) is out
    torch.testing.assert_close(out, want, **tol)
    mf.export_onnx(model, tmp_path / "m.onnx", opset=18)


def test_a_traced_model_keeps_what_its_submodules_hooks_do_and_refuses_its_own(tmp_path):
    model = _traced("cgc")
    model.towers.towers[1].register_forward_hook(lambda m, args, out: 2 * out)  # traced with the rest
    session = mf.InferenceSession(model)
    x = torch.randn(5, 13)
    with torch.no_grad():
        torch.testing.assert_close(session.run(x), model(x), rtol=1e-5, atol=1e-6)
    model.register_forward_hook(lambda m, args, out: out + 1)  # the model's own: the trace of forward skips it
    _refused(mf.InferenceSession, model, "the model", "hook")
    mine = type("MyCGC", (type(_traced("cgc")),), {})
    model = _traced("cgc")
    model.__class__ = mine
    _refused(mf.InferenceSession, model, "MODELS", "MyCGC", "torch.onnx.export")


def test_the_probe_check_catches_a_traced_graph_that_differs(monkeypatch):
    _onnxruntime()
    monkeypatch.setattr(inference._Trunk, "forward", lambda self, x: self.model.forward(x) * 1.01)
    with pytest.raises(ProbeMismatchError, match="the traced model"):
        mf.InferenceSession(_traced("esmm"))


def test_without_onnxruntime_a_traced_model_runs_eagerly(monkeypatch):
    real = inference._have
    monkeypatch.setattr(inference, "_have", lambda name: name != "onnxruntime" and real(name))
    model = _traced("single-task", columns=True)
    session = mf.InferenceSession(model)
    assert session.backend == "eager"
    batch = _column_batch(4)
    with torch.no_grad():
        torch.testing.assert_close(session.run(batch), model(batch))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_torch_onnx_export_of_a_users_own_module_translates_the_fused_ops(dynamo, tmp_path):
    """The standard exporters trace the fused ops as their plain-PyTorch formulas: a wrapper of the user's exports."""
    ort = _onnxruntime()
    if dynamo:
        pytest.importorskip("onnxscript")

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Linear(13, 13)
            self.mmoe = mf.MMoE(13, 2, num_experts=3, expert_hidden=(9, 5), activation="gelu")
            self.ple = mf.PLE(13, 2)

        def forward(self, x):
            h = torch.tanh(self.scale(x))
            return self.mmoe(h) + self.ple(h)

    torch.manual_seed(0)
    model = Wrapper().eval()
    x = torch.randn(6, 13)
    path = tmp_path / "w.onnx"
    import onnx

    with warnings_ignored():
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True, input_names=["x"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}})
    assert not [n for n in onnx.load(str(path)).graph.node if "mmoe_fast" in n.domain + n.op_type]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for B in (1, 9):
        x = torch.randn(B, 13)
        with torch.no_grad():
            np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], model(x).numpy(), rtol=1e-5, atol=1e-6)
    # outside an export the fused kernels run, not the formulas
    assert not torch.onnx.is_in_onnx_export()


def warnings_ignored():
    import contextlib
    import io
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


@pytest.mark.parametrize("name", ["mmoe", "ple"])
def test_an_archive_exported_under_decomposed_runs_without_mmoe_fast(name, tmp_path):
    """torch.export keeps the fused ops as mmoe_fast:: nodes (loading needs the package); under decomposed() the
    archive holds ATen ops only: a fresh process that never imports mmoe_fast loads and runs it."""
    import subprocess

    from mmoe_fast.models import build_model

    torch.manual_seed(0)
    model = build_model(name, 13, 2, task_types=("binary", "regression")).eval()
    x = torch.randn(9, 13)
    kept = torch.export.export(model, (x,))
    assert any("mmoe_fast" in str(n.target) for n in kept.graph.nodes)
    with mf.decomposed():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert not any("mmoe_fast" in str(n.target) for n in program.graph.nodes)
    assert not mf.ops.is_decomposing()  # left as it was
    torch.export.save(program, tmp_path / "m.pt2")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        want = model(x)
    code = ("import sys, torch; p = torch.export.load(sys.argv[1]); x = torch.load(sys.argv[2]); "
            "torch.save(p.module()(x), sys.argv[3]); torch.save(p.module()(x[:1]), sys.argv[4]); "
            "assert 'mmoe_fast' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, *(str(tmp_path / f) for f in ("m.pt2", "x.pt", "y.pt", "y1.pt"))],
                   check=True, timeout=120, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.load(tmp_path / "y1.pt"), want[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_sessions_lookups_equal_the_encoder_and_fall_back_to_it(dtype, monkeypatch):
    model = _model("mmoe-columns", dtype)
    lookups = inference._Lookups(model.encoder)
    calls = []
    real = type(model.encoder).forward
    monkeypatch.setattr(type(model.encoder), "forward", lambda self, b: calls.append(1) or real(self, b))
    for B in (0, 1, 5, 70):
        batch = _column_batch(B, dtype, seed=B)
        batch["item"] = batch["item"].int()  # int32 ids are read as they are
        with torch.no_grad():
            want = real(model.encoder, batch)
        torch.testing.assert_close(lookups(batch), want, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
    assert not calls  # every one of those took the fast path
    # (ids, offsets) for a multi-valued column: the encoder answers it
    batch = _column_batch(3, dtype)
    flat = batch["history"][batch["history"] >= 0]
    starts = torch.cumsum((batch["history"] >= 0).sum(1), 0) - (batch["history"] >= 0).sum(1)
    torch.testing.assert_close(lookups({**batch, "history": (flat, starts)}), lookups(batch))
    assert len(calls) == 1
    for bad, match in (({"user": torch.tensor([0, 30, 1])}, "user: id 30 is outside"),
                       ({"history": torch.tensor([[0, -2], [1, 1], [2, 2]])}, "history: id -2 is outside"),
                       ({"tags": torch.tensor([[0, 6], [1, 1], [2, 2]])}, "tags: id 6 is outside"),
                       ({"age": torch.tensor([1, 2, 3])}, None)):
        batch = {**_column_batch(3, dtype), **bad}
        if match is None:  # integer values for a dense column: the encoder converts them, as eager does
            torch.testing.assert_close(lookups(batch), real(model.encoder, batch))
            continue
        with pytest.raises(ValueError, match=match):
            lookups(batch)


def test_an_id_outside_its_table_fails_the_onnx_run_as_the_encoder_refuses_it(tmp_path):
    """ONNX's Gather reads a negative index from the end of the table: the graph must not answer one."""
    ort = _onnxruntime()
    model = _model("mmoe-columns")
    mf.export_onnx(model, tmp_path / "m.onnx")
    graph = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for name, value in (("user", [0, -1, 1]), ("user", [0, 30, 1]), ("history", [[0, -2], [1, -1], [2, 2]]),
                        ("tags", [[0, 6], [1, 1], [-1, -1]])):
        batch = {**_column_batch(3), name: torch.tensor(value)}
        with pytest.raises(ValueError, match=f"{name}: id"):
            model(batch)
        with pytest.raises(Exception, match="indices element out of data bounds"):
            graph.run(None, {k: v.numpy() for k, v in batch.items()})


def test_an_ids_offsets_pair_in_any_container_is_read_as_the_encoder_reads_it():
    """torch.as_tensor would stack a pair of equal-length arrays into padded rows: the session must not."""
    torch.manual_seed(0)
    model = mf.MMoE([Multi("h", 10, 4, pooling="sum"), Categorical("u", 10, 4)], 2).eval()
    session = mf.InferenceSession(model)
    for pair in ((np.array([5, 6]), np.array([0, 1])), [torch.tensor([5, 6]), torch.tensor([0, 1])]):
        batch = {"h": pair, "u": np.array([1, 2])}
        with torch.no_grad():
            torch.testing.assert_close(session.run(batch), model(batch))
    with pytest.raises(UnsupportedModelError, match=r"column\(s\) \['y'\] would clash"):
        mf.export_onnx(mf.MMoE([Categorical("y", 5, 2)], 1), "unused.onnx")
