"""The test harness: awkward shapes, the check against the oracle, op and bad-input tables.

Imported by the tests (``tests/test_conformance.py`` runs every backend through it) and by benchmarks for
their correctness pass; no module below ``ops.py`` imports it (tolerances live in ``contract``). The oracle
is ``mmoe_fast.reference`` (the loop form) evaluated in float64 on the same inputs, with gradients from autograd.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import activations, ops, reference
from .contract import TOLERANCE


@dataclass(frozen=True)
class Shape:
    B: int
    D: int
    E: int
    H: int
    T: int

    def __str__(self) -> str:
        return f"B{self.B}-D{self.D}-E{self.E}-H{self.H}-T{self.T}"


# Awkward on purpose: B = 1, E = 1, T = 1, sizes that are no multiple of a block, B = 0.
SHAPES = (
    Shape(1, 5, 1, 7, 1),
    Shape(17, 33, 3, 7, 3),
    Shape(130, 5, 8, 33, 1),
    Shape(17, 33, 8, 33, 3),
    Shape(1, 33, 3, 33, 3),
    Shape(130, 33, 1, 7, 3),
    Shape(16, 16, 4, 16, 2),
    Shape(0, 5, 3, 7, 2),
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if ref.numel() == 0:
        return 0.0 if out.shape == ref.shape else float("inf")
    if out.shape != ref.shape:
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output?)"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def make_inputs(shape: Shape, *, dtype=torch.float32, device="cpu", bias: bool = True, gate_bias: bool = True,
                hidden: tuple[int, ...] = (), seed: int = 0) -> dict:
    """Random inputs of an MMoE layer; ``hidden`` adds hidden expert layers before the last one."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    sizes = (shape.D, *hidden, shape.H)
    weights = [rnd(shape.E, k, n, scale=k**-0.5) for k, n in zip(sizes[:-1], sizes[1:])]
    biases = [rnd(shape.E, n) if bias else None for n in sizes[1:]]
    return dict(
        x=rnd(shape.B, shape.D),
        weights=weights,
        biases=biases,
        gate_weight=rnd(shape.T, shape.D, shape.E, scale=shape.D**-0.5),
        gate_bias=rnd(shape.T, shape.E) if gate_bias else None,
    )


def _leaves(inputs: dict) -> list[torch.Tensor]:
    ts = [inputs["x"], *inputs["weights"], *inputs["biases"], inputs["gate_weight"], inputs["gate_bias"]]
    return [t for t in ts if t is not None]


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values with reversed strides (column-major)."""
    return t if t.dim() < 2 else t.transpose(0, -1).contiguous().transpose(0, -1)


def _offset(t: torch.Tensor) -> torch.Tensor:
    """The same values at a storage offset of 3 elements."""
    return torch.cat([t.new_zeros(3), t.reshape(-1)])[3:].view(t.shape)


def _expanded(t: torch.Tensor) -> torch.Tensor:
    """The first slice along dimension -2 repeated with stride 0 (values change, as they do for the oracle).

    Not along the experts of ``W[E, K, H]``: equal experts make the gates' gradient vanish (nothing to compare).
    """
    dim = t.dim() - 2 if t.dim() > 1 else 0
    return t if t.shape[dim] == 0 else t.narrow(dim, 0, 1).expand(t.shape)


def _negative_bit(t: torch.Tensor) -> torch.Tensor:
    """The same values as a negative-bit view: the memory holds their negation."""
    return torch._neg_view(-t)


# Differentiable re-layouts applied alike to a backend's inputs and the oracle's (``check_layer(layout=)``).
LAYOUTS = {"transposed": _transposed, "offset": _offset, "expanded": _expanded, "negative-bit": _negative_bit}


def _relayout(inputs: dict, layout: Callable[[torch.Tensor], torch.Tensor] | None) -> dict:
    if layout is None:
        return inputs

    def f(t):
        return None if t is None else layout(t)

    return dict(x=f(inputs["x"]), weights=[f(w) for w in inputs["weights"]], biases=[f(b) for b in inputs["biases"]],
                gate_weight=f(inputs["gate_weight"]), gate_bias=f(inputs["gate_bias"]))


def _with_grad(inputs: dict, dtype=None) -> dict:
    def leaf(t):
        return None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True)

    return dict(x=leaf(inputs["x"]), weights=[leaf(w) for w in inputs["weights"]],
                biases=[leaf(b) for b in inputs["biases"]], gate_weight=leaf(inputs["gate_weight"]),
                gate_bias=leaf(inputs["gate_bias"]))


def run_layer(inputs: dict, activation: str, backend: str, split: bool = False, recompute: bool = False
              ) -> torch.Tensor:
    """m[T, B, H] through the public ops; ``split`` uses gate_softmax + expert_mixture instead of mmoe."""
    x, ws, bs = inputs["x"], inputs["weights"], inputs["biases"]
    kw = dict(activation=activation, backend=backend, recompute=recompute)
    if len(ws) == 1 and not split:
        return ops.mmoe(x, ws[0], bs[0], inputs["gate_weight"], inputs["gate_bias"], **kw)
    h = x
    for w, b in zip(ws[:-1], bs[:-1]):
        h = ops.grouped_linear(h, w, b, **kw)
    gates = ops.gate_softmax(x, inputs["gate_weight"], inputs["gate_bias"], backend=backend)
    return ops.expert_mixture(h, ws[-1], bs[-1], gates, **kw)


def kink_free_seed(shape: Shape, *, dtype=torch.float32, activation: str = "relu", hidden: tuple[int, ...] = (),
                   bias: bool = True, gate_bias: bool = True) -> int:
    """The first input seed whose ReLU pre-activations all keep 1e-5 clear of 0 (0 when that does not matter).

    ReLU's derivative jumps at 0: a float32 sum within rounding of 0 may land on either side and flip
    one unit's gradient whatever the backend (seed 0 of B130-D5-E8-H33-T1 has a pre-activation of 3e-8).
    Away from the kink, float32 must meet the 1e-5 contract; float64 is compared as it comes.
    """
    if activation != "relu" or dtype == torch.float64:
        return 0
    for seed in range(100):
        inp = make_inputs(shape, dtype=torch.float64, hidden=hidden, seed=seed, bias=bias, gate_bias=gate_bias)
        h, clear = inp["x"], True
        for w, b in zip(inp["weights"], inp["biases"]):
            pre = reference.grouped_linear(h, w, b, "identity")
            clear = clear and (pre.numel() == 0 or pre.abs().min().item() > 1e-5)
            h = pre.relu()
        if clear:
            return seed
    raise AssertionError(f"no seed keeps the ReLU kink clear for {shape}")


def check_layer(backend: str, shape: Shape, *, dtype=torch.float32, device="cpu", activation: str = "relu",
                bias: bool = True, gate_bias: bool = True, hidden: tuple[int, ...] = (), split: bool = False,
                tol: float | None = None, seed: int | None = None,
                layout: Callable[[torch.Tensor], torch.Tensor] | None = None, input_grad: bool = True,
                recompute: bool = False) -> None:
    """Forward and every gradient of a layer on ``backend`` against the float64 loop reference.

    ``seed=None`` takes ``kink_free_seed``, so that float32 ReLU comparisons are well posed. ``layout``
    (one of ``LAYOUTS``) re-lays every input out before the call, for the backend and the oracle alike.
    ``input_grad=False``: ``x`` needs no gradient (data), so the backward may skip it; the others are compared.
    ``recompute``: the ops keep no pre-activations for the backward (the default keeps them where the backend can).
    """
    tol = TOLERANCE[dtype] if tol is None else tol
    if seed is None:
        seed = kink_free_seed(shape, dtype=dtype, activation=activation, hidden=hidden, bias=bias, gate_bias=gate_bias)
    inputs = make_inputs(shape, dtype=dtype, device=device, bias=bias, gate_bias=gate_bias, hidden=hidden, seed=seed)
    mine, oracle = _with_grad(inputs), _with_grad(inputs, torch.float64)
    if not input_grad:
        mine["x"], oracle["x"] = mine["x"].detach(), oracle["x"].detach()
    out = run_layer(_relayout(mine, layout), activation, backend, split, recompute)
    theirs = _relayout(oracle, layout)
    ref = reference.mmoe_layer(theirs["x"], theirs["weights"], theirs["biases"], theirs["gate_weight"],
                               theirs["gate_bias"], activation)
    assert_close(out, ref, tol, f"{backend} forward")
    if shape.B == 0:
        return
    dm = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    names = ["x", *[f"W{i}" for i in range(len(inputs["weights"]))],
             *[f"b{i}" for i, b in enumerate(inputs["biases"]) if b is not None], "gate_weight", "gate_bias"]
    names = [n for n, t in zip(names, _leaves(mine)) if t.requires_grad]
    grads = torch.autograd.grad(out, [t for t in _leaves(mine) if t.requires_grad], dm.to(dtype=dtype, device=device))
    ref_grads = torch.autograd.grad(ref, [t for t in _leaves(oracle) if t.requires_grad], dm)
    for name, g, r in zip(names, grads, ref_grads):
        assert_close(g, r, tol, f"{backend} grad {name}")


def tf32_round(x: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """fp32 ``x`` at tf32's 10 mantissa bits: ``"nearest"`` (ties away from zero, PTX's ``cvt.rna.tf32.f32``,
    what the triton backend does) or ``"truncate"`` (what tensor cores do to unrounded fp32). NaN stays NaN."""
    if mode not in ("nearest", "truncate"):
        raise ValueError(f"mode must be 'nearest' or 'truncate', got {mode!r}")
    bits = x.to(torch.float32).view(torch.int32)
    if mode == "nearest":
        bits = bits + 0x1000
    return torch.where(x.isnan(), x.to(torch.float32), (bits & -8192).view(torch.float32))


def tf32_layer_errors(shape: Shape, activation: str, mode: str, seed: int = 0) -> dict[str, float]:
    """Relative errors of a single-layer MMoE's forward and every gradient (names as ``check_layer``'s) when
    each GEMM operand is rounded to tf32 (``tf32_round``'s ``mode``) and products add up in fp32, as tensor
    cores do, against the float64 reference; the elementwise parts stay fp32. Inputs and ``dm`` are
    ``check_layer``'s for ``seed``: this emulates a GPU check's tf32 case on the CPU at full size."""
    def q(t):
        return tf32_round(t, mode)

    inp = make_inputs(shape, dtype=torch.float64, seed=seed)
    x64, w64, b64, wg64, bg64 = (inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"],
                                 inp["gate_bias"])
    dm64 = torch.randn(shape.T, shape.B, shape.H, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64)
    x, w, b, wg, bg, dm = (t.float() for t in (x64, w64, b64, wg64, bg64, dm64))
    G = torch.softmax(torch.einsum("bd,tde->bte", q(x), q(wg)) + bg, dim=-1)
    pre = torch.einsum("bd,edh->ebh", q(x), q(w)) + b[:, None]
    f = activations.apply(pre, activation)
    m = torch.einsum("bte,ebh->tbh", G, f)
    dpre = torch.einsum("bte,tbh->ebh", G, dm) * activations.grad(pre, activation)
    dG = torch.einsum("tbh,ebh->bte", dm, f)
    dlogit = G * (dG - (G * dG).sum(-1, keepdim=True))
    mine = dict(forward=m,
                x=torch.einsum("ebh,edh->bd", q(dpre), q(w)) + torch.einsum("bte,tde->bd", q(dlogit), q(wg)),
                W0=torch.einsum("bd,ebh->edh", q(x), q(dpre)), b0=dpre.sum(1),
                gate_weight=torch.einsum("bd,bte->tde", q(x), q(dlogit)), gate_bias=dlogit.sum(0))
    leaves = [t.clone().requires_grad_() for t in (x64, w64, b64, wg64, bg64)]
    ref = reference.mmoe(*leaves, activation)
    grads = torch.autograd.grad(ref, leaves, dm64)
    refs = dict(forward=ref.detach(), **dict(zip(["x", "W0", "b0", "gate_weight", "gate_bias"], grads)))
    return {name: rel_err(mine[name], refs[name]) for name in refs}


OP_SHAPE = Shape(5, 6, 3, 4, 2)


def op_cases(backend: str, *, dtype=torch.float64, shape: Shape = OP_SHAPE, biases=(True, False)):
    """``(id, op, args)`` for ``opcheck`` and ``gradcheck``: every registered op on ``backend``.

    Shared and per-expert inputs, with and without biases, a different activation per op.
    """
    for bias in biases:
        inp = make_inputs(shape, dtype=dtype, bias=bias, gate_bias=bias, seed=1)
        x, w, b, wg, bg = inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"]
        gates = reference.gate_softmax(x, wg, bg)
        a3 = torch.randn(shape.B, shape.E, shape.D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        a3 = a3.to(dtype)
        tag = "" if bias else "-nobias"
        yield f"gate_softmax{tag}", ops._gate_softmax, (x, wg, bg, backend)
        yield f"expert_mixture{tag}", ops._expert_mixture, (x, w, b, gates, "silu", backend)
        yield f"expert_mixture-per-expert{tag}", ops._expert_mixture, (a3, w, b, gates, "gelu", backend)
        yield f"grouped_linear{tag}", ops._grouped_linear, (x, w, b, "relu", backend)
        yield f"grouped_linear-per-expert{tag}", ops._grouped_linear, (a3, w, b, "identity", backend)
        yield f"mmoe{tag}", ops._mmoe, (x, w, b, wg, bg, "gelu", backend)


def case_id(value) -> str:
    """pytest ids for ``op_cases`` rows: the name, nothing for the op and its arguments."""
    return value if isinstance(value, str) else ""


def run_opcheck(op, args) -> None:
    """``torch.library.opcheck`` with gradients wanted on every tensor argument."""
    torch.library.opcheck(op, tuple(t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args))


def run_gradcheck(op, args) -> None:
    """``torch.autograd.gradcheck`` (float64 arguments) of ``op`` with respect to every tensor argument."""
    args = tuple(t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args)
    assert torch.autograd.gradcheck(lambda *a: op(*a), args, eps=1e-6, atol=1e-7)


def run_concurrently(calls: list[Callable[[], object]], repeats: int = 1) -> list[list]:
    """Each call ``repeats`` times in its own thread, all released at once; the results per call.

    An exception in any thread is raised here, after every thread has ended.
    """
    results: list[list] = [[] for _ in calls]
    errors: list[BaseException] = []
    start = threading.Barrier(len(calls))

    def work(i: int) -> None:
        start.wait()
        try:
            for _ in range(repeats):
                results[i].append(calls[i]())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def bad_calls(backend: str = "auto"):
    """``(argument, call, exception)``: calls with one bad input each; the message must name ``argument``."""
    inp = make_inputs(Shape(5, 6, 3, 4, 2))
    x, w, b, wg, bg = inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"]
    gates = reference.gate_softmax(x, wg, bg)
    kw = {"backend": backend}
    yield "x", lambda: ops.mmoe(x[0], w, b, wg, bg, **kw), ValueError
    yield "x", lambda: ops.gate_softmax(x.to(torch.int64), wg, bg, **kw), TypeError
    yield "x", lambda: ops.gate_softmax([[1.0]], wg, bg, **kw), TypeError
    yield "gate_weight", lambda: ops.gate_softmax(x, wg[:, :-1], bg, **kw), ValueError
    yield "gate_weight", lambda: ops.gate_softmax(x, wg.double(), bg, **kw), TypeError
    yield "gate_bias", lambda: ops.gate_softmax(x, wg, bg[:1], **kw), ValueError
    yield "expert_weight", lambda: ops.mmoe(x, w[:, :-1], b, wg, bg, **kw), ValueError
    yield "expert_weight", lambda: ops.expert_mixture(x, w.reshape(-1, 4), b, gates, **kw), ValueError
    yield "expert_bias", lambda: ops.mmoe(x, w, b[:, :-1], wg, bg, **kw), ValueError
    yield "gate_weight", lambda: ops.mmoe(x, w[:2], b[:2], wg, bg, **kw), ValueError
    yield "gates", lambda: ops.expert_mixture(x, w, b, gates[:, :, :2], **kw), ValueError
    yield "gates", lambda: ops.expert_mixture(x, w, b, gates[:3], **kw), ValueError
    yield "a", lambda: ops.expert_mixture(x[None, None], w, b, gates, **kw), ValueError
    yield "activation", lambda: ops.mmoe(x, w, b, wg, bg, activation="tanh", **kw), ValueError
    yield "device", lambda: ops.gate_softmax(x, wg.to("meta"), bg, **kw), ValueError
    yield "expert_weight", lambda: ops.expert_mixture(x, w[:0], b[:0], gates[:, :, :0], **kw), ValueError  # E = 0
    yield "gate_weight", lambda: ops.mmoe(x, w[:0], b[:0], wg[:, :, :0], bg[:, :0], **kw), ValueError  # E = 0
    yield "x", lambda: ops.mmoe(x[:, :0], w[:, :0], b, wg[:, :0], bg, **kw), ValueError  # D = 0
    yield "expert_weight", lambda: ops.expert_mixture(x, w[:, :, :0], None, gates, **kw), ValueError  # H = 0
    yield "gate_weight", lambda: ops.gate_softmax(x, wg[:0], bg[:0], **kw), ValueError  # T = 0
    yield "bias", lambda: ops.grouped_linear(x, w, b[:, :2], **kw), ValueError
