"""The eager fast paths that stand in for several modules: the towers in one C++ call, a whole MMoE/OMoE as one
autograd node, and the guards that make them step aside when anything they read has changed."""

import copy

import pytest
import torch
from torch import nn

import mmoe_fast as mf
from mmoe_fast import reference
from mmoe_fast.backends import cpp as cpp_backend
from mmoe_fast.models import common
from mmoe_fast.testing import assert_close

needs_cpp = pytest.mark.skipif(cpp_backend.unavailable_reason() is not None, reason="mmoe_fast._C is not built")


def _towers_by_module(towers, h):
    return torch.cat([tower(h if h.dim() == 2 else h[t]) for t, tower in enumerate(towers.towers)], dim=1)


def _grads(out, params, g):
    return torch.autograd.grad(out, params, g, retain_graph=True)


def _same(out, ref, params, what, tol=1e-12):
    assert_close(out, ref, tol, f"{what} forward")
    g = torch.randn_like(ref)
    for got, want in zip(_grads(out, params, g), _grads(ref, params, g)):
        assert_close(got, want, tol, f"{what} gradient")


@needs_cpp
@pytest.mark.parametrize("path", ["cpp", "batched"])
@pytest.mark.parametrize("input_grad", [True, False], ids=["h-grad", "no-h-grad"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-task", "shared"])
@pytest.mark.parametrize("T,K,hidden,B", [(1, 1, (), 1), (1, 5, (3,), 1), (2, 16, (8,), 7), (3, 9, (4, 6), 33),
                                          (5, 33, (8,), 130), (2, 17, (5, 3, 2), 65)])
def test_towers_on_each_path_equal_the_modules_in_float64(T, K, hidden, B, shared, input_grad, path, monkeypatch):
    monkeypatch.setattr(common, "CPP_TOWERS_MAX_MACS", 1 << 40 if path == "cpp" else 0)
    torch.manual_seed(T * 100 + K + B)
    towers = common.Towers(T, K, hidden).double()
    h = torch.randn(*((B, K) if shared else (T, B, K)), dtype=torch.float64, requires_grad=input_grad)
    out, ref = towers(h), _towers_by_module(towers, h)
    assert type(out.grad_fn).__name__ == "_StackedTowersBackward" and out.grad_fn.in_cpp == (path == "cpp")
    params = [*towers.parameters(), *([h] if input_grad else [])]
    _same(out, ref, params, f"towers ({path})")


@needs_cpp
def test_towers_in_cpp_give_the_same_bits_on_one_thread_and_two(monkeypatch):
    monkeypatch.setattr(common, "CPP_TOWERS_MAX_MACS", 1 << 40)
    torch.manual_seed(0)
    towers = common.Towers(2, 64, (8,))
    h = torch.randn(2, 4096, 64, requires_grad=True)  # 4.3M multiply-adds: over the one-thread limit
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = towers(h)
            results.append([out, *torch.autograd.grad(out, [h, *towers.parameters()], torch.ones_like(out))])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _mmoe_layers(model, x):
    """The model's layers one by one (what the one-node path stands in for)."""
    return model.towers(model.mixture(x))


@pytest.mark.parametrize("cls", [mf.MMoE, mf.OMoE])
@pytest.mark.parametrize("x_grad", [False, True], ids=["x-data", "x-grad"])
@pytest.mark.parametrize("B,D,T,E,H,towers", [(1, 5, 1, 1, 3, ()), (1, 7, 2, 3, 4, (5,)), (7, 10, 2, 3, 5, (4,)),
                                              (33, 9, 3, 5, 7, (6, 3)), (130, 100, 2, 8, 16, (8,)),
                                              (1, 6, 2, 1, (5, 3), (4,)), (9, 7, 3, 4, (6, 5, 3), (2,)),
                                              (70, 20, 2, 3, (33, 17), ())])
def test_a_whole_mmoe_trains_as_one_node_equal_to_its_layers_and_the_oracle(cls, B, D, T, E, H, towers, x_grad):
    torch.manual_seed(B + D + T)
    model = cls(D, T, num_experts=E, expert_hidden=H, tower_hidden=towers).double()
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=x_grad)
    out = model(x)
    assert type(out.grad_fn).__name__ == "_MMoEModelBackward"
    params = [*model.parameters(), *([x] if x_grad else [])]
    ref = _mmoe_layers(model, x)
    assert type(ref.grad_fn).__name__ != "_MMoEModelBackward"
    _same(out, ref, params, "one node")
    layer = model.mixture
    m = reference.mmoe_layer(x, list(layer.expert_weights), list(layer.expert_biases), layer.gate_weight,
                             layer.gate_bias, layer.activation).expand(T, -1, -1)
    _same(out, _towers_by_module(model.towers, m), params, "one node against the oracle", tol=1e-10)


def test_the_one_node_is_float32_exact_to_the_layers():
    torch.manual_seed(0)
    model = mf.MMoE(100, 2, num_experts=8, expert_hidden=16)
    x = torch.randn(128, 100)
    out, ref = model(x), _mmoe_layers(model, x)
    g = torch.randn_like(out)
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(_grads(out, list(model.parameters()), g),
                                                 _grads(ref, list(model.parameters()), g)))


def test_the_one_node_keeps_the_fused_ops_no_second_derivative_rule():
    torch.manual_seed(0)
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    params = list(model.parameters())
    first = torch.autograd.grad(model(x).square().sum(), params, create_graph=True)
    want = torch.autograd.grad(_mmoe_layers(model, x).square().sum(), params, create_graph=True)
    for a, b in zip(first, want):
        assert_close(a, b, 1e-12, "first derivative under create_graph")
    with pytest.raises(RuntimeError, match="second derivatives of mmoe_fast::mmoe"):
        torch.autograd.grad(sum(g.sum() for g in first), params)


def _outputs_and_grads(model, x):
    out = model(x)
    return [out, *torch.autograd.grad(out.sum(), list(model.parameters()))]


def test_the_fast_paths_see_every_change_made_after_a_first_call():
    """Hooks, replaced modules or parameters, a new dtype: each change after the first forward is honoured."""
    torch.manual_seed(0)
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4, tower_hidden=(5,)).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    assert type(model(x).grad_fn).__name__ == "_MMoEModelBackward"

    seen = []
    handle = model.towers.towers[1][0].register_forward_hook(lambda m, i, o: seen.append(1) or o * 2)
    out = model(x)
    assert seen and type(out.grad_fn).__name__ != "_MMoEModelBackward"
    handle.remove()
    assert type(model(x).grad_fn).__name__ == "_MMoEModelBackward"

    handle = model.mixture.register_forward_pre_hook(lambda m, args: (args[0] * 0,))
    assert_close(model(x), model.towers(model.mixture(torch.zeros_like(x))), 1e-12, "a pre-hook on the layer")
    handle.remove()

    model.towers.towers[0][0] = nn.Linear(4, 5).double()  # a new layer: its weights, not the cached ones
    got = _outputs_and_grads(model, x)
    ref = _mmoe_layers(model, x)
    want = [ref, *torch.autograd.grad(ref.sum(), list(model.parameters()))]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-12, "replaced tower layer")
    model.mixture.gate_weight = nn.Parameter(torch.randn(2, 6, 3, dtype=torch.float64))
    assert_close(model(x), _mmoe_layers(model, x), 1e-12, "replaced gate weight")
    model.mixture.expert_weights[0] = nn.Parameter(torch.randn(3, 6, 4, dtype=torch.float64))
    out = model(x)
    assert type(out.grad_fn).__name__ == "_MMoEModelBackward"
    assert_close(out, _mmoe_layers(model, x), 1e-12, "replaced expert weight")
    model.towers.towers[1][1] = nn.Tanh()  # no longer Linear/ReLU: module by module
    out = model(x)
    assert type(out.grad_fn).__name__ != "_MMoEModelBackward"
    assert_close(out, _towers_by_module(model.towers, model.mixture(x)), 1e-12, "tanh tower")
    model.towers.towers[1][1] = nn.ReLU()

    model.float()  # the same parameters, now float32: the dtype is checked at every call
    xf = x.float()
    out = model(xf)
    assert out.dtype == torch.float32 and type(out.grad_fn).__name__ == "_MMoEModelBackward"
    assert_close(out, _mmoe_layers(model, xf), 1e-6, "after .float()")
    with pytest.raises(TypeError, match="dtype"):
        model(x)  # float64 data into a float32 model: the same error as the layers give


def test_the_one_node_steps_aside_where_it_cannot_stand_in():
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4)
    assert model._one_node(x) is not None
    model.requires_grad_(False)
    assert model._one_node(x) is None  # nothing to differentiate: the layers run (and record no graph)
    assert model(x).grad_fn is None
    assert type(model(x.requires_grad_()).grad_fn).__name__ == "_MMoEModelBackward"
    with pytest.raises(ValueError, match="gate_weight|expert_weight"):
        model(torch.randn(4, 7))
    assert model(torch.randn(0, 6)).shape == (0, 2)


def _fit_both_ways(monkeypatch, make, x, y, one_call=True, **kw):
    """fit without autograd (``one_call``: the whole step in one C++ call where it applies, else the layers'
    kernels with the loss formed between) and with it; each run's model, history and the paths its steps took."""
    from mmoe_fast import train

    results = []
    for fused in (True, False):
        monkeypatch.setattr(train, "FUSED_STEP", fused)
        model = make()
        calls = []
        cls = type(model)

        def counted_step(self, *args, original=cls.fused_training_step, calls=calls):
            got = original(self, *args) if one_call else None
            if got is not None:
                calls.append("one call")
            return got

        def counted_forward(self, xb, original=cls.fused_training_forward, calls=calls):
            got = original(self, xb)
            calls.append("autograd" if got is None else "layers")
            return got

        monkeypatch.setattr(cls, "fused_training_step", counted_step)
        monkeypatch.setattr(cls, "fused_training_forward", counted_forward)
        history = train.fit(model, x, y, epochs=3, batch_size=16, progress=False, log=lambda s: None, **kw)
        results.append((model, history, calls))
    return results


@pytest.mark.parametrize("path", ["one call", "layers"])
@pytest.mark.parametrize("cls", [mf.MMoE, mf.OMoE])
@pytest.mark.parametrize("options", ["plain", "masked", "weighted", "clipped", "torch-loss"])
def test_fit_without_autograd_trains_as_with_it(cls, options, path, monkeypatch):
    """fit's autograd-free step (the whole step in one C++ call, or fused_training_forward and the loss gradient
    formed directly) gives the autograd step's losses and weights within float32 rounding, binary and regression
    tasks, masks and weights included. Two-layer experts ("plain") always take the layers' path."""
    # torch's loss formulas run on the layers' path only (the one call forms its loss in C++)
    one_call = (path == "one call" and options not in ("plain", "torch-loss")
                and cpp_backend.unavailable_reason() is None)
    if path == "one call" and options == "torch-loss":
        pytest.skip("the one call forms its loss in C++")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 6, generator=g)
    y = torch.stack([(x[:, 0] > 0).float(), x[:, 1] - x[:, 2]], dim=1)
    kw = {}
    if options == "masked":
        kw["label_mask"] = torch.rand(70, 2, generator=g) > 0.3
        y = torch.where(kw["label_mask"], y, torch.nan)
    elif options == "weighted":
        kw["sample_weight"] = torch.rand(70, 2, generator=g) * 2
    elif options == "clipped":
        kw["clip_grad_norm"] = 0.05
    elif options == "torch-loss":  # the loss and its gradient by torch ops, as off the CPU; with a mask
        from mmoe_fast import train

        monkeypatch.setattr(train.cpp_backend, "unavailable_reason", lambda: "pretend")
        kw["label_mask"] = torch.rand(70, 2, generator=g) > 0.3
        y = torch.where(kw["label_mask"], y, torch.nan)

    def make():
        torch.manual_seed(1)
        return cls(6, 2, num_experts=3, expert_hidden=(5, 4) if options == "plain" else 5, tower_hidden=(4,),
                   task_types=("binary", "regression"))

    (fast, fast_history, fast_calls), (slow, slow_history, slow_calls) = _fit_both_ways(
        monkeypatch, make, x, y, one_call=path == "one call", **kw)
    # each run took the path it was told to
    assert fast_calls and set(fast_calls) == {"one call" if one_call else "layers"} and not slow_calls
    for a, b in zip(fast_history, slow_history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        assert_close(p, q, 1e-4, name)


def _step_by_autograd(model, x, y, coef, weight):
    """The per-task loss sums and each parameter's gradient (by name) of ``sum_t coef[t] sum_b weight *
    loss_t``, by autograd through a copy of ``model`` on the plain-PyTorch reference backend, layer by layer."""
    from mmoe_fast.train import task_losses

    ref = copy.deepcopy(model)
    ref.mixture.backend = ref.towers.backend = "reference"
    out = ref.towers(ref.mixture(x))
    each = task_losses(out, y, ref.task_types, reduction="none", mask=None if weight is None else weight > 0)
    sums = (each if weight is None else each * weight).sum(0)
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad((coef * sums).sum(), [p for _, p in named])
    return sums.detach(), {n: g for (n, _), g in zip(named, grads)}


@needs_cpp
@pytest.mark.parametrize("cls", [mf.MMoE, mf.OMoE])
@pytest.mark.parametrize("D,E,H,types,B,towers,gate_bias,activation", [
    (1, 1, 1, ("binary",), 1, (), True, "relu"),
    (7, 3, 5, ("binary", "regression", "binary"), 37, (4, 2), False, "gelu"),
    (100, 8, 16, ("binary", "binary"), 128, (8,), True, "relu"),
    (13, 2, 33, ("regression", "binary"), 17, (9,), True, "silu"),
])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_the_whole_step_in_one_call_equals_autograd_in_float64(cls, D, E, H, types, B, towers, gate_bias, activation,
                                                              weighted):
    """``fused_training_step`` (one C++ call: forward, loss, backward) against autograd through the layers: the
    loss sums and every gradient at float64 precision, at B=1, E=1, T=1, odd widths, no gate bias, deeper and no
    hidden towers, label weights with skipped rows (whose NaN targets are never read), and again with new
    values in the same buffers."""
    torch.manual_seed(B + E)
    T = len(types)
    model = cls(D, T, num_experts=E, expert_hidden=H, tower_hidden=towers, task_types=types, gate_bias=gate_bias,
                activation=activation).double()
    for step in range(2):
        x = torch.randn(B, D, dtype=torch.float64)
        y = torch.stack([(torch.rand(B) > 0.5).double() if t == "binary" else torch.randn(B, dtype=torch.float64)
                         for t in types], dim=1)
        coef = torch.rand(T, dtype=torch.float64)
        weight = None
        if weighted:
            weight = torch.rand(B, T, dtype=torch.float64) * (torch.rand(B, T) > 0.3)
            y = torch.where(weight > 0, y, torch.nan)
        got = model.fused_training_step(x, y, coef, weight)
        assert got is not None, "the one-call step did not apply"
        sums, grads = got
        want_sums, want = _step_by_autograd(model, x, y, coef, weight)
        assert_close(torch.tensor(sums, dtype=torch.float64), want_sums, 1e-12, f"loss sums, step {step}")
        names = {id(p): n for n, p in model.named_parameters()}
        assert sorted(names[id(p)] for p, _ in grads) == sorted(want)
        for p, g in grads:
            assert_close(g, want[names[id(p)]], 1e-12, f"{names[id(p)]}, step {step}")
        with torch.no_grad():  # the next step runs on other weights: the kernels read them in place
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)


@needs_cpp
@pytest.mark.parametrize("cls", [mf.MMoE, mf.OMoE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_whole_step_in_one_call_has_the_bits_of_the_layers_path_on_the_own_kernels(cls, dtype, monkeypatch):
    """Where the layers' path runs the own kernels too (``MMOE_FAST_CPU_GEMM=own``, C++ towers) the one call
    gives its loss sums and gradients bit for bit: the same kernels in the same order."""
    from mmoe_fast.train import _fused_backward

    monkeypatch.setenv("MMOE_FAST_CPU_GEMM", "own")
    monkeypatch.setattr(common, "CPP_TOWERS_MAX_MACS", 1 << 40)
    torch.manual_seed(3)
    types = ("binary", "regression", "binary")
    model = cls(13, 3, num_experts=4, expert_hidden=17, tower_hidden=(9, 2), task_types=types).to(dtype)
    for B, weighted in ((1, False), (37, True), (300, False)):
        x = torch.randn(B, 13, dtype=dtype)
        y = torch.stack([(torch.rand(B) > 0.5).to(dtype) if t == "binary" else torch.randn(B, dtype=dtype)
                         for t in types], dim=1)
        weight = torch.rand(B, 3, dtype=dtype) * (torch.rand(B, 3) > 0.3) if weighted else None
        coef = torch.rand(3, dtype=dtype)
        sums, grads = model.fused_training_step(x, y, coef, weight)
        grads = {id(p): g.clone() for p, g in grads}
        layer_sums, layer_grads = _fused_backward(model.fused_training_forward(x), model, y, weight, coef)
        assert sums == layer_sums, B
        assert len(layer_grads) == len(grads)
        for p, g in layer_grads:
            assert torch.equal(grads[id(p)], g), B


_TWO_THREADS = """
import threading, torch, mmoe_fast as mf
torch.manual_seed(0)
model = mf.MMoE(6, 2, num_experts=3, expert_hidden=5)
x, y, coef = torch.randn(64, 6), (torch.rand(64, 2) > 0.5).float(), torch.ones(2)
want = model.fused_training_step(x, y, coef, None)[0]
got = []
def work():
    for _ in range(200):
        got.append(model.fused_training_step(x, y, coef, None)[0])
threads = [threading.Thread(target=work) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert len(got) == 400 and all(s == want for s in got)
print("ok")
"""


@needs_cpp
def test_two_threads_stepping_one_model_take_turns():
    """The one call's buffers are the model's: concurrent calls take turns, and neither deadlocks (a lock taken
    before the GIL is let go did: the waiting thread held the GIL the other needed back). In a child process,
    so that a deadlock fails the test instead of hanging the run."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TWO_THREADS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@needs_cpp
def test_the_whole_step_in_one_call_reads_views_and_leaves_frozen_parameters_alone():
    """A transposed or negative-bit x is read by value; a parameter that needs no gradient gets none; the
    buffers handed back are the same at every step (written in place)."""
    torch.manual_seed(0)
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=5).double()
    model.mixture.gate_weight.requires_grad_(False)
    x = torch.randn(6, 9, dtype=torch.float64).t()
    y, coef = (torch.rand(9, 2) > 0.5).double(), torch.ones(2, dtype=torch.float64)
    sums, grads = model.fused_training_step(x, y, coef, None)
    assert all(p is not model.mixture.gate_weight for p, _ in grads)
    want_sums, want = _step_by_autograd(model, x, y, coef, None)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p, _ in grads) == sorted(want)
    for p, g in grads:
        assert_close(g, want[names[id(p)]], 1e-12, "a transposed x")
    again = model.fused_training_step(torch._neg_view(-x.contiguous()), y, coef, None)
    assert again[0] == sums
    for (p, a), (q, b) in zip(again[1], grads):
        assert p is q and a is b  # the same buffers, written again
        assert_close(a, want[names[id(p)]], 1e-12, "a negative-bit x")


@needs_cpp
def test_the_whole_step_in_one_call_steps_aside_or_refuses_bad_labels(monkeypatch):
    """It applies only where it runs the same function (one expert layer, the C++ backend, small enough, no
    hooks, x needing no gradient), and refuses labels, coefficients or weights of the wrong shape."""
    torch.manual_seed(0)
    x, y, coef = torch.randn(5, 6), torch.zeros(5, 2), torch.ones(2)
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4)
    assert model.fused_training_step(x, y, coef, None) is not None
    for bad, what in ((torch.zeros(4, 2), "y"), (torch.zeros(5, 3), "y")):
        with pytest.raises(ValueError, match=f"{what} must be a tensor of shape \\(5, 2\\)"):
            model.fused_training_step(x, bad, coef, None)
    with pytest.raises(ValueError, match="coef must be a tensor of shape \\(2,\\)"):
        model.fused_training_step(x, y, torch.ones(3), None)
    with pytest.raises(ValueError, match="weight must be"):
        model.fused_training_step(x, y, coef, torch.ones(5))
    with pytest.raises(ValueError, match="y must be a tensor.*got NoneType"):
        model.fused_training_step(x, None, coef, None)
    with pytest.raises(TypeError, match="dtype"):  # the layers' own error
        model.double().fused_training_step(x, y, coef, None)
    model.float()
    assert mf.MMoE(6, 2, num_experts=3, expert_hidden=(4, 4)).fused_training_step(x, y, coef, None) is None
    assert model.fused_training_step(x.requires_grad_(), y, coef, None) is None
    x = x.detach()
    monkeypatch.setenv("MMOE_FAST_CPU_GEMM", "blas")
    monkeypatch.setattr(cpp_backend, "BLAS_MIN_MACS", 1)
    assert model.fused_training_step(x, y, coef, None) is None  # the GEMMs asked of torch's BLAS
    monkeypatch.setenv("MMOE_FAST_CPU_GEMM", "own")
    monkeypatch.setattr(common, "STEP_TOWERS_MAX_MACS", 1)
    assert model.fused_training_step(x, y, coef, None) is None  # towers too large for the one call
    monkeypatch.setattr(common, "STEP_TOWERS_MAX_MACS", 1 << 40)
    assert model.fused_training_step(x, y, coef, None) is not None
    model.mixture.backend = "reference"
    assert model.fused_training_step(x, y, coef, None) is None
    model.mixture.backend = "auto"
    model.register_forward_hook(lambda *a: None)
    assert model.fused_training_step(x, y, coef, None) is None


def test_fit_keeps_autograd_for_a_subclass_forward_and_for_hooks(monkeypatch):
    from mmoe_fast import train

    class Doubled(mf.MMoE):
        def forward(self, x):
            return super().forward(2 * x)

    x, y = torch.randn(40, 6), (torch.rand(40, 2) > 0.5).float()
    model = Doubled(6, 2, num_experts=3, expert_hidden=4)
    assert model.fused_training_forward(x) is None
    plain = mf.MMoE(6, 2, num_experts=3, expert_hidden=4)
    assert plain.fused_training_forward(x) is not None
    seen = []
    plain.register_forward_hook(lambda m, i, o: seen.append(1))
    assert plain.fused_training_forward(x) is None
    train.fit(plain, x, y, epochs=1, batch_size=20, progress=False, log=lambda s: None)
    assert len(seen) == 2  # the hook ran at both steps


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("B,types", [(1, ("binary",)), (37, ("binary", "regression")), (5, ("regression",) * 3)])
def test_the_loss_and_its_gradient_formed_directly_equal_autograd_in_float64(B, types, weighted):
    from mmoe_fast.train import _loss_grad, task_losses

    g = torch.Generator().manual_seed(B)
    T = len(types)
    out = torch.randn(B, T, generator=g, dtype=torch.float64) * 20  # large logits too: BCE must stay exact
    y = torch.stack([(torch.rand(B, generator=g) > 0.5).double() if t == "binary"
                     else torch.randn(B, generator=g, dtype=torch.float64) for t in types], dim=1)
    coef = torch.rand(T, generator=g, dtype=torch.float64)
    wb = None
    if weighted:
        wb = torch.rand(B, T, generator=g, dtype=torch.float64) * (torch.rand(B, T, generator=g) > 0.3)
        y = torch.where(wb > 0, y, torch.nan)  # a skipped row's target is never read
    z = out.clone().requires_grad_()
    each = task_losses(z, y, types, reduction="none", mask=None if wb is None else wb > 0)
    sums = (each if wb is None else each * wb).sum(0)
    (coef * sums).sum().backward()
    assert torch.isfinite(z.grad).all()
    direct = _loss_grad(out, y, types, coef, wb)
    assert_close(direct, z.grad, 1e-12, "torch formula")
    if cpp_backend.unavailable_reason() is None:
        got_sums, got = cpp_backend.loss_grad(out, y, [t == "binary" for t in types], coef, wb)
        assert_close(got, z.grad, 1e-12, "C++ gradient")
        assert_close(torch.tensor(got_sums, dtype=torch.float64), sums.detach(), 1e-12, "C++ loss sums")


@needs_cpp
def test_the_cpp_paths_read_negative_bit_views_by_value(monkeypatch):
    """Kernels read memory: a negative-bit view (its memory holds minus its values) must not reach them as is."""
    monkeypatch.setattr(common, "CPP_TOWERS_MAX_MACS", 1 << 40)
    torch.manual_seed(0)
    towers = common.Towers(2, 5, (4,)).double()
    h = torch._neg_view(-torch.randn(2, 6, 5, dtype=torch.float64)).requires_grad_()
    out = towers(h)
    assert out.grad_fn.in_cpp  # a negative-bit input reaches the C++ path, resolved
    _same(out, _towers_by_module(towers, h), [h, *towers.parameters()], "a negative-bit input")
    lin = towers.towers[0][0]
    lin.weight = nn.Parameter(torch._neg_view(-lin.weight.detach()))
    out = towers(h)
    assert not out.grad_fn.in_cpp  # a negative-bit weight is read by torch's GEMMs instead
    _same(out, _towers_by_module(towers, h), [h, *towers.parameters()], "a negative-bit weight")
    out, y = torch.randn(4, 2, dtype=torch.float64), torch.rand(4, 2, dtype=torch.float64)
    coef = torch.ones(2, dtype=torch.float64)
    plain = cpp_backend.loss_grad(out, y, [False, False], coef, None)
    viewed = cpp_backend.loss_grad(torch._neg_view(-out), torch._neg_view(-y), [False, False], coef, None)
    assert plain[0] == viewed[0] and torch.equal(plain[1], viewed[1])


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fits_adam_updates_bit_for_bit_as_torchs_fused_adam(name):
    """The lean step (torch's fused kernel on kept state) against torch's own step: a skipped parameter (no
    gradient), a state reloaded from a copy, a new learning rate, and two groups."""
    from mmoe_fast.train import OPTIMIZERS

    torch.manual_seed(0)
    ours_params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True),
                   torch.randn(2, requires_grad=True)]
    torch_params = [p.detach().clone().requires_grad_() for p in ours_params]

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}]

    reference_cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    ours = OPTIMIZERS[name](groups(ours_params), lr=1e-2, weight_decay=0.1, fused=True)
    theirs = reference_cls(groups(torch_params), lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(7):
        for p, q in zip(ours_params, torch_params):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        if step == 3:
            ours_params[1].grad = torch_params[1].grad = None
        if step == 5:
            ours.load_state_dict(copy.deepcopy(ours.state_dict()))
            for opt in (ours, theirs):
                opt.param_groups[0]["lr"] = 3e-3
        ours.step()
        theirs.step()
        assert all(torch.equal(p, q) for p, q in zip(ours_params, torch_params)), f"step {step}"
    assert all(entry is not None for entry in ours.__dict__["_lean"])  # the lean step ran for both groups
    assert [float(ours.state[p]["step"]) for p in ours_params] == [7.0, 6.0, 7.0]


@needs_cpp
@pytest.mark.parametrize("forward_gemm,backward_gemm", [("blas", "own"), ("own", "blas")])
def test_a_gemm_setting_changed_between_forward_and_backward_still_gives_the_gradients(
        forward_gemm, backward_gemm, monkeypatch):
    """The saved pre-activations' layout (torch's one GEMM writes them row-major) decides the backward's path."""
    monkeypatch.setattr(cpp_backend, "BLAS_MIN_MACS", 0)
    torch.manual_seed(0)
    x = torch.randn(11, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    wg = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    bg = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    monkeypatch.setenv("MMOE_FAST_CPU_GEMM", forward_gemm)
    out = mf.mmoe(x, w, b, wg, bg, backend="cpp")
    monkeypatch.setenv("MMOE_FAST_CPU_GEMM", backward_gemm)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, w, b, wg, bg], g)
    ref = reference.mmoe_layer(x, [w], [b], wg, bg, "relu").expand(2, -1, -1)
    want = torch.autograd.grad(ref, [x, w, b, wg, bg], g)
    for a, c in zip(got, want):
        assert_close(a, c, 1e-10, f"{forward_gemm} forward, {backward_gemm} backward")


@needs_cpp
@pytest.mark.parametrize("x_grad", [False, True], ids=["x-data", "x-grad"])
@pytest.mark.parametrize("backward_gemm", ["blas", "own"])
@pytest.mark.parametrize("B,D,E,H", [(1, 5, 3, (6, 5, 3)), (9, 7, 1, (6, 5)), (13, 6, 4, (6, 5, 3)),
                                     (70, 20, 3, (33, 17)), (200, 9, 2, (40, 19))])
def test_hidden_expert_layers_kept_expert_major_give_the_oracles_gradients(B, D, E, H, backward_gemm, x_grad,
                                                                            monkeypatch):
    """Under torch's GEMMs the one-node path keeps a hidden expert layer's output expert-major ([E, B, N] in
    memory, a transposed view) for the next layer, and its input gradient likewise; whatever reads them (the
    batched GEMMs, the C++ passes, the own kernels after a switch of the GEMM setting) reads them in that layout."""
    monkeypatch.setattr(cpp_backend, "BLAS_MIN_MACS", 0)
    monkeypatch.setattr(cpp_backend, "SIDE_BY_SIDE_MAX_N", 0)  # every layer's pre expert-major
    seen = []
    blas_backward = cpp_backend._blas_backward

    def spy(a, *args, **kw):
        seen.append(cpp_backend.is_expert_major(a))
        return blas_backward(a, *args, **kw)

    monkeypatch.setattr(cpp_backend, "_blas_backward", spy)
    torch.manual_seed(B + D + E)
    model = mf.MMoE(D, 2, num_experts=E, expert_hidden=H, tower_hidden=(4,)).double()
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=x_grad)
    params = [*model.parameters(), *([x] if x_grad else [])]
    monkeypatch.setenv("MMOE_FAST_CPU_GEMM", "blas")
    out = model(x)
    assert type(out.grad_fn).__name__ == "_MMoEModelBackward"
    monkeypatch.setenv("MMOE_FAST_CPU_GEMM", backward_gemm)
    layer = model.mixture
    m = reference.mmoe_layer(x, list(layer.expert_weights), list(layer.expert_biases), layer.gate_weight,
                             layer.gate_bias, layer.activation).expand(2, -1, -1)
    _same(out, _towers_by_module(model.towers, m), params, "expert-major hidden layers against the oracle",
          tol=1e-10)
    if backward_gemm == "blas":
        assert any(seen) == (B > 1 and E > 1)  # B or E of 1: both layouts are the same memory


@needs_cpp
def test_an_expert_major_layer_output_feeds_the_own_kernels_of_a_smaller_next_layer(monkeypatch):
    """Only the first expert layer is large enough for torch's GEMMs: its expert-major output goes on to the own
    kernels of the layer after it, which read it row by row (a copy), forward and backward."""
    monkeypatch.setenv("MMOE_FAST_CPU_GEMM", "blas")
    torch.manual_seed(0)
    B = 50
    model = mf.MMoE(5, 2, num_experts=3, expert_hidden=(200, 2), tower_hidden=(4,)).double()
    monkeypatch.setattr(cpp_backend, "BLAS_MIN_MACS", B * 2000)  # layer 0: 50 x 3000 MACs; layer 1: 50 x 1200
    outputs = []
    blas_train = cpp_backend._blas_train
    monkeypatch.setattr(cpp_backend, "_blas_train", lambda *a, **k: outputs.append(blas_train(*a, **k)) or outputs[-1])
    x = torch.randn(B, 5, dtype=torch.float64)
    out = model(x)
    assert len(outputs) == 1 and cpp_backend.is_expert_major(outputs[0][0])  # layer 0 on BLAS, expert-major
    layer = model.mixture
    m = reference.mmoe_layer(x, list(layer.expert_weights), list(layer.expert_biases), layer.gate_weight,
                             layer.gate_bias, layer.activation).expand(2, -1, -1)
    _same(out, _towers_by_module(model.towers, m), list(model.parameters()), "BLAS layer then own kernels",
          tol=1e-10)


@needs_cpp
@pytest.mark.parametrize("gemm", ["blas", "own"])
@pytest.mark.parametrize("negative", [False, True], ids=["plain", "negative-bit"])
def test_the_layer_ops_take_expert_major_inputs_and_gradients(gemm, negative, monkeypatch):
    """A user's ``a[B, E, K]`` or incoming gradient laid out expert-major (a transposed [E, B, K] block; also as a
    negative-bit view) reaches the C++ backend's kernels by value on either GEMM setting."""
    monkeypatch.setenv("MMOE_FAST_CPU_GEMM", gemm)
    monkeypatch.setattr(cpp_backend, "BLAS_MIN_MACS", 0)
    torch.manual_seed(1)
    B, E, K, N, T = 9, 3, 6, 5, 2

    def expert_major(t):  # t[B, E, ...] as an expert-major view holding the same values
        block = t.detach().transpose(0, 1).contiguous()
        return (torch._neg_view(-block) if negative else block).transpose(0, 1)

    a = expert_major(torch.randn(B, E, K, dtype=torch.float64)).requires_grad_()
    assert cpp_backend.is_expert_major(a)
    w = torch.randn(E, K, N, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, N, dtype=torch.float64, requires_grad=True)
    g = torch.softmax(torch.randn(B, T, E, dtype=torch.float64), -1).requires_grad_()
    for op, args in ((mf.grouped_linear, (a, w, b)), (mf.expert_mixture, (a, w, b, g))):
        out, ref = op(*args, backend="cpp"), op(*args, backend="reference")
        assert_close(out, ref, 1e-12, f"{op.__name__} forward")
        grad = torch.randn_like(ref)
        grad = expert_major(grad) if op is mf.grouped_linear else grad
        for got, want in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, args, grad)):
            assert_close(got, want, 1e-12, f"{op.__name__} gradient, {gemm}")


@pytest.mark.parametrize("big", [False, True], ids=["small", "over-a-million"])
def test_the_weight_check_names_the_first_non_finite_tensor_and_nothing_else(big):
    from mmoe_fast.train import _non_finite

    n = (1 << 20) if big else 7
    tensors = [("a", torch.zeros(n)), ("b", torch.ones(3, dtype=torch.float64)), ("c", torch.zeros(2, 2))]
    assert _non_finite(tensors) is None
    tensors[2][1][1, 0] = float("inf")
    assert _non_finite(tensors) == "c"
    tensors[0][1][n - 1] = float("nan")
    assert _non_finite(tensors) == "a"
    huge = [("h", torch.full((4,), 1e308, dtype=torch.float64))]  # finite, but its sum overflows
    assert _non_finite(huge) is None
    tensors[1][1][2] = -float("inf")  # a float64 one before them: named first whichever pass finds it
    assert _non_finite(tensors) == "a"
    tensors[0][1][n - 1] = 0
    assert _non_finite(tensors) == "b"
    strided = [("t", torch.zeros(4, 3).t())]  # not contiguous: the general path
    strided[0][1][0, 3] = float("nan")
    assert _non_finite(strided) == "t"


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_cpp_finiteness_pass_finds_every_nan_and_infinity_and_nothing_else(dtype):
    """``first_non_finite`` (fit's per-step weight check, and its check of x) tests the exponent bits a block of
    4096 values at a time: a bad value at any position around the blocks' edges is found, in any of several
    buffers; the largest finite values, subnormals and negative zero are not flagged."""
    info = torch.finfo(dtype)
    edge = torch.tensor([info.max, -info.max, info.tiny / 4, -0.0, info.tiny], dtype=dtype)
    for n in (1, 5, 4095, 4096, 4097, 3 * 4096 + 1):
        clean = torch.randn(n, dtype=dtype) * 1e3
        clean[: len(edge)] = edge[:n]
        assert cpp_backend.first_non_finite([clean]) is None
        for pos in sorted({0, n // 2, n - 1, min(n - 1, 4095), min(n - 1, 4096)}):
            for bad in (float("nan"), float("inf"), -float("inf")):
                t = clean.clone()
                t[pos] = bad
                assert cpp_backend.first_non_finite([clean, t, t]) == 1, (n, pos, bad)
    with pytest.raises(ValueError, match="x has a non-finite value inf at row 2, column 1"):
        from mmoe_fast.train import check_features

        x = torch.zeros(3, 4, dtype=dtype)
        x[2, 1] = float("inf")
        check_features(x)


@pytest.mark.parametrize("cls", [mf.MMoE, mf.OMoE])
@pytest.mark.parametrize("B,D,T,E,H,towers", [(1, 5, 1, 1, 3, ()), (7, 10, 2, 3, 5, (4,)), (33, 9, 3, 5, 7, (6, 3)),
                                              (1500, 100, 2, 8, 16, (8,)), (11, 8, 2, 3, (6, 4), (3,)),
                                              (13, 6, 2, 3, 70, (6, 3)), (1, 6, 3, 2, 131, (8,))])
def test_the_no_grad_forward_runs_the_same_kernels_directly(cls, B, D, T, E, H, towers):
    """Under no_grad a whole MMoE/OMoE runs its kernels straight from the guarded plan: bitwise the layers'
    output where the layers run their towers in C++ too, and the oracle's in float64; a hook added later is
    honoured. (H = 70, 131 with narrow towers: on AVX-512 their first tower layer runs as dot products,
    Kern::dot_layer, in both paths.) Past ``CPP_TOWERS_MAX_MACS`` the layers' towers are torch's GEMMs, whose
    rounding depends on the CPU's BLAS (equal bits on Intel's MKL, not on AMD): there, equal to rounding."""
    from mmoe_fast.models.common import _towers_in_cpp

    torch.manual_seed(B + E)
    for dtype in (torch.float32, torch.float64):
        model = cls(D, T, num_experts=E, expert_hidden=H, tower_hidden=towers).to(dtype)
        x = torch.randn(B, D, dtype=dtype)
        with torch.no_grad():
            out = model(x)
            layers = _mmoe_layers(model, x)
            params = model.towers._stacked_params(x.new_empty((T, 1, model.mixture.expert_weights[-1].shape[-1])))
            if _towers_in_cpp(x.new_empty(T, B, 1), params, model.towers.backend):
                assert torch.equal(out, layers)
            else:
                assert_close(out, layers, 1e-6 if dtype == torch.float32 else 1e-14, "towers on torch's GEMMs")
    layer = model.mixture
    m = reference.mmoe_layer(x, list(layer.expert_weights), list(layer.expert_biases), layer.gate_weight,
                             layer.gate_bias, layer.activation).expand(T, -1, -1)
    with torch.no_grad():
        assert_close(out, _towers_by_module(model.towers, m), 1e-10, "no_grad forward against the oracle")
        handle = model.towers.towers[0][-1].register_forward_hook(lambda mod, i, o: o + 1)
        assert_close(model(x)[:, 0], out[:, 0] + 1, 1e-12, "a hook added after a first call")
        handle.remove()


def test_a_patched_layer_or_towers_forward_runs_as_it_is(monkeypatch):
    torch.manual_seed(0)
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4)
    x = torch.randn(5, 6)
    model(x)  # a first call: the plan is kept
    original = mf.Towers.forward
    monkeypatch.setattr(mf.Towers, "forward", lambda self, h: original(self, h) * 0)
    assert not model(x).any()
    with torch.no_grad():
        assert not model(x).any()
    monkeypatch.undo()
    assert model(x).any()
    fresh = mf.MMoE(6, 2, num_experts=3, expert_hidden=4)
    layer_forward = mf.MMoELayer.forward
    monkeypatch.setattr(mf.MMoELayer, "forward", lambda self, x: layer_forward(self, x) * 0)  # before any call
    with torch.no_grad():
        assert torch.equal(fresh(x), fresh.towers(torch.zeros(2, 5, 4)))


def test_fit_runs_a_class_level_patch_of_the_models_forward(monkeypatch):
    from mmoe_fast import train

    forward, calls = mf.MMoE.forward, []
    monkeypatch.setattr(mf.MMoE, "forward", lambda self, x: calls.append(1) or forward(self, x))
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4)
    assert model.fused_training_forward(torch.randn(4, 6)) is None
    train.fit(model, torch.randn(40, 6), (torch.rand(40, 2) > 0.5).float(), epochs=1, batch_size=20,
              progress=False, log=lambda s: None)
    assert len(calls) == 2


def test_plain_attributes_changed_after_a_first_call_are_used():
    """The activation and backend are read at every call, not kept with the plan; so is a gate bias set later."""
    torch.manual_seed(0)
    x = torch.randn(7, 6, dtype=torch.float64)
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4, gate_bias=False).double()
    model(x)
    model.mixture.activation = "gelu"
    model.mixture.gate_bias = nn.Parameter(torch.randn(2, 3, dtype=torch.float64))
    ref = _mmoe_layers(model, x)
    out = model(x)
    assert type(out.grad_fn).__name__ == "_MMoEModelBackward"
    _same(out, ref, list(model.parameters()), "gelu and a new gate bias")
    with torch.no_grad():
        assert torch.equal(model(x), _mmoe_layers(model, x))
    model.mixture.backend = "reference"
    assert model.fused_training_forward(x) is None  # the reference backend: autograd throughout


@needs_cpp
def test_towers_that_do_not_fit_their_input_raise_as_the_modules_do(monkeypatch):
    """Widths that do not chain, an input of another width or task count: the modules' errors, never numbers."""
    monkeypatch.setattr(common, "CPP_TOWERS_MAX_MACS", 1 << 40)
    towers = common.Towers(2, 5, (4,))
    for t in range(2):
        towers.towers[t][2] = nn.Linear(3, 1)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        towers(torch.randn(2, 3, 5))
    with pytest.raises(IndexError):
        common.Towers(3, 5, (4,))(torch.randn(1, 2, 5))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        common.Towers(2, 5, (4,))(torch.randn(2, 3, 6))
    model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4, tower_hidden=(5,))
    model(torch.randn(4, 6))
    model.towers.towers.append(copy.deepcopy(model.towers.towers[0]))  # three towers for two tasks
    with pytest.raises(IndexError):
        model(torch.randn(4, 6))


def test_shared_tower_modules_train_through_autograd_in_fit(monkeypatch):
    """Two tasks sharing one tower: their gradients must add up, which assigning .grad would not do."""
    from mmoe_fast import train

    x, y = torch.randn(64, 6), (torch.rand(64, 2) > 0.5).float()
    models = []
    for fused in (True, False):
        monkeypatch.setattr(train, "FUSED_STEP", fused)
        torch.manual_seed(1)
        model = mf.MMoE(6, 2, num_experts=3, expert_hidden=4, tower_hidden=(5,))
        model.towers.towers[1] = model.towers.towers[0]
        assert model.fused_training_forward(x) is None
        train.fit(model, x, y, epochs=2, batch_size=16, progress=False, log=lambda s: None)
        models.append(model)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)


def test_fits_adam_follows_options_changed_mid_run_and_runs_step_hooks_once():
    from mmoe_fast.train import OPTIMIZERS

    torch.manual_seed(0)
    p, q = torch.randn(4, requires_grad=True), None
    q = p.detach().clone().requires_grad_()
    ours = OPTIMIZERS["adam"]([p], lr=1e-2, fused=True)
    theirs = torch.optim.Adam([q], lr=1e-2, fused=True)
    calls = []
    ours.register_step_post_hook(lambda *a: calls.append(1))
    for step in range(5):
        g = torch.randn(4)
        p.grad, q.grad = g.clone(), g.clone()
        if step == 3:
            for opt in (ours, theirs):
                opt.param_groups[0]["maximize"] = True  # the fused kernel's fast path does not maximize
        ours.step()
        theirs.step()
        assert torch.equal(p, q), f"step {step}"
    assert len(calls) == 5


@pytest.mark.parametrize("hidden", [(5, 4), 5], ids=["layers", "one-call"])
def test_fit_without_autograd_resumes_exactly(tmp_path, hidden):
    """Stopped at step 4 and resumed (fit's Adam keeping its state as views; the one call's gradient buffers
    built again in the new model), the run ends as if never stopped."""
    from mmoe_fast import train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=g)
    y = torch.stack([(x[:, 0] > 0).float(), x[:, 1]], dim=1)

    def model(seed):
        torch.manual_seed(seed)
        return mf.MMoE(6, 2, num_experts=3, expert_hidden=hidden, task_types=("binary", "regression"))

    def run(name, m, **kw):
        return train.fit(m, x, y, batch_size=10, lr=0.05, seed=1, checkpoint_dir=tmp_path / name, progress=False,
                         log=lambda s: None, **kw)

    probe = model(0)
    one_call = probe.fused_training_step(x[:10], y[:10], torch.ones(2), None) is not None
    assert probe.fused_training_forward(x) is not None and one_call == (hidden == 5)
    straight = model(0)
    history = run("straight", straight, steps=9)
    run("stopped", model(0), steps=4)
    resumed = model(5)
    assert run("resumed", resumed, steps=9, resume=tmp_path / "stopped") == history
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


@pytest.mark.parametrize("cls", [mf.MMoE, mf.OMoE, mf.SharedBottom])
def test_a_model_that_ran_its_fused_paths_copies_and_pickles(cls):
    """The C++ objects the fused paths keep on a model (the no-grad forward's, the one-call step's) are left
    out of a copy or a pickle and built again there: the copy computes what the model does."""
    import io
    import pickle

    from mmoe_fast.train import fit

    torch.manual_seed(0)
    x, y = torch.randn(40, 6), (torch.rand(40, 2) > 0.5).float()
    model = cls(6, 2, num_experts=3, expert_hidden=4) if cls is not mf.SharedBottom else cls(6, 2, bottom_hidden=4)
    fit(model, x, y, epochs=1, batch_size=20, progress=False, log=lambda s: None)
    with torch.no_grad():
        want = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        with torch.no_grad():
            assert torch.equal(copied(x), want)


@needs_cpp
@pytest.mark.parametrize("cls", [mf.MMoE, mf.OMoE])
def test_fit_without_autograd_updates_parameters_of_any_layout_as_with_it(cls, monkeypatch):
    """torch's fused Adam reads a parameter, its gradient and its state as flat memory: the fused step's
    gradients (made contiguous by the kernels) must take a column-major parameter's layout, or the update mixes
    up its elements."""
    from mmoe_fast import train

    torch.manual_seed(0)
    model = cls(6, 2, num_experts=3, expert_hidden=4, task_types=["regression", "binary"]).double()
    layer = model.mixture
    with torch.no_grad():  # the same values, column-major in their last two dimensions
        layer.expert_weights[0] = nn.Parameter(layer.expert_weights[0].transpose(1, 2).contiguous().transpose(1, 2))
        layer.gate_weight = nn.Parameter(layer.gate_weight.transpose(1, 2).contiguous().transpose(1, 2))
    assert not layer.expert_weights[0].is_contiguous()
    x = torch.randn(50, 6, dtype=torch.float64)
    y = torch.stack([torch.randn(50, dtype=torch.float64), (torch.rand(50) > 0.5).double()], 1)
    fits = {}
    for fused in (True, False):
        monkeypatch.setattr(train, "FUSED_STEP", fused)
        fits[fused] = copy.deepcopy(model)
        train.fit(fits[fused], x, y, steps=4, batch_size=16, lr=1e-2, seed=1, progress=False, log=lambda _: None)
    for p, q in zip(fits[True].parameters(), fits[False].parameters()):
        assert_close(p, q, 1e-12, "weights after 4 steps")
