"""CPU benchmark: inference latency and a training step of a whole MMoE model, every CPU contender, one run.

Model: MMoE(D=128, T=2, E=8 experts of one layer H=256, towers (8,)). Inference at B = 1, 8, 64, 512, 4096:
the eager loop form (mmoe_fast.reference, the peers' design), every CPU backend of
mmoe_fast.available_backends() (the model with backend=<name>, no grad; "reference" is the batched eager
form), torch.compile of the batched eager form, the cpp InferenceSession, onnxruntime on export_onnx
(when installed), and the floor: the one [B, D] x [D, E*H] GEMM the layer cannot avoid (torch.mm).
Training step (forward + backward + Adam) at B = 1024 for the same contenders. Each figure is the best of
5 interleaved passes' medians (see best_of_passes()), all in this one process; ratios against the cpp
InferenceSession (inference) and against the batched eager form (training).

Run: python benchmarks/bench_cpu.py [--write benchmarks/RESULTS.md] [--no-compile] [--min-time 0.5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

import mmoe_fast as mf
from mmoe_fast import reference, timing
from mmoe_fast.backends import reference as batched
from mmoe_fast.bench import contenders
from mmoe_fast.timing import format_ratio, format_time

D, E, H, T, TOWER = 128, 8, 256, 2, (8,)
BATCHES = (1, 8, 64, 512, 4096)
TRAIN_B = 1024
CPU = torch.device("cpu")
PASSES = 5


def best_of_passes(fns: dict, min_time: float) -> dict:
    """Seconds per call of each fn: the best of PASSES interleaved passes' medians, each pass timing every fn
    in turn for min_time / PASSES. This machine is shared: a busy spell can spoil a whole pass, so the best
    pass's median is the figure, as docs/design.md's "Measuring" says."""
    times = timing.interleaved(fns, passes=PASSES, min_time=min_time / PASSES, min_reps=3)
    return {name: t.best for name, t in times.items()}


def make_model(backend: str) -> mf.MMoE:
    torch.manual_seed(0)
    return mf.MMoE(D, T, num_experts=E, expert_hidden=H, tower_hidden=TOWER, backend=backend)


def loop_forward(model: mf.MMoE, x: torch.Tensor) -> torch.Tensor:
    """The peers' design: one expert and one task at a time (mmoe_fast.reference)."""
    layer = model.mixture
    m = reference.mmoe_layer(x, list(layer.expert_weights), list(layer.expert_biases), layer.gate_weight,
                             layer.gate_bias, layer.activation)
    return model.towers(m)


def batched_forward(model: mf.MMoE, x: torch.Tensor) -> torch.Tensor:
    """The batched eager form as plain torch code (the reference backend's functions), for torch.compile."""
    layer = model.mixture
    gates = batched.gate_softmax(x, layer.gate_weight, layer.gate_bias)
    m = batched.expert_mixture(x, layer.expert_weights[0], layer.expert_biases[0], gates, layer.activation)
    return model.towers(m)


def _label(name: str) -> str:
    return "batched eager (reference)" if name == "reference" else f"{name} (model, backend={name})"


def onnx_session(model: mf.MMoE, threads: int):
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        return None
    path = Path(tempfile.mkdtemp()) / "mmoe.onnx"
    mf.export_onnx(model, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def inference_contenders(x, base, models, compiled, ort_session, session, w_flat) -> dict[str, Callable[[], object]]:
    """Every inference contender on the batch x."""
    fns = {"eager loop form (mmoe_fast.reference)": lambda: loop_forward(base, x)}
    for name, model in models.items():
        fns[_label(name)] = lambda model=model: model(x)
    if compiled is not None:
        compiled(x)  # compile outside the timing
        fns["torch.compile(batched eager)"] = lambda: compiled(x)
    if ort_session is not None:
        xn = x.numpy()
        fns["onnxruntime (export_onnx)"] = lambda: ort_session.run(None, {"x": xn})
    fns["cpp InferenceSession.run"] = lambda: session.run(x)
    fns["floor: torch.mm [B,D]x[D,E*H]"] = lambda: torch.mm(x, w_flat)
    return fns


def bench_inference(min_time: float, compile_: bool, threads: int) -> dict[str, dict[int, float]]:
    base = make_model("reference").eval()
    session = mf.InferenceSession(base)
    ort_session = onnx_session(base, threads)
    models = {name: make_model(name).eval() for name in contenders(CPU, torch.float32)}
    compiled = torch.compile(lambda x: batched_forward(base, x), dynamic=False) if compile_ else None
    w_flat = base.mixture.expert_weights[0].detach().permute(1, 0, 2).reshape(D, E * H).contiguous()
    fns = {}
    with torch.no_grad():  # also while compiling: a change of grad mode would recompile
        for B in BATCHES:
            x = torch.randn(B, D)
            assert torch.allclose(session.run(x), base(x), rtol=1e-4, atol=1e-5), "session disagrees with the model"
            for name, fn in inference_contenders(x, base, models, compiled, ort_session, session, w_flat).items():
                fns[name, B] = fn
        # every pass goes over every batch size: a slow spell of the machine spoils one pass, not one column
        times = best_of_passes(fns, min_time)
    rows: dict[str, dict[int, float]] = {}
    for (name, B), t in times.items():
        rows.setdefault(name, {})[B] = t
    return rows


def bench_train(min_time: float, compile_: bool) -> dict[str, float]:
    x, y = torch.randn(TRAIN_B, D), torch.randn(TRAIN_B, T)

    def step_fn(model, forward):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            loss = torch.nn.functional.mse_loss(forward(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    loop_model = make_model("reference")
    fns = {"eager loop form (mmoe_fast.reference)": step_fn(loop_model, lambda v: loop_forward(loop_model, v))}
    for name in contenders(CPU, torch.float32):
        model = make_model(name)
        fns[_label(name)] = step_fn(model, model)
    if compile_:
        model = make_model("reference")
        fwd = torch.compile(lambda v: batched_forward(model, v), dynamic=False)
        fns["torch.compile(batched eager)"] = step_fn(model, fwd)
        fns["torch.compile(batched eager)"]()  # compile outside the timing
    return best_of_passes(fns, min_time)


def render(inf: dict[str, dict[int, float]], train: dict[str, float], command: str, threads: int) -> str:
    session = inf["cpp InferenceSession.run"]
    lines = [
        f"## CPU: inference latency and training step (bench_cpu.py, {datetime.date.today()})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {threads} threads; torch {torch.__version__}, "
        f"_C instruction set: {mf.backends.cpp._C.isa() if mf.backends.cpp._C else 'not built'}; "
        f"{timing.conditions()}.  ",
        f"Model: MMoE D={D}, E={E}, H={H}, T={T}, towers {TOWER}, float32. One run, one process; each figure is "
        f"the best of {PASSES} interleaved passes' medians (the machine is shared with other jobs).",
        "",
        "Inference, whole model x[B, D] -> [B, T] (the floor is the layer's one GEMM alone):",
        "",
        "| contender | " + " | ".join(f"B={B}" for B in BATCHES) + " |",
        "|---|" + "---:|" * len(BATCHES),
    ]
    for name, times in inf.items():
        lines.append(f"| {name} | " + " | ".join(format_time(times[B], us_digits=1) for B in BATCHES) + " |")
    lines += ["", "The cpp InferenceSession's speed-up over each (x > 1: the session is faster; for the floor, "
              "floor / session: 1.00x = at the floor):", "",
              "| vs | " + " | ".join(f"B={B}" for B in BATCHES) + " |", "|---|" + "---:|" * len(BATCHES)]
    for name, times in inf.items():
        if name != "cpp InferenceSession.run":
            lines.append(f"| {name} | " + " | ".join(format_ratio(times[B], session[B]) for B in BATCHES) + " |")
    eager = train.get(_label("reference"))
    lines += ["", f"Training step (forward + backward + Adam) at B={TRAIN_B}:", "",
              "| contender | step | batched eager / contender |", "|---|---:|---:|"]
    for name, t in train.items():
        lines.append(f"| {name} | {format_time(t, us_digits=1)} | {format_ratio(eager, t)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per contender and batch size")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    parser.add_argument("--write", type=Path, help="replace this benchmark's section of that markdown file")
    args = parser.parse_args(argv)
    timing.raise_priority()
    torch.set_num_threads(args.threads)  # OpenMP is shared with _C, so this sets the kernels' threads too
    command = "python benchmarks/bench_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    inf = bench_inference(args.min_time, not args.no_compile, args.threads)
    train = bench_train(args.min_time, not args.no_compile)
    text = render(inf, train, command.strip(), args.threads)
    print(text)
    if args.write:
        timing.write_section(args.write, "bench_cpu", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
