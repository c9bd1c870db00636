"""GPU check of the triton backend: correctness first, then timings against the best forms a user could pick.

Correctness: forward and every gradient of a layer against the float64 loop reference, for fp32 with
ieee and with tf32 dots (operands rounded to nearest, as the interpreter checks on the CPU), bf16, fp16
and fp64, every buffer the backend allocates filled with NaN first. ReLU only where a kink-free seed
exists (``correctness_cases``; a test checks it): elsewhere smooth activations, so no seed search runs.
Timings (``triton.testing.do_bench`` medians, one process): one MMoE layer, forward (no_grad) and
forward+backward, for the triton backend, batched eager in the input dtype (cuBLAS bf16 / tf32 / fp32,
as ``torch.set_float32_matmul_precision`` says), ``torch.compile`` of that same math, and the loop form,
next to the roofs measured in the same run (a big ``torch.mm`` in the dtype, a big copy); a summary table last.
Replicas (the ops' vmap rules, one launch per kernel for S models): correctness of S layers under ``vmap``
against the float64 reference replica by replica; timings of S paper-sized layers at once, forward and
forward + every gradient, against the same op called once per replica and the batched eager form over S.

    benchmarks/gpu_check.sh           # on a GPU: both parts, within 8 minutes on an H100/H200
    MMOE_FAST_TRITON_AUTOTUNE=0 python benchmarks/bench_gpu.py --part correctness
    python benchmarks/bench_gpu.py --part timings [--json FILE]
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --smoke   # both parts, tiny shapes, CPU, interpreter
The correctness part launches each kernel's first config without timing it (``MMOE_FAST_TRITON_AUTOTUNE=0``:
autotuning every shape would compile and time hundreds of kernels); the timings part autotunes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_package():
    """mmoe_fast from an install, or from this source tree (a lent GPU runs it without installing)."""
    if importlib.util.find_spec("mmoe_fast") is None:
        sys.path.insert(0, str(ROOT))


_import_package()
import mmoe_fast as mf  # noqa: E402
from mmoe_fast import reference, timing  # noqa: E402
from mmoe_fast.backends import triton as tb  # noqa: E402
from mmoe_fast.testing import SHAPES, Shape, assert_close, check_layer, make_inputs  # noqa: E402

BIG = (512, 16, 512, 3)  # D, E, H, T of the headline GPU timing shape
PAPER = (100, 8, 16, 2)  # the paper's synthetic-data layer
# ReLU's derivative jumps at 0: only shapes small enough for a kink-free seed (testing.kink_free_seed)
# check it, in fp32 ieee and fp64; the big and the low-precision cases use smooth activations.
RELU_SHAPES = (SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[5])
BIG_SHAPES = (Shape(1000, 64, 8, 96, 5), Shape(2049, 512, 16, 512, 3))
WIDE_GATE = Shape(300, 40, 200, 24, 2)  # E > 64: the gate's two-pass (online) softmax
REPLICA_SHAPE = Shape(37, 20, 5, 18, 3)  # the replicas' correctness check: no size a multiple of a block


def correctness_cases(smoke: bool) -> list[tuple]:
    """(dtype, fp32 precision or None, shape, activation, hidden layers) of the correctness part."""
    if smoke:
        return [(torch.float32, "ieee", SHAPES[1], "relu", ()), (torch.float32, "tf32", SHAPES[6], "gelu", (33,)),
                (torch.bfloat16, None, SHAPES[6], "silu", ())]
    cases = [(torch.float32, "ieee", s, "relu", h) for s, h in zip(RELU_SHAPES, ((), (), (33,), ()))]
    cases += [(torch.float64, None, s, "relu", h) for s, h in zip(RELU_SHAPES[1:3], ((33,), ()))]
    smooth = ("gelu", "silu")
    for dtype, prec in ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, None),
                        (torch.float16, None)):
        shapes = list(BIG_SHAPES) + ([] if prec == "ieee" else [RELU_SHAPES[2 if prec else 0]])
        cases += [(dtype, prec, s, smooth[i % 2], (33,) if i == 0 else ()) for i, s in enumerate(shapes)]
    cases.append((torch.float32, "tf32", WIDE_GATE, "gelu", ()))
    cases.append((torch.bfloat16, None, WIDE_GATE, "silu", ()))
    return cases


def _set_precision(precision: str | None) -> None:
    if precision is None:
        os.environ.pop(tb.PRECISION_ENV, None)
    else:
        os.environ[tb.PRECISION_ENV] = precision


def _poisoned(shape, dtype, device):
    """Every buffer the backend allocates starts as NaN: an element no program writes cannot pass."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _failure(what: str, exc: Exception) -> str:
    """A failed case as one line (printed now): the exception's type and its last line."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    line = f"{what}: {type(exc).__name__}: {text}"
    print(f"FAIL {line}", flush=True)
    return line


def correctness(device: str, smoke: bool) -> list[str]:
    """Run every check; return the failures (one line each)."""
    failures = []
    unpoisoned, tb._new = tb._new, _poisoned
    try:
        for dtype, prec, shape, activation, hidden in correctness_cases(smoke):
            _set_precision(prec)
            tol = tb.tolerance(dtype)
            what = f"{str(dtype)[6:]:9s} {prec or '':5s} {shape} {activation} hidden={hidden} tol={tol:.0e}"
            start = time.monotonic()
            try:
                check_layer("triton", shape, dtype=dtype, device=device, activation=activation, hidden=hidden,
                            tol=tol)
            except Exception as exc:  # noqa: BLE001 - a compile error in one case must not hide the others
                failures.append(_failure(what, exc))
            else:
                print(f"ok   {what} ({time.monotonic() - start:.1f} s)", flush=True)
        failures += replica_correctness(device, smoke)
    finally:
        tb._new = unpoisoned
        _set_precision(None)
    print("correctness: all passed" if not failures else f"correctness: {len(failures)} FAILED", flush=True)
    return failures


def _replica_params(shape: Shape, S: int, dtype, device, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """An MMoE layer's (x, W, b, Wg, bg) for S replicas, x shared and every weight [S, ...] (fit_many's
    case), and a gradient dm[T, B, H] of one replica's output."""
    B, D, E, H, T = shape.B, shape.D, shape.E, shape.H, shape.T
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)

    return [r(B, D), r(S, E, D, H, scale=D ** -0.5), r(S, E, H), r(S, T, D, E, scale=D ** -0.5), r(S, T, E)], \
        r(T, B, H)


def _replica_layer(activation: str, backend: str = "triton"):
    return torch.func.vmap(lambda *p: mf.mmoe(*p, activation=activation, backend=backend), in_dims=(None, 0, 0, 0, 0))


def replica_correctness(device: str, smoke: bool) -> list[str]:
    """S = 3 layers under ``vmap`` (x shared, weights per replica), forward and every gradient, against the
    float64 reference replica by replica, fp32 ieee and bf16, buffers poisoned with NaN."""
    failures = []
    S = 3
    for dtype, prec in ((torch.float32, "ieee"), (torch.bfloat16, None)):
        _set_precision(prec)
        tol = tb.tolerance(dtype)
        what = f"replicas S={S} {str(dtype)[6:]:9s} {prec or '':5s} {REPLICA_SHAPE} gelu tol={tol:.0e}"
        params, dm = _replica_params(REPLICA_SHAPE, S, dtype, device, seed=11)

        def loss(*p, backend="triton", dm=dm):
            return (mf.mmoe(*p, activation="gelu", backend=backend) * dm).sum()

        try:
            out = _replica_layer("gelu")(*params)
            grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2, 3, 4)), in_dims=(None, 0, 0, 0, 0))(*params)
            for s in range(S):
                one = [p.double() if i == 0 else p[s].double() for i, p in enumerate(params)]
                assert_close(out[s].double(), mf.mmoe(*one, activation="gelu", backend="reference"), tol,
                                        f"replica {s} forward")
                want = torch.func.grad(lambda *p, dm=dm: loss(*p, backend="reference", dm=dm.double()),
                                       argnums=(0, 1, 2, 3, 4))(*one)
                for k, (got, ref) in enumerate(zip(grads, want)):
                    assert_close(got[s].double(), ref, tol, f"replica {s} gradient {k}")
        except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others
            failures.append(_failure(what, exc))
        else:
            print(f"ok   {what}", flush=True)
    _set_precision(None)
    return failures


def ceilings(device: str, dtype: torch.dtype, smoke: bool) -> tuple[float, float]:
    """(FLOP/s of a big torch.mm in dtype, bytes/s of a big copy), measured now."""
    n = 256 if smoke else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / timing.kernel_time(lambda: torch.mm(a, b), device=device)
    src = torch.empty(2**22 if smoke else 2**28, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / timing.kernel_time(lambda: dst.copy_(src), device=device)
    return flops, bandwidth


def native_batched(x, W, b, Wg, bg):
    """One MMoE layer (relu) batched as a user writes it, in the input dtype throughout: two GEMMs on
    cuBLAS (bf16/fp16, or fp32 in the precision torch's matmul setting gives) and a batched mixture."""
    T, D, E = Wg.shape
    G = torch.softmax((x @ Wg.permute(1, 0, 2).reshape(D, T * E)).view(-1, T, E) + bg, dim=-1)
    f = torch.relu(torch.baddbmm(b[:, None], x.expand(E, -1, -1), W))  # [E, B, H]
    return torch.einsum("bte,ebh->tbh", G, f)


def layer_costs(B, D, E, H, T, itemsize) -> dict:
    """Model FLOPs and least bytes of one layer; fwd+bwd counts 3x the forward FLOPs (no recompute)."""
    flops = 2 * B * E * H * (D + T) + 2 * B * D * T * E
    weights = E * D * H + E * H + T * D * E + T * E
    fwd_bytes = itemsize * (B * D + weights + T * B * H)
    # backward: read dm, x and the weights, write dx and the weight gradients
    bwd_bytes = itemsize * (T * B * H + 2 * B * D + 2 * weights)
    return dict(fwd=(flops, fwd_bytes), fwdbwd=(3 * flops, fwd_bytes + bwd_bytes))


def _forward_and_backward_times(impls: dict, params: list, dm: torch.Tensor, device) -> dict:
    """{impl: (forward seconds under no_grad, forward + every gradient seconds)}, medians."""
    grads = [p.detach().requires_grad_() for p in params]
    times = {}
    for name, fn in impls.items():
        with torch.no_grad():
            fwd = timing.kernel_time(lambda fn=fn: fn(*params), device=device)
        fwdbwd = timing.kernel_time(lambda fn=fn: torch.autograd.grad(fn(*grads), grads, dm), device=device)
        times[name] = (fwd, fwdbwd)
    return times


def time_layer(device, dtype, B, dims, peak, compiled) -> tuple[list[str], dict, dict]:
    """(printed lines, {impl: (fwd s, fwd+bwd s)}, layer_costs) of one layer shape."""
    D, E, H, T = dims
    inp = make_inputs(Shape(B, D, E, H, T), dtype=dtype, device=device, seed=1)
    params = [inp["x"], inp["weights"][0], inp["biases"][0], inp["gate_weight"], inp["gate_bias"]]
    impls = {
        "triton": lambda *p: mf.mmoe(*p, activation="relu", backend="triton"),
        "batched eager": native_batched,
        "loop eager": lambda *p: reference.mmoe(*p, activation="relu"),
    }
    if compiled is not None:
        impls["torch.compile"] = compiled
    costs = layer_costs(B, D, E, H, T, params[0].element_size())
    times = _forward_and_backward_times(impls, params, torch.randn(T, B, H, device=device, dtype=dtype), device)
    lines = []
    for name, (fwd, fwdbwd) in times.items():
        cells = [f"{B:6d}", f"{name:14s}"]
        for i, (kind, sec) in enumerate((("fwd", fwd), ("fwdbwd", fwdbwd))):
            flops, nbytes = costs[kind]
            roof = max(flops / peak[0], nbytes / peak[1])
            cells.append(f"{sec * 1e3:9.3f} ms {flops / sec / 1e12:7.1f} TF/s {nbytes / sec / 1e9:7.1f} GB/s "
                         f"{100 * roof / sec:5.1f}% roof  x{sec / times['triton'][i]:5.2f}")
        lines.append(" | ".join(cells))
    return lines, times, costs


def replica_batched(x, W, b, Wg, bg):
    """S MMoE layers (relu) batched as a user writes them: x[B, D] shared, every weight [S, ...]; each
    einsum over x is one GEMM across every replica and expert."""
    G = torch.softmax(torch.einsum("bd,stde->sbte", x, Wg) + bg[:, None], dim=-1)
    f = torch.relu(torch.einsum("bd,sedh->sebh", x, W) + b[:, :, None])
    return torch.einsum("sbte,sebh->stbh", G, f)


def time_replicas(device, dtype, S, B, dims) -> tuple[list[str], dict]:
    """(printed lines, row) of S layers at once: forward and forward + every gradient for triton under
    ``vmap`` (one launch per kernel), the same op once per replica, and the batched eager form."""
    D, E, H, T = dims
    params, _ = _replica_params(Shape(B, D, E, H, T), S, dtype, device, seed=3)
    impls = {
        "triton vmap": _replica_layer("relu"),
        "triton loop": lambda x, W, b, Wg, bg: torch.stack(
            [mf.mmoe(x, W[s], b[s], Wg[s], bg[s], activation="relu", backend="triton") for s in range(S)]),
        "batched eager": replica_batched,
    }
    times = _forward_and_backward_times(impls, params, torch.randn(S, T, B, H, device=device, dtype=dtype), device)
    base = times["triton vmap"]
    lines = [f"{S:4d} {B:6d} | {name:13s} | fwd {f * 1e3:8.3f} ms x{f / base[0]:6.2f} | fwd+bwd {fb * 1e3:8.3f} ms "
             f"x{fb / base[1]:6.2f} | {fb / S * 1e6:7.1f} us a replica-step" for name, (f, fb) in times.items()]
    row = dict(kind="replicas", dtype=str(dtype)[6:], dims=list(dims), S=S, B=B,
               ms={name: [t * 1e3 for t in pair] for name, pair in times.items()})
    return lines, row


def summary_row(dtype, prec, dims, B, times, costs, peak) -> dict:
    """One row of the closing table: triton's time, % of the roof that binds, and each ratio."""
    row = dict(dtype=str(dtype)[6:], precision=prec or "", dims=list(dims), B=B)
    for i, kind in enumerate(("fwd", "fwdbwd")):
        flops, nbytes = costs[kind]
        sec = times["triton"][i]
        row[kind] = dict(ms=sec * 1e3, tflops=flops / sec / 1e12,
                         roof_pct=100 * max(flops / peak[0], nbytes / peak[1]) / sec,
                         **{f"x_{name}": t[i] / sec for name, t in times.items() if name != "triton"})
    return row


def summary_table(rows: list[dict]) -> list[str]:
    """Markdown: triton's forward and forward+backward per row, as % of roof and as speedups over the
    batched eager and compiled forms (> 1: triton is faster)."""
    out = ["| dtype | D,E,H,T | B | fwd ms | fwd % roof | fwd x eager | fwd x compile | fwd+bwd ms | "
           "fwd+bwd x eager | fwd+bwd x compile |", "|---|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in rows:
        if r.get("kind") == "replicas":
            continue
        f, fb = r["fwd"], r["fwdbwd"]
        out.append(f"| {r['dtype']} {r['precision']} | {','.join(map(str, r['dims']))} | {r['B']} | {f['ms']:.3f} | "
                   f"{f['roof_pct']:.0f}% | {f['x_batched eager']:.2f} | {f.get('x_torch.compile', nan):.2f} | "
                   f"{fb['ms']:.3f} | {fb['x_batched eager']:.2f} | {fb.get('x_torch.compile', nan):.2f} |")
    return out


def timings(device: str, smoke: bool, deadline: float, on_row=lambda rows: None) -> list[dict]:
    """The timing rows; ``on_row(rows)`` after each (the files are written then: a timeout loses nothing done)."""
    if smoke:
        plan = [(torch.float32, None, (16, 3, 16, 2), [17])]
    else:
        # The headline target first (bf16, B = 8192), in case the time budget runs out.
        plan = [(torch.bfloat16, None, BIG, [8192, 65536, 1024]), (torch.bfloat16, None, PAPER, [1024, 65536]),
                (torch.float32, "tf32", BIG, [8192]), (torch.float32, "ieee", BIG, [8192])]
    print("\nlayer timings: medians; TF/s and GB/s are model FLOPs and least bytes over the time; "
          "roof = the bound of the measured ceilings; xN = time / triton's time", flush=True)
    # dynamic=True: one compile serves every shape of a dtype (a recompile per B would not fit the budget)
    compiled = None if smoke else torch.compile(native_batched, dynamic=True)
    start = time.monotonic()
    rows = []
    for dtype, prec, dims, batches in plan:
        _set_precision(prec)
        torch.set_float32_matmul_precision("high" if prec == "tf32" else "highest")  # torch's fp32 GEMMs too
        peak = ceilings(device, dtype, smoke)
        print(f"\n{str(dtype)[6:]} {prec or ''} D,E,H,T={dims}: torch.mm {peak[0] / 1e12:.1f} TFLOP/s, "
              f"copy {peak[1] / 1e9:.0f} GB/s", flush=True)
        print(f"{'B':>6s} | {'impl':14s} | {'forward':^55s} | {'forward + backward':^55s}")
        for B in batches:
            if time.monotonic() > deadline:
                print(f"time budget spent: skipped B={B} and what follows", flush=True)
                return rows
            lines, times, costs = time_layer(device, dtype, B, dims, peak, compiled)
            for line in lines:
                print(line, flush=True)
            rows.append(summary_row(dtype, prec, dims, B, times, costs, peak))
            on_row(rows)
            print(f"  ({time.monotonic() - start:.0f} s into the timings: autotuning and compiling included)")
    _set_precision(None)
    torch.set_float32_matmul_precision("highest")
    # S models at once (fit_many's shape): the paper's layer, fp32 ieee (what the trainers run) and bf16
    print("\nreplicas: S layers at once, x shared, weights per replica; xN = time / triton vmap's time", flush=True)
    for dtype, S, B in ([(torch.float32, 3, 5)] if smoke else
                        [(torch.float32, 64, 128), (torch.bfloat16, 64, 128), (torch.float32, 256, 1024)]):
        if time.monotonic() > deadline - (0 if smoke else 45):  # a row autotunes its kernels for S: ~30-45 s
            print(f"time budget spent: skipped the replicas from S={S} B={B} {dtype} on", flush=True)
            return rows
        dims = (16, 3, 16, 2) if smoke else PAPER
        lines, row = time_replicas(device, dtype, S, B, dims)
        print(f"{str(dtype)[6:]} D,E,H,T={dims}\n" + "\n".join(lines), flush=True)
        rows.append(row)
        on_row(rows)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--part", choices=("all", "correctness", "timings"), default="all")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds before timings stop")
    parser.add_argument("--json", default="", help="write the correctness failures and timing rows here")
    parser.add_argument("--tuned-out", default="", help="write the autotuner's picks here, as a table for "
                        "mmoe_fast/kernels/tuned_configs.json")
    args = parser.parse_args()
    start = time.monotonic()
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) to check this script on the CPU")
        return 2
    if device == "cuda":
        timing.raise_priority()  # not in --smoke: the test suite runs that
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {importlib.import_module('triton').__version__}, host {timing.conditions()}", flush=True)
    failures = correctness(device, args.smoke) if args.part in ("all", "correctness") else []

    def save(rows: list[dict]) -> None:
        if args.tuned_out:
            from mmoe_fast.kernels import common

            about = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
                         torch=torch.__version__, date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv))
            Path(args.tuned_out).write_text(json.dumps(common.tuned_table(**about), indent=1))
        if args.json:
            with open(args.json, "w") as out:
                json.dump(dict(failures=failures, rows=rows, seconds=time.monotonic() - start), out, indent=1)

    rows = timings(device, args.smoke, start + args.budget, save) if args.part in ("all", "timings") else []
    if rows:
        print("\nsummary: triton's time, % of the roof that binds, and speedups (> 1: triton faster)")
        print("\n".join(summary_table(rows)))
        big = [r for r in rows if r.get("kind") != "replicas" and r["dims"] == list(BIG) and r["B"] == 8192
               and r["dtype"] == "bfloat16"]
        if big and "x_torch.compile" in big[0]["fwd"]:
            f, fb = big[0]["fwd"], big[0]["fwdbwd"]
            print(f"targets at bf16 B=8192 {BIG}: fwd+bwd {fb['x_batched eager']:.2f}x batched eager (>= 2), "
                  f"{fb['x_torch.compile']:.2f}x torch.compile (>= 1.3); fwd {f['x_batched eager']:.2f}x / "
                  f"{f['x_torch.compile']:.2f}x; forward at {f['roof_pct']:.0f}% of the roof that binds (>= 60%)")
    save(rows)
    print(f"\ntotal {time.monotonic() - start:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
