"""The no-grad forward of a whole MMoE/OMoE as one C++ call on its parameters read in place (``cpp.Live``), and
the guard that decides when it may run: equal to the oracle and bit for bit to an ``InferenceSession``, never
stale after any change to the model, stepping aside wherever it cannot stand in."""

import copy
import os

import pytest
import torch
from torch import nn

import mmoe_fast as mf
from mmoe_fast import reference, train
from mmoe_fast.backends import cpp as cpp_backend
from mmoe_fast.models import common
from mmoe_fast.testing import assert_close

pytestmark = pytest.mark.skipif(cpp_backend.unavailable_reason() is not None, reason="mmoe_fast._C is not built")


def _oracle(model, x):
    """Plain PyTorch, module by module: the reference mixture, then each tower as its modules."""
    layer = model.mixture
    m = reference.mmoe_layer(x, list(layer.expert_weights), list(layer.expert_biases), layer.gate_weight,
                             layer.gate_bias, layer.activation).expand(model.num_tasks, -1, -1)
    return torch.cat([tower(m[t]) for t, tower in enumerate(model.towers.towers)], dim=1)


def _live_of(model):
    """The ``cpp.Live`` the model's last no-grad forward ran or built (None: the general path)."""
    call = model.__dict__.get("_live")
    return None if call is None else call.live


def _live(model, x):
    """The no-grad forward, asserting it ran on the live path."""
    model.__dict__.pop("_live", None)
    with torch.no_grad():
        out = model(x)
    assert _live_of(model) is not None, "the live path did not run"
    return out


@pytest.mark.parametrize("cls", [mf.MMoE, mf.OMoE])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "identity"])
@pytest.mark.parametrize("B,D,T,E,H,towers,gate_bias", [
    (1, 5, 1, 1, 3, (), True), (1, 100, 2, 8, 16, (8,), True), (7, 10, 2, 3, 5, (4,), False),
    (33, 9, 3, 5, 7, (6, 3), True), (65, 37, 2, 3, 33, (40,), True), (1, 6, 2, 1, (5, 3), (4,), False),
    (9, 7, 3, 4, (6, 5, 3), (2,), True), (300, 20, 2, 9, 8, (), True),
    (5, 20, 2, 3, 70, (6, 3), True), (70, 12, 2, 2, (9, 131), (16, 8), False)])
def test_the_live_forward_equals_the_oracle_and_a_session_bit_for_bit(cls, activation, B, D, T, E, H, towers,
                                                                       gate_bias):
    torch.manual_seed(B * 7 + D + T + E)
    for dtype in (torch.float64, torch.float32):
        model = cls(D, T, num_experts=E, expert_hidden=H, tower_hidden=towers, gate_bias=gate_bias,
                    activation=activation).to(dtype).eval()
        x = torch.randn(B, D, dtype=dtype)
        out = _live(model, x)
        assert out.shape == (B, T) and out.dtype == dtype and not out.requires_grad
        assert_close(out, _oracle(model, x), 1e-10 if dtype == torch.float64 else 1e-4, "live forward vs oracle")
        assert torch.equal(out, mf.InferenceSession(model).run(x))
        with torch.inference_mode():
            assert torch.equal(model(x), out)


def test_the_live_forward_reads_the_parameters_as_they_are_at_each_call():
    """In-place updates, .data replaced, swapped tensors, a loaded state dict, fit's own Adam, a negative-bit or
    strided parameter, a new shape: every call answers with the model as it is then."""
    torch.manual_seed(0)
    model = mf.MMoE(12, 2, num_experts=4, expert_hidden=6, tower_hidden=(5,)).double()
    x = torch.randn(17, 12, dtype=torch.float64)

    def check(what):
        with torch.no_grad():
            out = model(x)
        assert_close(out, _oracle(model, x), 1e-10, what)
        return out

    first = check("first call")
    w = model.mixture.expert_weights[0]
    with torch.no_grad():
        w.mul_(-1.5)
    assert not torch.equal(check("in place"), first)
    w.data = torch.randn_like(w)
    check(".data replaced")
    torch.utils.swap_tensors(model.mixture.gate_weight, nn.Parameter(torch.randn(2, 12, 4, dtype=torch.float64)))
    check("swap_tensors")
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    check("load_state_dict")
    train.fit(model, torch.randn(64, 12, dtype=torch.float64), (torch.rand(64, 2) > 0.5).double(), epochs=1,
           batch_size=16, progress=False, log=lambda s: None)
    check("after fit")
    tw = model.towers.towers[1][0].weight
    tw.data = torch._neg_view(-tw.detach().clone())  # memory holds minus the values
    check("a negative-bit tower weight")
    assert _live_of(model) is None  # stepped aside to the general path
    tw.data = tw.detach().clone()
    check("a plain one again")
    assert _live_of(model) is not None
    model.mixture.gate_weight.data = torch.randn(2, 4, 12, dtype=torch.float64).transpose(1, 2)  # strided
    check("a strided gate weight")
    model.mixture.expert_biases[0].data = torch.randn(4, 7, dtype=torch.float64)  # no longer fits the weights
    with pytest.raises(ValueError):
        with torch.no_grad():
            model(x)


def test_the_live_forward_sees_every_change_to_the_modules():
    torch.manual_seed(1)
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4, tower_hidden=(5,)).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    _live(model, x)
    for register in ("register_forward_hook", "register_forward_pre_hook"):
        for module in (model.mixture, model.towers, model.towers.towers[1], model.towers.towers[1][2]):
            if register == "register_forward_hook":
                handle = getattr(module, register)(lambda m, i, o: o * 0)
            else:
                handle = getattr(module, register)(lambda m, args: tuple(a * 0 for a in args))
            with torch.no_grad():
                hooked = model(x)
            handle.remove()
            with torch.no_grad():
                plain = model(x)
            assert not torch.equal(hooked, plain), f"{register} on {type(module).__name__}"
            assert_close(plain, _oracle(model, x), 1e-10, "after the hook is removed")
    model.towers.towers[0][0] = nn.Linear(4, 5).double()
    assert_close(_live(model, x), _oracle(model, x), 1e-10, "a replaced tower layer")
    model.towers.towers[0][0].forward = lambda h: torch.zeros(h.shape[0], 5, dtype=h.dtype)
    with torch.no_grad():
        assert torch.equal(model(x)[:, 0], model.towers.towers[0][2].bias.expand(9))
    del model.towers.towers[0][0].forward
    model.mixture.gate_bias = None
    assert_close(_live(model, x), _oracle(model, x), 1e-10, "the gate bias removed")
    model.towers.towers[1][1] = nn.Tanh()
    with torch.no_grad():
        out = model(x)
    assert _live_of(model) is None or model.__dict__["_guard"] is None
    assert_close(out, _oracle(model, x), 1e-10, "a tanh tower, module by module")
    model.towers.towers[1][1] = nn.ReLU()
    model.mixture.activation = "gelu"
    assert_close(_live(model, x), _oracle(model, x), 1e-10, "an activation set later")
    model.mixture.backend = "reference"
    with torch.no_grad():
        out = model(x)
    assert _live_of(model) is None  # the reference backend is plain PyTorch
    assert_close(out, _oracle(model, x), 1e-10, "the reference backend")


def test_the_live_forward_takes_any_input_the_layers_take_and_refuses_the_rest():
    torch.manual_seed(2)
    model = mf.MMoE(8, 3, num_experts=2, expert_hidden=5)
    base = torch.randn(8, 11)
    in_double = copy.deepcopy(model).double()
    for x in (base.t(), torch._neg_view(-base.t().contiguous()), base.t().contiguous().requires_grad_(),
              base.t().contiguous()[::2]):
        out = _live(model, x)
        assert_close(out.double(), _oracle(in_double, x.detach().double()), 1e-5, "an awkward x")
    with torch.no_grad():
        assert model(torch.randn(0, 8)).shape == (0, 3)
        with pytest.raises(ValueError, match="gate_weight|expert_weight"):
            model(torch.randn(4, 7))
        with pytest.raises(TypeError, match="dtype"):
            model(torch.randn(4, 8, dtype=torch.float64))


def _guarded_model(seed):
    """An MMoE after one no-grad forward, its input and the guard that forward made."""
    torch.manual_seed(seed)
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4)
    x = torch.randn(5, 6)
    with torch.no_grad():
        model(x)
    return model, x, model.__dict__["_guard"]


def test_the_guard_in_cpp_and_in_python_agree_on_every_change():
    model, x, guard = _guarded_model(3)

    def both():
        in_cpp = cpp_backend._C.modules_unchanged(guard.modules, guard.types, guard.children, guard.slots,
                                                    guard.forwards, guard.counts)
        assert in_cpp == guard._modules_unchanged()
        return in_cpp

    assert both()
    lin = model.towers.towers[0][0]
    for name in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                 "register_full_backward_pre_hook"):
        handle = getattr(lin, name)(lambda *a: None)
        assert not both(), name
        handle.remove()
        assert both()
    lin.forward = lambda h: h
    assert not both()
    del lin.forward
    lin.__class__ = type("Linear2", (nn.Linear,), {})
    assert not both()
    lin.__class__ = nn.Linear
    assert both()
    old = model.towers.towers[0][1]
    model.towers.towers[0][1] = nn.ReLU()
    assert not both()
    model.towers.towers[0][1] = old
    assert both()
    weight = lin.weight
    lin.weight = nn.Parameter(weight.detach().clone())
    assert not both()
    lin.weight = weight
    assert both()
    lin.register_parameter("extra", nn.Parameter(torch.zeros(1)))  # a parameter more
    assert not both()
    del lin.extra
    assert both()
    original = nn.Linear.forward
    nn.Linear.forward = lambda self, h: original(self, h)  # the class's forward patched
    try:
        assert not both()
    finally:
        nn.Linear.forward = original
    assert both()
    del lin.bias
    assert not both()


def test_an_expert_layer_appended_after_a_first_call_is_used():
    """A guard counts each module's parameters: a third layer appended to the experts' ParameterLists after a
    first call (with and without grad) runs, as in a fresh copy of the model."""
    torch.manual_seed(4)
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=(5, 4), tower_hidden=(3,)).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    _live(model, x)
    model(x)
    layer = model.mixture
    layer.expert_weights.append(nn.Parameter(torch.randn(3, 4, 4, dtype=torch.float64) * 0.5))
    layer.expert_biases.append(nn.Parameter(torch.randn(3, 4, dtype=torch.float64)))
    fresh = copy.deepcopy(model)  # no cached plan or call
    with torch.no_grad():
        expected = fresh(x)
        assert torch.equal(model(x), expected)
    assert_close(model(x).detach(), expected, 1e-12, "the grad path after the append")


def test_the_no_grad_forward_answers_on_the_inputs_device_whatever_the_default_device():
    torch.manual_seed(5)
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4)
    x = torch.randn(3, 6)
    expected = _live(model, x)
    for default in ("meta", "cpu"):
        with torch.no_grad(), torch.device(default):
            out = model(x)
        assert out.device.type == "cpu" and torch.equal(out, expected), default


@pytest.mark.parametrize("python_check", [False, True], ids=["torch-tensor-guards", "python"])
def test_the_guard_sees_every_change_to_a_parameters_metadata(python_check, monkeypatch):
    if python_check:
        monkeypatch.setattr(common, "_TensorGuards", None)
    model, x, guard = _guarded_model(4)
    assert guard.holds(x)
    w = model.mixture.gate_weight
    plain = w.data
    for changed in (plain.double(), plain.transpose(1, 2).contiguous().transpose(1, 2), torch._neg_view(-plain),
                    plain[:, :5]):
        w.data = changed
        assert not guard.holds(x.to(changed.dtype)), "a changed parameter"
        w.data = plain
        assert guard.holds(x)
    w.requires_grad_(False)
    assert not guard.holds(x)
    w.requires_grad_(True)
    with torch.inference_mode():
        assert guard.holds(x)


def _modules_forward(model, x):
    with torch.no_grad():
        return model.towers(model.bottom(x))


@pytest.mark.parametrize("B,D,T,bottom,towers", [(1, 5, 1, (3,), ()), (1, 100, 2, 113, (8,)), (7, 10, 3, (6, 4), (5,)),
                                                  (65, 37, 2, (40,), (33, 3)), (9, 6, 2, (), (4,))])
def test_a_shared_bottoms_live_forward_equals_its_modules_and_a_session(B, D, T, bottom, towers):
    torch.manual_seed(B + D + T)
    for dtype in (torch.float64, torch.float32):
        model = mf.SharedBottom(D, T, bottom_hidden=bottom, tower_hidden=towers).to(dtype).eval()
        x = torch.randn(B, D, dtype=dtype)
        out = _live(model, x)
        want = torch.cat([tower(model.bottom(x)) for tower in model.towers.towers], dim=1).detach()
        assert_close(out, want, 1e-10 if dtype == torch.float64 else 1e-4, "shared-bottom live forward")
        if bottom:  # a session needs a bottom layer
            assert torch.equal(out, mf.InferenceSession(model).run(x))


def test_a_shared_bottoms_live_forward_sees_every_change():
    torch.manual_seed(5)
    model = mf.SharedBottom(6, 2, bottom_hidden=(5, 4), tower_hidden=(3,)).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    _live(model, x)
    lin = model.bottom[2]
    handle = lin.register_forward_hook(lambda m, i, o: o * 0)
    with torch.no_grad():
        hooked = model(x)
    assert torch.equal(hooked, _modules_forward(model, x))  # the hook ran
    handle.remove()
    assert not torch.equal(hooked, _live(model, x))
    with torch.no_grad():
        lin.weight.mul_(3)
    assert_close(_live(model, x), _modules_forward(model, x), 1e-12, "in place")
    model.bottom[2] = nn.Linear(5, 4, bias=False).double()
    assert_close(_live(model, x), _modules_forward(model, x), 1e-12, "a Linear without bias")
    model.bottom[1] = nn.Tanh()
    with torch.no_grad():
        out = model(x)
    assert model.__dict__["_guard"] is None  # not Linear/ReLU pairs: the modules run
    assert_close(out, _modules_forward(model, x), 1e-12, "tanh in the bottom")
    model.bottom[1] = nn.ReLU()
    model.towers.backend = "reference"
    with torch.no_grad():
        out = model(x)
    assert _live_of(model) is None
    assert_close(out, _modules_forward(model, x), 1e-12, "reference towers")
    with torch.no_grad(), pytest.raises(RuntimeError):
        model(torch.randn(3, 7, dtype=torch.float64))  # the Linear's own error


def test_hooks_on_the_model_itself_run_around_the_live_forward():
    """The model's own hooks are its __call__'s (a model on feature columns encodes its input in a pre-hook):
    the whole-model paths still run under them, and the hooks' effects are kept."""
    torch.manual_seed(6)
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    want = _live(model, x)
    model.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model.register_forward_hook(lambda m, args, out: out + 1)
    with torch.no_grad():
        out = model(x)
    assert _live_of(model) is not None
    assert_close(out, _oracle(model, 2 * x) + 1, 1e-10, "hooked model")
    assert not torch.equal(out, want)
    out = model(x)  # with autograd: one node under the model's own hooks
    assert type(out.grad_fn).__name__ == "AddBackward0"
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "_MMoEModelBackward"


def test_a_model_on_feature_columns_runs_its_forward_live():
    from mmoe_fast import features

    torch.manual_seed(7)
    columns = [features.Categorical("user", 10, 4), features.Dense("price", 1)]
    model = mf.MMoE(columns, 2, num_experts=3, expert_hidden=5).eval()
    batch = {"user": torch.randint(0, 10, (8,)), "price": torch.randn(8, 1)}
    with torch.no_grad():
        out = model(batch)
    assert _live_of(model) is not None
    assert_close(out, mf.InferenceSession(model).run(batch), 1e-6, "a model on feature columns")


def test_the_environment_is_read_as_os_environ_reads_it(monkeypatch):
    from mmoe_fast import backends

    for value in ("reference", "", "cpp"):
        monkeypatch.setenv(backends.ENV_VAR, value)
        assert backends.env_backend() == os.environ.get(backends.ENV_VAR) == value
    monkeypatch.delenv(backends.ENV_VAR)
    assert backends.env_backend() is None


def test_the_backend_chosen_by_the_environment_is_read_at_every_call(monkeypatch):
    torch.manual_seed(8)
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    _live(model, x)
    monkeypatch.setenv("MMOE_FAST_BACKEND", "reference")
    with torch.no_grad():
        out = model(x)
    assert _live_of(model) is None  # "auto" now means the reference backend
    assert_close(out, _oracle(model, x), 1e-10, "the reference backend by the environment")
    monkeypatch.delenv("MMOE_FAST_BACKEND")
    _live(model, x)
