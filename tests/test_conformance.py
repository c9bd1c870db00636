"""The conformance suite: every backend that runs here passes the same checks against the float64 loop oracle.

Forward and every gradient over the awkward shapes, activations, dtypes, biases and expert depths; strided,
offset and expanded inputs; NaN in / NaN out and huge logits; empty batches; bad input; opcheck and
gradcheck of every registered op; determinism and concurrent calls; ``torch.compile`` and ``torch.jit.trace``.
A backend in ``mmoe_fast.backends.BACKENDS`` (or ``register``-ed) is collected here with no change to this
file: ``copycat``, a copy of the reference backend registered below, proves it. A backend's own test file
keeps only what is its own (instruction sets, caches, poisoned buffers, thread counts).
"""

import types

import pytest
import torch

import mmoe_fast as mf
from mmoe_fast import backends, contract, reference
from mmoe_fast.backends import cpp as cpp_backend
from mmoe_fast.backends import reference as batched
from mmoe_fast.models import MMoELayer
from mmoe_fast.testing import (
    LAYOUTS,
    SHAPES,
    Shape,
    assert_close,
    bad_calls,
    check_layer,
    make_inputs,
    op_cases,
    run_concurrently,
    run_gradcheck,
    run_opcheck,
)

CPU = torch.device("cpu")
FULL = (torch.float32, torch.float64)
HALF = (torch.bfloat16, torch.float16)


def _copycat() -> types.ModuleType:
    """A throwaway backend: the batched reference's required members under another name, nothing else."""
    module = types.ModuleType("copycat", "the batched reference under another name")
    for name in contract.REQUIRED:
        setattr(module, name, getattr(batched, name))
    return module


backends.register("copycat", _copycat())
NAMES = [name for name in backends.available_backends() if backends.load(name).supports(CPU, torch.float32)]


def _dtypes(name: str, wanted=FULL) -> list[torch.dtype]:
    return [d for d in wanted if backends.load(name).supports(CPU, d)]


def _tol(name: str, dtype: torch.dtype) -> float:
    return contract.tolerance(backends.load(name), dtype)


def _cases(wanted=FULL):
    return [pytest.param(n, d, id=f"{n}-{str(d)[6:]}") for n in NAMES for d in _dtypes(n, wanted)]


def _layer_args(inp):
    return inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"]


def test_the_throwaway_backend_is_collected():
    assert "copycat" in NAMES and set(backends.available_backends()) >= {"reference", "copycat"}


# ---- against the oracle ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation", contract.ACTIVATIONS)
@pytest.mark.parametrize("name,dtype", _cases())
def test_layer_matches_the_oracle(name, dtype, activation, shape):
    check_layer(name, shape, dtype=dtype, activation=activation, tol=_tol(name, dtype))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("name,dtype", _cases())
def test_two_layer_experts(name, dtype, activation, shape):
    """Hidden layers run grouped_linear (shared input), the last one expert_mixture on a[B, E, K]."""
    check_layer(name, shape, dtype=dtype, activation=activation, hidden=(9,), tol=_tol(name, dtype))


@pytest.mark.parametrize("activation", ["silu", "identity"])
@pytest.mark.parametrize("name,dtype", _cases((torch.float64,)))
def test_three_layer_experts(name, dtype, activation):
    """A per-expert input into grouped_linear."""
    check_layer(name, Shape(19, 6, 3, 5, 2), dtype=dtype, activation=activation, hidden=(9, 17))


@pytest.mark.parametrize("split", [False, True], ids=["mmoe", "gate_softmax+expert_mixture"])
@pytest.mark.parametrize("bias,gate_bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_without_biases(name, shape, bias, gate_bias, split):
    check_layer(name, shape, activation="silu", bias=bias, gate_bias=gate_bias, split=split,
                tol=_tol(name, torch.float32))


@pytest.mark.parametrize("hidden", [(), (7,)], ids=["one-layer", "two-layer"])
@pytest.mark.parametrize("split", [False, True], ids=["mmoe", "gate_softmax+expert_mixture"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[5]], ids=str)
@pytest.mark.parametrize("name,dtype", _cases())
def test_weight_gradients_when_the_input_needs_none(name, dtype, shape, split, hidden):
    """x is data: the backward may skip its gradient (input_grad=False); every other gradient still matches."""
    check_layer(name, shape, dtype=dtype, activation="gelu", split=split, hidden=hidden, input_grad=False,
                tol=_tol(name, dtype))


@pytest.mark.parametrize("input_grad", [True, False], ids=["x-grad", "no-x-grad"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recomputed"])
@pytest.mark.parametrize("hidden", [(), (7,)], ids=["one-layer", "two-layer"])
@pytest.mark.parametrize("split", [False, True], ids=["mmoe", "gate_softmax+expert_mixture"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], Shape(70, 100, 8, 16, 2)], ids=str)
@pytest.mark.parametrize("name,dtype,gemm", [pytest.param(n, d, g, id=f"{n}-{str(d)[6:]}-{g}") for n in NAMES
                                             for d in _dtypes(n)
                                             for g in (("own", "blas", "blas-batched") if n == "cpp" else ("-",))])
def test_saved_and_recomputed_pre_activations_give_the_oracles_gradients(name, dtype, shape, split, hidden, recompute,
                                                                       input_grad, gemm, monkeypatch):
    """The eager backward from the forward's saved pre-activations, and from recomputed ones, both match, with the
    C++ backend's training GEMMs on its own kernels and on torch's, one GEMM for the experts side by side or a
    batched one (other backends ignore the setting)."""
    if name == "cpp":
        monkeypatch.setenv("MMOE_FAST_CPU_GEMM", gemm.split("-")[0])
        monkeypatch.setattr(cpp_backend, "BLAS_MIN_MACS", 0)  # "blas" at every size: these shapes are small
        if gemm == "blas-batched":  # a shared input's experts by the batched GEMM, not side by side in one
            monkeypatch.setattr(cpp_backend, "SIDE_BY_SIDE_MAX_N", 0)
    check_layer(name, shape, dtype=dtype, activation="relu" if recompute else "silu", split=split, hidden=hidden,
                recompute=recompute, input_grad=input_grad, tol=_tol(name, dtype))


@pytest.mark.parametrize("gemm", ["own", "blas"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recomputed"])
def test_the_cpp_training_forward_keeps_the_pre_activations_unless_told_to_recompute(recompute, gemm, monkeypatch):
    if "cpp" not in NAMES:
        pytest.skip("mmoe_fast._C is not built")
    monkeypatch.setenv("MMOE_FAST_CPU_GEMM", gemm)
    monkeypatch.setattr(cpp_backend, "BLAS_MIN_MACS", 0)
    x, w, b, wg, bg = (t.requires_grad_() for t in _layer_args(make_inputs(Shape(9, 5, 3, 6, 2))))
    out = mf.mmoe(x, w, b, wg, bg, backend="cpp", recompute=recompute)
    kept = {tuple(t.shape) for t in out.grad_fn.saved_tensors}
    pre = (9, 3 * 6) if gemm == "blas" else (3, 9, 6)  # torch's one GEMM writes it row-major: [B, E * H]
    assert (pre in kept) is not recompute and ((9, 2, 3) in kept) is not recompute
    x, w, b, wg, bg = (t.detach().double() for t in (x, w, b, wg, bg))
    assert_close(out, reference.mmoe_layer(x, [w], [b], wg, bg, "relu"), 1e-5, "forward")


@pytest.mark.parametrize("T", [5, 8])
@pytest.mark.parametrize("name", NAMES)
def test_many_tasks(name, T):
    check_layer(name, Shape(9, 6, 3, 5, T), activation="gelu", tol=_tol(name, torch.float32))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("split", [False, True], ids=["mmoe", "gate_softmax+expert_mixture"])
@pytest.mark.parametrize("name,dtype", _cases((torch.float64,)))
def test_strided_offset_and_expanded_inputs(name, dtype, split, layout):
    check_layer(name, Shape(9, 6, 3, 5, 2), dtype=dtype, activation="gelu", hidden=(4,) if split else (),
                split=split, layout=LAYOUTS[layout])


@pytest.mark.parametrize("name,dtype", _cases(HALF))
def test_half_precision(name, dtype):
    check_layer(name, SHAPES[3], dtype=dtype, activation="gelu", hidden=(9,), tol=_tol(name, dtype))
    inp = make_inputs(Shape(5, 6, 3, 4, 2), dtype=dtype)
    x, w, b, wg, bg = _layer_args(inp)
    gates = mf.gate_softmax(x, wg, bg, backend=name)
    outs = (gates, mf.expert_mixture(x, w, b, gates, backend=name), mf.grouped_linear(x, w, b, backend=name))
    assert all(t.dtype == dtype and t.is_contiguous() for t in outs)


@pytest.mark.parametrize("name", NAMES)
def test_mmoe_equals_gate_softmax_then_expert_mixture(name):
    dtype = _dtypes(name)[-1]
    x, w, b, wg, bg = _layer_args(make_inputs(Shape(11, 7, 4, 6, 3), dtype=dtype))
    split = mf.expert_mixture(x, w, b, mf.gate_softmax(x, wg, bg, backend=name), activation="gelu", backend=name)
    fused = mf.mmoe(x, w, b, wg, bg, activation="gelu", backend=name)
    assert_close(fused, split, _tol(name, dtype), f"{name} mmoe vs split")


# ---- edge values and shapes --------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_softmax_is_stable_for_huge_logits(name):
    g = mf.gate_softmax(torch.tensor([[1e4, -1e4]]), torch.eye(2).reshape(1, 2, 2), backend=name)
    torch.testing.assert_close(g, torch.tensor([[[1.0, 0.0]]]))


@pytest.mark.parametrize("name", NAMES)
def test_softmax_of_gates_far_apart(name):
    """Two tasks whose logits lie hundreds apart: a max shared by the whole row would underflow the lower task's
    exps to 0 (and 0 / 0); each gate must be its own softmax."""
    x = torch.tensor([[1.0, 0.5], [0.2, -0.3], [3.0, 1.0]], dtype=torch.float64)
    wg = torch.tensor([[[300.0, 299.0, 301.5], [1.0, -2.0, 0.5]], [[-300.0, -301.0, -299.0], [2.0, 0.0, -1.0]]],
                      dtype=torch.float64)
    g = mf.gate_softmax(x, wg, backend=name)
    torch.testing.assert_close(g, torch.softmax(torch.einsum("bd,tde->bte", x, wg), -1), rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, inside Triton's interpreter
@pytest.mark.parametrize("activation", contract.ACTIVATIONS)
@pytest.mark.parametrize("name", NAMES)
def test_nan_in_nan_out(name, activation):
    inp = make_inputs(Shape(4, 5, 3, 6, 2))
    inp["x"][1, 2] = float("nan")
    out = mf.mmoe(*_layer_args(inp), activation=activation, backend=name)
    assert torch.isnan(out[:, 1]).all() and torch.isfinite(out[:, [0, 2, 3]]).all()


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name):
    inp = make_inputs(Shape(0, 5, 3, 7, 2))
    x = inp["x"].requires_grad_()
    out = mf.mmoe(x, *_layer_args(inp)[1:], backend=name)
    assert out.shape == (2, 0, 7)
    out.sum().backward()
    assert x.grad.shape == (0, 5)
    assert mf.gate_softmax(inp["x"], inp["gate_weight"], backend=name).shape == (0, 2, 3)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_only_the_inputs_that_want_them(name):
    x, w, b, wg, _ = _layer_args(make_inputs(Shape(5, 4, 3, 6, 2)))
    x.requires_grad_()
    wg.requires_grad_()
    mf.mmoe(x, w, b, wg, None, backend=name).sum().backward()
    assert x.grad is not None and wg.grad is not None and w.grad is None and b.grad is None


def _bad_calls():
    for name in NAMES:
        for argument, call, exc in bad_calls(name):
            yield pytest.param(argument, call, exc, id=f"{name}-{argument}")
        lacking = [d for d in (*HALF, *FULL) if not backends.load(name).supports(CPU, d)]
        if lacking:
            x, w, b, wg, bg = (t.to(lacking[0]) for t in _layer_args(make_inputs(Shape(5, 6, 3, 4, 2))))
            yield pytest.param(name, lambda x=x, w=w, b=b, wg=wg, bg=bg, n=name: mf.mmoe(x, w, b, wg, bg, backend=n),
                               ValueError, id=f"{name}-{str(lacking[0])[6:]}")


@pytest.mark.parametrize("argument,call,exc", list(_bad_calls()))
def test_bad_input_is_an_error_naming_the_argument(argument, call, exc):
    with pytest.raises(exc, match=argument):
        call()


# ---- the registered ops ------------------------------------------------------------------------


def _op_cases():
    for name in NAMES:
        for case, op, args in op_cases(name, dtype=_dtypes(name)[-1]):
            yield pytest.param(op, args, id=f"{name}-{case}")


@pytest.mark.parametrize("op,args", list(_op_cases()))
def test_opcheck(op, args):
    """Outputs agree with the exact-stride fakes that torch.compile traces with; autograd registration is sound."""
    run_opcheck(op, args)


@pytest.mark.parametrize("op,args", [c for c in _op_cases() if c.values[1][0].dtype == torch.float64])
def test_gradcheck_float64(op, args):
    run_gradcheck(op, args)


# ---- determinism, threads, compilers -------------------------------------------------------------


def _layer_grads(name, inp, dm):
    leaves = [t.detach().requires_grad_() for t in _layer_args(inp)]
    out = mf.mmoe(*leaves, activation="silu", backend=name)
    return [out, *torch.autograd.grad(out, leaves, dm)]


@pytest.mark.parametrize("name", NAMES)
def test_calls_are_bitwise_deterministic(name):
    inp = make_inputs(Shape(70, 17, 3, 20, 2))
    dm = torch.randn(2, 70, 20, generator=torch.Generator().manual_seed(1))
    first, second = _layer_grads(name, inp, dm), _layer_grads(name, inp, dm)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("name", NAMES)
def test_concurrent_calls_equal_serial_calls(name):
    inputs = [make_inputs(Shape(20 + i, 13, 3, 9, 2), seed=i) for i in range(4)]
    dms = [torch.randn(2, 20 + i, 9, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    serial = [_layer_grads(name, inp, dm) for inp, dm in zip(inputs, dms)]
    results = run_concurrently([lambda i=i: _layer_grads(name, inputs[i], dms[i]) for i in range(4)], repeats=2)
    for runs, want in zip(results, serial):
        assert len(runs) == 2 and all(torch.equal(a, b) for got in runs for a, b in zip(got, want))


@pytest.mark.parametrize("name", NAMES)
def test_layer_under_torch_compile_matches_eager(name):
    torch.manual_seed(0)
    layer = MMoELayer(12, 4, (9, 16), 3, activation="silu", backend=name)
    x = torch.randn(21, 12)
    eager = layer(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(layer.parameters()))
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("hidden", [16, (9, 16)], ids=["one-layer", "two-layer"])
@pytest.mark.parametrize("name", NAMES)
def test_traced_layer_equals_eager_on_another_batch(name, hidden):
    """Tracing under no_grad records the registered ops (not the kernels' raw buffers)."""
    torch.manual_seed(0)
    layer = MMoELayer(12, 4, hidden, 3, activation="gelu", backend=name)
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(5, 12))
        x = torch.randn(8, 12, dtype=torch.float64)
        assert_close(traced(x.float()), reference.mmoe_layer(
            x, [w.double() for w in layer.expert_weights], [b.double() for b in layer.expert_biases],
            layer.gate_weight.double(), layer.gate_bias.double(), "gelu"), 1e-5, f"{name} traced")


# ---- function transforms, forward-mode AD, other tracers ------------------------------------------


def _op_calls(name):
    """``(id, f, args)``: each public op as a function of its tensors (float64), on backend ``name``."""
    inp = make_inputs(Shape(4, 5, 3, 6, 2), dtype=torch.float64, seed=3)
    x, w, b, wg, bg = _layer_args(inp)
    gates = reference.gate_softmax(x, wg, bg)
    a3 = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    yield "gate_softmax", lambda x, wg, bg: mf.gate_softmax(x, wg, bg, backend=name), (x, wg, bg)
    yield "expert_mixture", lambda a, w, b, g: mf.expert_mixture(a, w, b, g, activation="silu", backend=name), \
        (x, w, b, gates)
    yield "expert_mixture-per-expert", lambda a, w, b, g: mf.expert_mixture(a, w, b, g, activation="gelu",
                                                                               backend=name), (a3, w, b, gates)
    yield "grouped_linear", lambda a, w, b: mf.grouped_linear(a, w, b, activation="gelu", backend=name), (a3, w, b)
    yield "mmoe", lambda x, w, b, wg, bg: mf.mmoe(x, w, b, wg, bg, activation="silu", backend=name), (x, w, b, wg, bg)


def _transform_cases():
    for name in [n for n in NAMES if torch.float64 in _dtypes(n)]:
        for op_id, _, _ in _op_calls(name):
            yield pytest.param(name, op_id, id=f"{name}-{op_id}")


def _oracle_call(op_id):
    return next(f for i, f, _ in _op_calls("reference") if i == op_id)


def _all_close(got, want):
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        assert_close(g, w, 1e-10, "transform")


@pytest.mark.parametrize("name,op_id", list(_transform_cases()))
def test_function_transforms_equal_the_reference(name, op_id):
    """vmap, grad, vjp/jacrev, jvp/jacfwd, vmap(grad) and forward-mode AD go through the ops, on every backend."""
    f, args = next((f, a) for i, f, a in _op_calls(name) if i == op_id)
    ref = _oracle_call(op_id)
    func = torch.func
    stacked = tuple(torch.stack([a, 1.5 * a]) for a in args)
    _all_close(func.vmap(f)(*stacked), func.vmap(ref)(*stacked))
    _all_close(func.vmap(f, in_dims=(0,) + (None,) * (len(args) - 1))(stacked[0], *args[1:]),
               func.vmap(ref, in_dims=(0,) + (None,) * (len(args) - 1))(stacked[0], *args[1:]))
    argnums = tuple(range(len(args)))
    _all_close(func.grad(lambda *a: f(*a).square().sum(), argnums)(*args),
               func.grad(lambda *a: ref(*a).square().sum(), argnums)(*args))
    _all_close(func.jacrev(f)(*args), func.jacrev(ref)(*args))
    _all_close(func.jacfwd(f)(*args), func.jacfwd(ref)(*args))
    tangents = tuple(torch.randn_like(a) for a in args)
    _all_close(func.jvp(f, args, tangents)[1], func.jvp(ref, args, tangents)[1])
    _all_close(func.vmap(func.grad(lambda *a: f(*a).square().sum()))(*stacked),  # not .sum(): gates sum to 1
               func.vmap(func.grad(lambda *a: ref(*a).square().sum()))(*stacked))
    with torch.autograd.forward_ad.dual_level():
        dual = [torch.autograd.forward_ad.make_dual(a, t) for a, t in zip(args, tangents)]
        got = torch.autograd.forward_ad.unpack_dual(f(*dual)).tangent
        want = torch.autograd.forward_ad.unpack_dual(ref(*dual)).tangent
    assert got is not None
    _all_close(got, want)


@pytest.mark.parametrize("name", [n for n in NAMES if torch.float64 in _dtypes(n)])
def test_stacked_replicas_through_functional_call_equal_the_models_one_by_one(name):
    """The ensembling idiom: stack_module_state + functional_call + vmap (and vmap of grad)."""
    torch.manual_seed(0)
    models = [mf.MMoE(5, 2, num_experts=3, expert_hidden=(4, 6), backend=name).double() for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    base = mf.MMoE(5, 2, num_experts=3, expert_hidden=(4, 6), backend=name).double().to("meta")
    x = torch.randn(7, 5, dtype=torch.float64)

    def loss(p, bufs):
        return torch.func.functional_call(base, (p, bufs), (x,)).square().sum()

    outs = torch.func.vmap(lambda p, bufs: torch.func.functional_call(base, (p, bufs), (x,)))(params, buffers)
    grads = torch.func.vmap(torch.func.grad(loss))(params, buffers)
    for i, model in enumerate(models):
        assert_close(outs[i], model(x), 1e-10, f"replica {i}")
        model(x).square().sum().backward()
        for key, p in model.named_parameters():
            assert_close(grads[key][i], p.grad, 1e-10, f"replica {i} grad {key}")


@pytest.mark.parametrize("name", NAMES)
def test_second_derivatives_are_a_clear_error(name):
    x, w, b, wg, bg = _layer_args(make_inputs(Shape(4, 5, 3, 6, 2), dtype=_dtypes(name)[-1]))
    f = lambda x: mf.mmoe(x, w, b, wg, bg, backend=name).square().sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="second derivatives of mmoe_fast::mmoe"):
        torch.func.hessian(f)(x)
    with pytest.raises(RuntimeError, match="second derivatives of mmoe_fast::mmoe"):
        torch.func.grad(lambda x: torch.func.grad(f)(x).sum())(x)
    xx = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(xx), xx, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives of mmoe_fast::mmoe"):
        g.sum().backward()


@pytest.mark.parametrize("name", NAMES)
def test_torch_export_equals_eager_and_other_tracers_say_what_to_use(name):
    torch.manual_seed(0)
    model = mf.MMoE(5, 2, num_experts=3, expert_hidden=(4, 6), backend=name).eval()
    x = torch.randn(6, 5)
    assert_close(torch.export.export(model, (x,)).module()(x), model(x), 1e-6, f"{name} exported")
    with pytest.raises(TypeError, match="symbolic_trace cannot trace"):
        torch.fx.symbolic_trace(model)
    with pytest.raises(TypeError, match="torch.jit.script cannot compile MMoE"):
        torch.jit.script(model)


def test_the_ops_take_part_in_autocast():
    """Under CPU bf16 autocast every floating input is cast to bf16 (as torch.mm's are) before the checks."""
    x, w, b, wg, bg = _layer_args(make_inputs(Shape(6, 5, 3, 4, 2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mf.mmoe(x, w, b, wg, bg)
        gates = mf.gate_softmax(x, wg, bg)
        mixed = mf.expert_mixture(x.bfloat16(), w, b, gates)  # one input already bf16, the others not
    half = [t.bfloat16() for t in (x, w, b, wg, bg)]
    assert out.dtype == gates.dtype == mixed.dtype == torch.bfloat16
    torch.testing.assert_close(out, mf.mmoe(*half), rtol=0, atol=0)
    torch.testing.assert_close(mixed, mf.expert_mixture(half[0], half[1], half[2], mf.gate_softmax(*half[:1],
                                                                                                   *half[3:])))
    assert mf.mmoe(x, w, b, wg, bg).dtype == torch.float32  # outside autocast nothing changes


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("model_name", sorted(mf.MODELS))
def test_every_model_trains_under_autocast_and_traces_to_its_eager_output(model_name):
    torch.manual_seed(0)
    model = mf.build_model(model_name, 6, 2)
    front = torch.nn.Linear(6, 6)  # a bf16 output under autocast feeds float32 parameters
    x = torch.randn(9, 6)
    want = model(front(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(front(x))
    out.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert (out.float() - want).norm() <= 5e-2 * want.norm()
    model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        other = torch.randn(13, 6)
        torch.testing.assert_close(traced(other), model(other))
