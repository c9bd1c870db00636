"""The ops' vmap rules: S replicas in one backend call (``<op>_replicas``: one C++ call, one Triton launch per
kernel) equal the ops run slice by slice.

Every op, forward and backward; C++: every subset of its tensors batched (the others shared), S below and
above the thread count; Triton (under the interpreter): each tensor alone batched and all of them, so every
pointer's replica stride is taken both ways. Biases present and absent, cotangents alone batched (``vjp``
under ``vmap``, as ``jacrev`` does); float64 against the loop of the same op (the forward bit for bit: each
replica's kernel splits its work as it would alone) and against the reference backend. A spy proves the
replica members ran: a rule that quietly fell back to the loop would fail here.
"""

import importlib
import itertools

import pytest
import torch
from torch.func import grad, vjp, vmap

import mmoe_fast as mf
from mmoe_fast.testing import assert_close

REPLICA_BACKENDS = ("cpp", "triton")
REPLICA_MEMBERS = ("gate_softmax", "gate_softmax_backward", "expert_mixture", "expert_mixture_backward", "mmoe",
                   "mmoe_backward", "grouped_linear", "grouped_linear_backward")


def _module(name: str):
    try:
        return importlib.import_module(f"mmoe_fast.backends.{name}")
    except ImportError:
        return None


def _usable(name: str) -> bool:
    module = _module(name)
    return module is not None and module.unavailable_reason() is None


def _backends(*names):
    return [pytest.param(n, marks=pytest.mark.skipif(not _usable(n), reason=f"the {n} backend cannot run here"))
            for n in names]

B, D, E, H, T = 5, 7, 3, 6, 2  # none a multiple of a vector width


def _ops(bias: bool):
    """``(id, f(backend), tensors)`` of each op, float64 (silu and gelu: no kink for the gradients)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, w, b, wg, bg = r(B, D), r(E, D, H), r(E, H) if bias else None, r(T, D, E), r(T, E) if bias else None
    gates = torch.softmax(r(B, T, E), -1)
    a3 = r(B, E, D)
    yield "gate_softmax", lambda be: lambda x, wg, bg: mf.gate_softmax(x, wg, bg, backend=be), (x, wg, bg)
    yield "expert_mixture", lambda be: lambda a, w, b, g: mf.expert_mixture(a, w, b, g, activation="silu",
                                                                            backend=be), (x, w, b, gates)
    yield "expert_mixture-per-expert", lambda be: lambda a, w, b, g: mf.expert_mixture(
        a, w, b, g, activation="gelu", backend=be), (a3, w, b, gates)
    yield "grouped_linear", lambda be: lambda a, w, b: mf.grouped_linear(a, w, b, activation="gelu", backend=be), \
        (x, w, b)
    yield "grouped_linear-per-expert", lambda be: lambda a, w, b: mf.grouped_linear(a, w, b, activation="silu",
                                                                                    backend=be), (a3, w, b)
    yield "mmoe", lambda be: lambda x, w, b, wg, bg: mf.mmoe(x, w, b, wg, bg, activation="silu", backend=be), \
        (x, w, b, wg, bg)


def _cases(every_subset: bool):
    for bias in (True, False):
        for op_id, _, args in _ops(bias):
            present = [i for i, a in enumerate(args) if a is not None]
            subsets = ([c for k in range(1, len(present) + 1) for c in itertools.combinations(present, k)]
                       if every_subset else [*((i,) for i in present), tuple(present)])
            for batched in subsets:
                yield pytest.param(op_id, bias, batched, id=f"{op_id}-{'bias' if bias else 'nobias'}-"
                                   + "".join(str(i) for i in batched))


def _spy(monkeypatch, backend: str) -> list:
    """The replica members of ``backend`` called from now on, by name."""
    calls, module = [], _module(backend)
    for name in REPLICA_MEMBERS if module is not None else ():
        real = getattr(module, name + "_replicas", None)
        if real is None:
            continue

        def record(*args, name=name, real=real):
            calls.append(name)
            return real(*args)

        monkeypatch.setattr(module, name + "_replicas", record)
    return calls


def test_both_backends_have_every_replica_member():
    for backend in REPLICA_BACKENDS:
        module = _module(backend)
        if module is not None:
            missing = [n for n in REPLICA_MEMBERS if not callable(getattr(module, n + "_replicas", None))]
            assert not missing, f"{backend} lacks {missing}"


def _stack(args, batched, S):
    """The arguments with those in ``batched`` given a leading replica dimension of S distinct values."""
    return tuple(torch.stack([a * (1 + 0.25 * s) + 0.1 * s for s in range(S)]) if i in batched else a
                 for i, a in enumerate(args))


def _loss(f):
    return lambda *a: (f(*a) * torch.linspace(-1, 1, f(*a).numel(), dtype=torch.float64).view_as(f(*a))).sum()


def _slice_by_slice(backend, op_id, bias, batched, S, monkeypatch):
    spy = _spy(monkeypatch, backend)
    make, args = next((m, a) for i, m, a in _ops(bias) if i == op_id)
    cpp, ref = make(backend), make("reference")
    stacked = _stack(args, batched, S)
    dims = tuple(0 if i in batched else None for i in range(len(args)))
    wrt = tuple(i for i, a in enumerate(args) if a is not None)

    out = vmap(cpp, in_dims=dims)(*stacked)
    grads = vmap(grad(_loss(cpp), argnums=wrt), in_dims=dims)(*stacked)
    assert op_id.split("-")[0] in spy and op_id.split("-")[0] + "_backward" in spy, f"replica members run: {spy}"
    for s in range(S):
        one = tuple(a[s] if i in batched else a for i, a in enumerate(stacked))
        assert torch.equal(out[s], cpp(*one)), f"replica {s}: not the bits of the op alone"
        assert_close(out[s], ref(*one), 1e-10, f"replica {s} forward vs the reference")
        want = grad(_loss(ref), argnums=wrt)(*one)
        for k, (g, w) in enumerate(zip(grads, want)):
            assert_close(g[s], w, 1e-10, f"replica {s} gradient {wrt[k]}")


@pytest.mark.skipif(not _usable("cpp"), reason="the C++ backend is not built")
@pytest.mark.parametrize("S", [1, 5])
@pytest.mark.parametrize("op_id,bias,batched", list(_cases(every_subset=True)))
def test_cpp_replicas_equal_the_op_slice_by_slice(op_id, bias, batched, S, monkeypatch):
    _slice_by_slice("cpp", op_id, bias, batched, S, monkeypatch)


@pytest.mark.skipif(not _usable("triton"), reason="the Triton backend cannot run here")
@pytest.mark.parametrize("op_id,bias,batched", list(_cases(every_subset=False)))
def test_triton_replicas_equal_the_op_slice_by_slice(op_id, bias, batched, monkeypatch):
    _slice_by_slice("triton", op_id, bias, batched, 3, monkeypatch)


@pytest.mark.parametrize("backend", _backends(*REPLICA_BACKENDS))
@pytest.mark.parametrize("op_id", [i for i, _, _ in _ops(True)])
def test_cotangents_alone_batched(op_id, backend, monkeypatch):
    """``jacrev``'s pattern: the backward with only its incoming gradient batched."""
    spy = _spy(monkeypatch, backend)
    make, args = next((m, a) for i, m, a in _ops(True) if i == op_id)
    out, pullback = vjp(make(backend), *args)
    _, ref_pullback = vjp(make("reference"), *args)
    cot = torch.randn(3, *out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = vmap(pullback)(cot)
    assert spy == [op_id.split("-")[0] + "_backward"], spy
    for s in range(3):
        for k, (g, w) in enumerate(zip(got, ref_pullback(cot[s]))):
            assert_close(g[s], w, 1e-10, f"cotangent {s} gradient {k}")


@pytest.mark.parametrize("backend", _backends(*REPLICA_BACKENDS))
def test_replicas_of_float32_match_the_reference(backend):
    torch.manual_seed(0)
    x, w, b = torch.randn(4, B, D), torch.randn(4, E, D, H), torch.randn(4, E, H)
    wg, bg = torch.randn(4, T, D, E), torch.randn(4, T, E)
    f = vmap(lambda *a: mf.mmoe(*a, activation="silu", backend=backend))
    want = vmap(lambda *a: mf.mmoe(*a, activation="silu", backend="reference"))
    assert_close(f(x, w, b, wg, bg), want(x.double(), w.double(), b.double(), wg.double(), bg.double()).float(),
                 1e-5, "float32 replicas")


@pytest.mark.parametrize("backend", _backends(*REPLICA_BACKENDS))
def test_bad_shapes_under_vmap_name_the_argument(backend):
    x, w = torch.randn(3, B, D), torch.randn(3, E, D + 1, H)
    with pytest.raises(ValueError, match=r"weight must have shape \[E, K, H\]"):
        vmap(lambda x, w: mf.grouped_linear(x, w, backend=backend))(x, w)


@pytest.mark.parametrize("backend", _backends(*REPLICA_BACKENDS))
def test_empty_batches_go_through_the_reference(backend, monkeypatch):
    spy = _spy(monkeypatch, backend)
    x, w, b = torch.randn(2, 0, D), torch.randn(2, E, D, H), torch.randn(2, E, H)
    out = vmap(lambda x, w, b: mf.grouped_linear(x, w, b, backend=backend))(x, w, b)
    assert out.shape == (2, 0, E, H) and not spy


@pytest.mark.skipif(not _usable("triton"), reason="the Triton backend cannot run here")
def test_triton_runs_more_replicas_than_a_grid_axis_holds_in_chunks(monkeypatch):
    """Past MAX_REPLICAS (65,535 on a GPU; ``jacrev`` vmaps a backward over every output element) the replicas
    run in chunks: here 2 a launch, 5 replicas, forward and every gradient as the loop gives them."""
    from mmoe_fast.backends import triton as tb

    launches = []
    real = tb._check_replicas
    monkeypatch.setattr(tb, "MAX_REPLICAS", 2)
    monkeypatch.setattr(tb, "_check_replicas", lambda S: launches.append(S) or real(S))
    make, args = next((m, a) for i, m, a in _ops(True) if i == "mmoe")
    stacked = _stack(args, (1, 2, 3, 4), 5)
    dims = (None, 0, 0, 0, 0)
    got = vmap(make("triton"), in_dims=dims)(*stacked)
    grads = vmap(grad(_loss(make("triton")), argnums=(0, 1, 2, 3, 4)), in_dims=dims)(*stacked)
    assert launches and max(launches) == 2
    for s in range(5):
        one = (stacked[0], *(a[s] for a in stacked[1:]))
        assert_close(got[s], make("reference")(*one), 1e-10, f"replica {s} forward")
        for k, (g, w) in enumerate(zip(grads, grad(_loss(make("reference")), argnums=(0, 1, 2, 3, 4))(*one))):
            assert_close(g[s], w, 1e-10, f"replica {s} gradient {k}")


@pytest.mark.skipif(not _usable("cpp"), reason="the C++ backend is not built")
def test_nested_vmap_and_grad_of_vmap_equal_the_reference():
    """Tensors an outer transform still wraps (vmap of vmap, grad of vmap) have no memory to hand to a kernel:
    those levels take one call per slice, and the results stay the reference's."""
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, w, b, wg, bg = r(2, 3, B, D), r(2, 3, E, D, H), r(2, 3, E, H), r(2, 3, T, D, E), r(2, 3, T, E)
    got, want = [], []
    for be, out in (("cpp", got), ("reference", want)):
        def f(*a, be=be):
            return mf.mmoe(*a, activation="silu", backend=be)

        out.append(vmap(vmap(f))(x, w, b, wg, bg))
        out += list(vmap(vmap(grad(_loss(f), argnums=(0, 1, 3))))(x, w, b, wg, bg))
        out.append(grad(lambda w0, f=f: _loss(vmap(f))(x[0], w0, b[0], wg[0], bg[0]))(w[0]))
    for k, (a, c) in enumerate(zip(got, want)):
        assert_close(a, c, 1e-10, f"result {k}")


@pytest.mark.parametrize("backend", _backends(*REPLICA_BACKENDS))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 17, 1, 3, 1), (1, 3, 2, 65, 5)], ids=str)
def test_replicas_at_edge_shapes_equal_the_reference(backend, shape, monkeypatch):
    """B = 1, E = 1, T = 1, a column count past one tile, more tasks than a program's accumulators."""
    Bs, Ds, Es, Hs, Ts = shape
    spy = _spy(monkeypatch, backend)
    g = torch.Generator().manual_seed(9)

    def r(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64)

    args = (r(Bs, Ds), r(3, Es, Ds, Hs), r(3, Es, Hs), r(3, Ts, Ds, Es), r(3, Ts, Es))
    dims = (None, 0, 0, 0, 0)

    def f(be):
        return lambda *a: mf.mmoe(*a, activation="gelu", backend=be)

    got = vmap(f(backend), in_dims=dims)(*args)
    grads = vmap(grad(_loss(f(backend)), argnums=(0, 1, 2, 3, 4)), in_dims=dims)(*args)
    assert {"mmoe", "mmoe_backward"} <= set(spy), spy
    for s in range(3):
        one = (args[0], *(a[s] for a in args[1:]))
        assert_close(got[s], f("reference")(*one), 1e-10, f"replica {s} forward")
        for k, (a, w) in enumerate(zip(grads, grad(_loss(f("reference")), argnums=(0, 1, 2, 3, 4))(*one))):
            assert_close(a[s], w, 1e-10, f"replica {s} gradient {k}")


def _model_cases():
    from mmoe_fast.models import MODELS, model_options

    for backend in (*REPLICA_BACKENDS, "numba", "reference"):  # the last two: one op call per slice
        for name in sorted(MODELS):
            if "backend" in model_options(name):  # the others run no fused op
                yield pytest.param(backend, name, id=f"{backend}-{name}", marks=pytest.mark.skipif(
                    not _usable(backend), reason=f"the {backend} backend cannot run here"))


@pytest.mark.parametrize("backend,name", list(_model_cases()))
def test_every_model_vmapped_equals_its_models_one_by_one(backend, name, monkeypatch):
    """The ensembling idiom (stack_module_state + functional_call + vmap, and vmap of grad) over every model that
    runs the fused ops, on every backend (C++ and Triton through their replica members), against each model's own
    forward and autograd."""
    spy = _spy(monkeypatch, backend)
    torch.manual_seed(0)
    models = [mf.build_model(name, 5, 2, activation="silu", backend=backend).double() for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    base = mf.build_model(name, 5, 2, activation="silu", backend=backend).double().to("meta")
    x = torch.randn(6, 5, dtype=torch.float64)

    def loss(p, bufs):
        return torch.func.functional_call(base, (p, bufs), (x,)).square().sum()

    outs = vmap(lambda p, bufs: torch.func.functional_call(base, (p, bufs), (x,)))(params, buffers)
    grads = vmap(torch.func.grad(loss))(params, buffers)
    assert bool(spy) == (backend in REPLICA_BACKENDS), spy
    for i, model in enumerate(models):
        assert_close(outs[i], model(x), 1e-10, f"{name} replica {i}")
        model(x).square().sum().backward()
        for key, p in model.named_parameters():
            assert_close(grads[key][i], p.grad, 1e-10, f"{name} replica {i} grad {key}")
