"""What is the C++ backend's own (test_conformance.py checks it against the oracle): every instruction set,
bitwise results for any thread count, the package without the extension, one activation encoding."""


import pytest
import torch

import mmoe_fast as mf
from mmoe_fast import backends, contract
from mmoe_fast.activations import ACTIVATIONS
from mmoe_fast.backends import cpp
from mmoe_fast.testing import (
    SHAPES,
    Shape,
    assert_close,
    check_layer,
    make_inputs,
)

pytestmark = pytest.mark.skipif(cpp.unavailable_reason() is not None, reason="mmoe_fast._C not built")


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[4], Shape(75, 40, 5, 70, 2), Shape(600, 9, 3, 40, 2)],
                         ids=str)  # the last: several row blocks in the backward
def test_every_instruction_set(isa, shape):
    for activation in ACTIVATIONS:
        check_layer("cpp", shape, activation=activation, hidden=(19,) if activation == "silu" else ())
    check_layer("cpp", shape, dtype=torch.float64, activation="relu", split=True)


def test_backward_is_the_same_for_any_thread_count():
    inp = make_inputs(Shape(2100, 9, 3, 40, 2))  # several chunks of row blocks
    x, w, b = inp["x"], inp["weights"][0], inp["biases"][0]
    gates = cpp.gate_softmax(x, inp["gate_weight"], inp["gate_bias"])
    dm = torch.randn(2, 2100, 40)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(cpp.expert_mixture_backward(dm, x, w, b, gates, "silu"))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(results[0], other))


def test_auto_picks_cpp_on_cpu_and_reference_for_half():
    assert backends.resolve("auto", torch.device("cpu"), torch.float32) is cpp
    assert backends.resolve("auto", torch.device("cpu"), torch.float64) is cpp
    assert backends.resolve("auto", torch.device("cpu"), torch.bfloat16) is not cpp
    assert not cpp.supports(torch.device("cpu"), torch.float16)
    assert not cpp.supports(torch.device("cuda"), torch.float32)


def test_package_works_without_the_extension(monkeypatch):
    monkeypatch.setattr(cpp, "_C", None)
    assert "not built" in cpp.unavailable_reason()
    monkeypatch.setitem(backends._loaded, "cpp", f"backend 'cpp': {cpp.unavailable_reason()}")
    monkeypatch.setattr(backends, "_resolved", {})
    assert "cpp" not in mf.available_backends()
    assert backends.resolve("auto", torch.device("cpu"), torch.float32) is not cpp
    inp = make_inputs(Shape(6, 5, 3, 7, 2))
    out = mf.mmoe(inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"])
    assert out.shape == (2, 6, 7)
    with pytest.raises(ValueError, match="_C was not built"):
        mf.mmoe(inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"], backend="cpp")
    model = mf.MMoE(5, 2, num_experts=3, expert_hidden=7)
    session = mf.InferenceSession(model)
    assert session.backend == "eager"
    x = torch.randn(4, 5)
    torch.testing.assert_close(session.run(x), model.eval()(x))


def test_the_extension_takes_the_contracts_activation_codes():
    assert cpp._C.activation_codes == contract.ACTIVATION_CODES


def test_model_trains_with_cpp():
    torch.manual_seed(0)
    model = mf.MMoE(12, 2, num_experts=4, expert_hidden=(10, 16), backend="cpp")
    x, y = torch.randn(64, 12), torch.randn(64, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_matches_reference_backend_at_a_realistic_size():
    inp = make_inputs(Shape(257, 128, 8, 256, 2))
    args = (inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"])
    assert_close(mf.mmoe(*args, backend="cpp"), mf.mmoe(*[a.double() for a in args], backend="reference"), 1e-5,
                 "cpp at D=128, E=8, H=256")


def test_the_training_gemm_setting_is_checked_and_auto_follows_the_cpu(monkeypatch):
    monkeypatch.setenv("MMOE_FAST_CPU_GEMM", "fast")
    with pytest.raises(ValueError, match="MMOE_FAST_CPU_GEMM must be one of"):
        cpp.training_gemm()
    for value in ("own", "blas"):
        monkeypatch.setenv("MMOE_FAST_CPU_GEMM", value)
        assert cpp.training_gemm() == value
    monkeypatch.setenv("MMOE_FAST_CPU_GEMM", "auto")
    intel_mkl = torch.backends.mkl.is_available() and cpp._cpu_vendor() == "GenuineIntel"
    assert cpp.training_gemm() == ("blas" if intel_mkl else "own")


def test_large_outputs_come_from_kept_blocks_and_can_be_released():
    cpp.release_cached_memory()
    t = cpp.fresh(torch.empty(0), (512, 1024))  # 2 MiB: a kept block
    t.fill_(2.0)
    assert t.sum().item() == 2.0 * t.numel() and cpp._C.cached_block_bytes() == 0
    del t
    assert cpp._C.cached_block_bytes() >= 2 << 20
    again = cpp.fresh(torch.empty(0, dtype=torch.float64), (256, 1024))  # the same block, reused
    assert cpp._C.cached_block_bytes() == 0 and again.dtype == torch.float64
    del again
    assert cpp.release_cached_memory() >= 2 << 20 and cpp._C.cached_block_bytes() == 0


def _lanes(isa: str, dtype: torch.dtype) -> int:
    """Vector lanes of ``isa`` for ``dtype`` (a panel is two vectors)."""
    return {"avx512": 64, "avx2": 32, "base": 16}[isa] // (4 if dtype == torch.float32 else 8)


@pytest.mark.parametrize("E", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_narrow_experts_side_by_side(isa, dtype, E):
    """Experts narrower than a panel on a shared input share panels (a vector each read in place at N = L, packed
    otherwise, a panel crossing experts at N = L + 3); wider ones keep their own: every layer kind, forward and
    gradients against the reference, and the packed session."""
    L = _lanes(isa, dtype)
    for N in sorted({max(1, L // 2), L, L + 3, 2 * L}):
        for B in (1, 70):  # 70: more than a row block at every instruction set
            shape = Shape(B, 11, E, N, 2)
            check_layer("cpp", shape, dtype=dtype, activation="silu")
            check_layer("cpp", shape, dtype=dtype, activation="gelu", hidden=(N,))  # a grouped layer on x first
            check_layer("cpp", shape, dtype=dtype, activation="silu", split=True, bias=False)
        torch.manual_seed(N)
        model = mf.MMoE(11, 2, num_experts=E, expert_hidden=N, backend="reference").to(dtype).eval()
        x = torch.randn(70, 11, dtype=dtype)
        assert_close(mf.InferenceSession(model).run(x), model(x).detach(), 1e-5 if dtype == torch.float32 else 1e-12,
                     f"session N={N}")


def test_side_by_side_forward_is_the_same_for_any_thread_count():
    inp = make_inputs(Shape(700, 9, 5, 16, 2))  # several row blocks, narrow experts (N = 16: in place on AVX-512)
    x, w, b, wg, bg = inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((cpp.mmoe_train(x, w, b, wg, bg, "relu")[0], cpp.grouped_linear(x, w, b, "silu")))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(results[0], other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_side_by_side_gives_the_bits_of_one_panel_per_expert(isa, dtype):
    """A shared x (experts side by side) and the same x given to each expert (a[B, E, K]: a panel per expert) give
    equal outputs, bit for bit: the same multiply-adds per column in the same order."""
    L = _lanes(isa, dtype)
    g = torch.Generator().manual_seed(3)
    for N in sorted({max(1, L // 2), L, L + 3}):
        for E in (2, 5):
            x = torch.randn(70, 11, generator=g, dtype=dtype)
            w, b = torch.randn(E, 11, N, generator=g, dtype=dtype), torch.randn(E, N, generator=g, dtype=dtype)
            G = torch.softmax(torch.randn(70, 3, E, generator=g, dtype=dtype), -1)
            a = x[:, None].expand(70, E, 11).contiguous()
            assert torch.equal(cpp.grouped_linear(x, w, b, "silu"), cpp.grouped_linear(a, w, b, "silu")), (N, E)
            assert torch.equal(cpp.expert_mixture(x, w, b, G, "relu"), cpp.expert_mixture(a, w, b, G, "relu")), (N, E)


@pytest.mark.parametrize("towers", [(6, 3), (4,), (40,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_tower_forward_gives_the_same_bits_on_each_instruction_set(isa, towers, dtype):
    """A no-grad forward, a session built on this instruction set and the training forward run a tower layer
    as dot products or on the register tile alike (Kern::dot_layer, which depends on the vector width): the same
    bits on each instruction set, and the oracle's values."""
    torch.manual_seed(len(towers) + towers[0])
    model = mf.MMoE(9, 2, num_experts=3, expert_hidden=70, tower_hidden=towers).to(dtype)
    x = torch.randn(11, 9, dtype=dtype)
    trained = model(x)  # the training forward (one autograd node, towers in C++)
    with torch.no_grad():
        live = model(x)
        assert torch.equal(live, trained.detach())
        assert torch.equal(mf.InferenceSession(model).run(x), live)
        oracle = torch.cat([t(model.mixture(x)[i]) for i, t in enumerate(model.towers.towers)], dim=1)
    assert_close(live, oracle, 1e-5 if dtype == torch.float32 else 1e-12, f"live forward on {isa}")
