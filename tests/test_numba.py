"""What is the numba backend's own (test_conformance.py checks it against the oracle): bitwise results for
any thread count, auto's pick on CPU without the C++ extension, compile-once warmup, the on-disk cache.
Each kernel compiles once per dtype per process (or loads from numba's cache)."""

import os
import shutil
import subprocess
import sys
import textwrap

import numba
import torch

import mmoe_fast as mf
from mmoe_fast import backends
from mmoe_fast.backends import numba as numba_backend
from mmoe_fast.data.synthetic import make_synthetic
from mmoe_fast.kernels import numba_kernels
from mmoe_fast.testing import (
    Shape,
    make_inputs,
)

DTYPES = (torch.float32, torch.float64)


def _train_step_grads(inp, dm):
    leaves = [t.detach().clone().requires_grad_() for t in
              (inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"])]
    out = mf.mmoe(*leaves, activation="gelu", backend="numba")
    out.backward(dm)
    return [out.detach()] + [t.grad for t in leaves]


def test_numba_is_bitwise_deterministic_across_calls_and_thread_counts():
    """Every output element has one owner summing in a fixed order: no dependence on thread timing."""
    inp = make_inputs(Shape(300, 33, 8, 40, 3), dtype=torch.float32)
    dm = torch.randn(3, 300, 40, generator=torch.Generator().manual_seed(3))
    first, again = _train_step_grads(inp, dm), _train_step_grads(inp, dm)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = _train_step_grads(inp, dm)
        assert numba.get_num_threads() == 1  # the backend follows torch's thread count
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, one_thread):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_auto_picks_numba_on_cpu_without_cpp_and_trains(monkeypatch):
    monkeypatch.setitem(backends._loaded, "cpp", "backend 'cpp': mmoe_fast._C was not built")
    monkeypatch.setattr(backends, "_resolved", {})
    cpu = torch.device("cpu")
    assert backends.resolve("auto", cpu, torch.float32) is numba_backend
    assert backends.resolve("auto", cpu, torch.float64) is numba_backend
    assert backends.backend_name(backends.resolve("auto", cpu, torch.bfloat16)) == "reference"
    assert "auto on cpu float32: numba" in backends.describe()

    calls = []
    real_backward = numba_backend.expert_mixture_backward
    monkeypatch.setattr(numba_backend, "expert_mixture_backward",
                        lambda *a, **k: calls.append(1) or real_backward(*a, **k))
    torch.manual_seed(0)
    x, y = make_synthetic(256, d=16, correlation=0.5, seed=0)
    model = mf.MMoE(16, 2, num_experts=4, expert_hidden=8, task_types=("regression", "regression"))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert calls, "the numba backend did not run"
    assert losses[-1] < 0.7 * losses[0], losses


def test_warmup_reports_the_compile_time_once():
    numba_backend.warmup()  # compiles, or finds compiled, both dtypes
    assert set(numba_backend.compile_seconds) == set(DTYPES)
    assert numba_backend.warmup() == 0.0  # nothing left to compile


_IMPORT_COPY = textwrap.dedent("""
    import numba_kernels as nk
    print(type(nk.expert_mixture._cache).__name__, nk._cdiv(7, 2))
""")


def _import_copy(tmp_path, env):
    """Import a copy of the kernels module whose own __pycache__ cannot be created (a file is in the way)."""
    pkg = tmp_path / "readonly_install"
    pkg.mkdir()
    shutil.copy(numba_kernels.__file__, pkg / "numba_kernels.py")
    (pkg / "__pycache__").write_text("not a directory")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE")} | env
    done = subprocess.run([sys.executable, "-c", _IMPORT_COPY], cwd=pkg, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_cache_moves_to_the_user_cache_dir_when_the_install_is_read_only(tmp_path):
    cache, result = _import_copy(tmp_path, {"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert (cache, result) == ("FunctionCache", "4")
    assert (tmp_path / "cache" / "numba").is_dir()


def test_kernels_still_import_and_run_when_no_cache_dir_is_writable(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so nothing can be created below it")
    cache, result = _import_copy(tmp_path, {"XDG_CACHE_HOME": str(blocker / "cache"), "HOME": str(blocker)})
    assert (cache, result) == ("NullCache", "4")


def test_loading_the_backend_keeps_torchs_thread_count():
    """numba's OpenMP pool shares libgomp with torch and would reset its thread count on start."""
    code = ("import torch; torch.set_num_threads(1); from mmoe_fast.backends import numba as nb; "
            "nb.gate_softmax(torch.randn(3, 5), torch.randn(2, 5, 2), None); print(torch.get_num_threads())")
    env = os.environ | {"NUMBA_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"
