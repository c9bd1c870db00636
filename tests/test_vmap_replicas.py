"""The ops' vmap rules: S replicas in one C++ call (``<op>_replicas``) equal the ops run slice by slice.

Every op, forward and backward, with every subset of its tensors batched (the others shared), biases present
and absent, S below and above the thread count, cotangents alone batched (``vjp`` under ``vmap``, as ``jacrev``
does); float64 against the loop of the same op (the forward bit for bit: each replica's kernel
splits its work as it would alone) and against the reference backend. A spy proves the replica
kernels ran: a rule that quietly fell back to the loop would fail here.
"""

import itertools

import pytest
import torch
from torch.func import grad, vjp, vmap

import mmoe_fast as mf
from mmoe_fast.backends import cpp as cpp_backend
from mmoe_fast.testing import assert_close

pytestmark = pytest.mark.skipif(cpp_backend.unavailable_reason() is not None, reason="the C++ backend is not built")

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


def _cases():
    for bias in (True, False):
        for op_id, _, args in _ops(bias):
            present = [i for i, a in enumerate(args) if a is not None]
            for k in range(1, len(present) + 1):
                for batched in itertools.combinations(present, k):
                    yield pytest.param(op_id, bias, batched, id=f"{op_id}-{'bias' if bias else 'nobias'}-"
                                       + "".join(str(i) for i in batched))


@pytest.fixture
def spy(monkeypatch):
    """The names of the replica kernels called."""
    calls = []
    real = cpp_backend._replicas

    def record(kernel, *args):
        calls.append(kernel)
        return real(kernel, *args)

    monkeypatch.setattr(cpp_backend, "_replicas", record)
    return calls


def _stack(args, batched, S):
    """The arguments with those in ``batched`` given a leading replica dimension of S distinct values."""
    return tuple(torch.stack([a * (1 + 0.25 * s) + 0.1 * s for s in range(S)]) if i in batched else a
                 for i, a in enumerate(args))


def _loss(f):
    return lambda *a: (f(*a) * torch.linspace(-1, 1, f(*a).numel(), dtype=torch.float64).view_as(f(*a))).sum()


@pytest.mark.parametrize("S", [1, 5])
@pytest.mark.parametrize("op_id,bias,batched", list(_cases()))
def test_replicas_equal_the_op_slice_by_slice(op_id, bias, batched, S, spy):
    make, args = next((m, a) for i, m, a in _ops(bias) if i == op_id)
    cpp, ref = make("cpp"), make("reference")
    stacked = _stack(args, batched, S)
    dims = tuple(0 if i in batched else None for i in range(len(args)))
    wrt = tuple(i for i, a in enumerate(args) if a is not None)

    out = vmap(cpp, in_dims=dims)(*stacked)
    grads = vmap(grad(_loss(cpp), argnums=wrt), in_dims=dims)(*stacked)
    assert spy, "the replica kernels did not run"
    for s in range(S):
        one = tuple(a[s] if i in batched else a for i, a in enumerate(stacked))
        assert torch.equal(out[s], cpp(*one)), f"replica {s}: not the bits of the op alone"
        assert_close(out[s], ref(*one), 1e-10, f"replica {s} forward vs the reference")
        want = grad(_loss(ref), argnums=wrt)(*one)
        for k, (g, w) in enumerate(zip(grads, want)):
            assert_close(g[s], w, 1e-10, f"replica {s} gradient {wrt[k]}")


@pytest.mark.parametrize("op_id", [i for i, _, _ in _ops(True)])
def test_cotangents_alone_batched(op_id, spy):
    """``jacrev``'s pattern: the backward with only its incoming gradient batched."""
    make, args = next((m, a) for i, m, a in _ops(True) if i == op_id)
    out, pullback = vjp(make("cpp"), *args)
    _, ref_pullback = vjp(make("reference"), *args)
    cot = torch.randn(3, *out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = vmap(pullback)(cot)
    assert "backward" in spy or "gate_backward" in spy
    for s in range(3):
        for k, (g, w) in enumerate(zip(got, ref_pullback(cot[s]))):
            assert_close(g[s], w, 1e-10, f"cotangent {s} gradient {k}")


def test_replicas_of_float32_match_the_reference():
    torch.manual_seed(0)
    x, w, b = torch.randn(4, B, D), torch.randn(4, E, D, H), torch.randn(4, E, H)
    wg, bg = torch.randn(4, T, D, E), torch.randn(4, T, E)
    f = vmap(lambda *a: mf.mmoe(*a, activation="silu", backend="cpp"))
    want = vmap(lambda *a: mf.mmoe(*a, activation="silu", backend="reference"))
    assert_close(f(x, w, b, wg, bg), want(x.double(), w.double(), b.double(), wg.double(), bg.double()).float(),
                 1e-5, "float32 replicas")


def test_bad_shapes_under_vmap_name_the_argument():
    x, w = torch.randn(3, B, D), torch.randn(3, E, D + 1, H)
    with pytest.raises(ValueError, match=r"weight must have shape \[E, K, H\]"):
        vmap(lambda x, w: mf.grouped_linear(x, w, backend="cpp"))(x, w)


def test_empty_batches_go_through_the_reference():
    x, w, b = torch.randn(2, 0, D), torch.randn(2, E, D, H), torch.randn(2, E, H)
    out = vmap(lambda x, w, b: mf.grouped_linear(x, w, b, backend="cpp"))(x, w, b)
    assert out.shape == (2, 0, E, H)


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
