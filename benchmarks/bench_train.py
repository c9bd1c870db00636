"""CPU benchmark: one training step of a whole multi-task model, mmoe_fast against what a user could write instead.

Step = zero_grad, forward, BCE-with-logits (mean over the batch) summed over tasks, backward, Adam(lr=1e-3).step:
- ``mmoe_fast``: ``mf.MMoE(D, T, num_experts=E, expert_hidden=H, tower_hidden=...)`` on ``backend="auto"``, in the
  step ``fit`` takes: no autograd at all (``train.fused_step``: at small batches the whole step is one C++ call,
  else the kernels with the loss gradient formed directly); fit's Adam (torch's fused kernel, its state kept
  ready between steps: the same update bit for bit);
- ``mmoe_fast (autograd)``: the same model under ``loss.backward()`` (one autograd node for the whole model) and
  torch's fused Adam, as the others below;
- ``batched eager``: plain PyTorch, one GEMM for every expert, one for every gate, softmax, one bmm mixture,
  the same towers (``BatchedMMoE`` below);
- ``torch.compile``: ``torch.compile`` of that module (the whole step's forward and backward graphs);
- ``loop``: ``nn.ModuleList``s of experts and gates, one at a time, as peer libraries write it.
The limit is 3 x the forward's FLOPs (forward, weight and input gradients) at the best GEMM rate measured in
the same run: torch.mm, onnxruntime's MatMul and numpy's OpenBLAS (run in a child process with
``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` unset, which otherwise cap it), each on the cell's expert GEMM.
Each figure is the best of interleaved passes' medians, all contenders side by side in one process.
``--breakdown`` prints instead where mmoe_fast's step goes in each cell (cProfile: torch's GEMMs, the C++
kernels, the Adam kernel, the rest).

Run: python benchmarks/bench_train.py [--quick] [--no-compile] [--write benchmarks/RESULTS.md] [--plot F.png]
     python benchmarks/bench_train.py --breakdown
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import json
import os
import pstats
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mmoe_fast as mf
from mmoe_fast import timing
from mmoe_fast.models.common import mlp
from mmoe_fast.timing import format_ratio, format_time
from mmoe_fast.train import fused_step, make_optimizer


@dataclass(frozen=True)
class Cell:
    name: str
    D: int
    E: int
    experts: tuple[int, ...]  # expert layer widths; the last is H
    T: int
    towers: tuple[int, ...]
    B: int

    def __str__(self) -> str:
        return f"{self.name} D={self.D} E={self.E} experts={list(self.experts)} T={self.T} / B={self.B}"

    def forward_flops(self) -> int:
        widths = (self.D, *self.experts)
        experts = sum(k * n for k, n in zip(widths[:-1], widths[1:])) * self.E
        tw = (self.experts[-1], *self.towers, 1)
        towers = sum(k * n for k, n in zip(tw[:-1], tw[1:])) * self.T
        return 2 * self.B * (experts + self.D * self.T * self.E + self.T * self.E * self.experts[-1] + towers)


CELLS = (
    Cell("cfg1", 128, 8, (256,), 2, (8,), 1024),
    Cell("cfg1", 128, 8, (256,), 2, (8,), 8192),
    Cell("cfg2", 512, 16, (512,), 3, (8,), 1024),
    Cell("paper", 100, 8, (16,), 2, (8,), 128),
    Cell("paper", 100, 8, (16,), 2, (8,), 1024),
    Cell("deepctr", 128, 8, (256, 128), 2, (64,), 1024),
)
QUICK = (CELLS[0], CELLS[3])


class BatchedMMoE(nn.Module):
    """MMoE as a careful user writes it in plain PyTorch: all experts' first layer as one Linear, deeper expert
    layers as one batched matmul, all gates as one Linear, softmax, the mixture as one bmm, then the towers."""

    def __init__(self, D: int, E: int, experts: tuple[int, ...], T: int, towers: tuple[int, ...]) -> None:
        super().__init__()
        self.E, self.T = E, T
        self.first = nn.Linear(D, E * experts[0])
        self.deeper = nn.ParameterList()
        for k, n in zip(experts[:-1], experts[1:]):
            self.deeper.append(nn.Parameter(torch.randn(E, k, n) / k**0.5))
            self.deeper.append(nn.Parameter(torch.zeros(E, 1, n)))
        self.gates = nn.Linear(D, T * E)
        self.towers = nn.ModuleList(mlp((experts[-1], *towers), 1) for _ in range(T))

    def forward(self, x):
        h = torch.relu(self.first(x)).view(x.shape[0], self.E, -1).transpose(0, 1)  # [E, B, H1]
        for i in range(0, len(self.deeper), 2):
            h = torch.relu(torch.baddbmm(self.deeper[i + 1], h, self.deeper[i]))
        g = torch.softmax(self.gates(x).view(x.shape[0], self.T, self.E), dim=-1)  # [B, T, E]
        m = torch.bmm(g, h.transpose(0, 1))  # [B, T, H]
        return torch.cat([tower(m[:, t]) for t, tower in enumerate(self.towers)], dim=1)


class LoopMMoE(nn.Module):
    """MMoE as peer libraries write it: a ModuleList of expert MLPs and one of gates, a loop over each."""

    def __init__(self, D: int, E: int, experts: tuple[int, ...], T: int, towers: tuple[int, ...]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(*mlp((D, *experts), None), nn.ReLU()) for _ in range(E))
        self.gates = nn.ModuleList(nn.Linear(D, E) for _ in range(T))
        self.towers = nn.ModuleList(mlp((experts[-1], *towers), 1) for _ in range(T))

    def forward(self, x):
        f = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, H]
        outs = []
        for gate, tower in zip(self.gates, self.towers):
            g = torch.softmax(gate(x), dim=-1).unsqueeze(1)  # [B, 1, E]
            outs.append(tower(torch.bmm(g, f).squeeze(1)))
        return torch.cat(outs, dim=1)


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The plain PyTorch step with torch's fastest Adam on CPU (``fused=True``)."""
    forward = model
    opt = torch.optim.Adam(getattr(model, "_orig_mod", model).parameters(), lr=1e-3, fused=True)  # compiled: its own

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(forward(x), y, reduction="none").mean(0).sum()
        loss.backward()
        opt.step()

    return step


def fit_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The step ``mmoe_fast.train.fit`` takes (less its bookkeeping): where the model offers it, no autograd
    (``train.fused_step``: the whole step in one C++ call at small batches, else the forward's kernels, the loss
    sums and their gradient in one pass, the backward's kernels into ``.grad``), else ``loss.backward()``; then fit's
    optimizer (``make_optimizer``: torch's fused Adam kernel, its state kept ready between steps)."""
    opt = make_optimizer("adam", model, lr=1e-3)
    weights = torch.ones(len(model.task_types))
    if fused_step(model, opt, x, y, None, x.shape[0], weights) is None:
        def autograd_step():
            opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(x), y, reduction="none").mean(0).sum().backward()
            opt.step()

        return autograd_step

    def step():
        fused_step(model, opt, x, y, None, x.shape[0], weights)
        opt.step()

    return step


def contenders(cell: Cell, x, y, compile_: bool) -> dict:
    torch.manual_seed(0)
    model = mf.MMoE(cell.D, cell.T, num_experts=cell.E, expert_hidden=cell.experts, tower_hidden=cell.towers)
    fns = {"mmoe_fast": fit_step_fn(model, x, y),
           "mmoe_fast (autograd)": step_fn(copy.deepcopy(model), x, y),
           "batched eager": step_fn(BatchedMMoE(cell.D, cell.E, cell.experts, cell.T, cell.towers), x, y)}
    if compile_:
        compiled = torch.compile(BatchedMMoE(cell.D, cell.E, cell.experts, cell.T, cell.towers), dynamic=False)
        fns["torch.compile"] = step_fn(compiled, x, y)
        fns["torch.compile"]()  # compiles outside the timing
    fns["loop"] = step_fn(LoopMMoE(cell.D, cell.E, cell.experts, cell.T, cell.towers), x, y)
    return fns


_OPENBLAS = """
import json, sys, time, numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
n, k, m, threads = map(int, sys.argv[1:5])
a, b = np.random.rand(n, k).astype(np.float32), np.random.rand(k, m).astype(np.float32)
with threadpool_limits(threads):
    for _ in range(3):
        a @ b
    times = []
    for _ in range(15):
        t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
info = [i.get("architecture") for i in threadpool_info() if i["internal_api"] == "openblas"]
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "kernel": info[0] if info else None}))
"""


def gemm_rates(n: int, k: int, m: int, threads: int) -> dict[str, float]:
    """FLOP/s of [n, k] x [k, m] in fp32 by each GEMM library at hand (the best is the roof)."""
    flops = 2.0 * n * k * m
    a, b = torch.randn(n, k), torch.randn(k, m)
    out = torch.empty(n, m)
    rates = {"torch.mm (MKL)": flops / timing.median_time(lambda: torch.mm(a, b, out=out), min_time=0.3)}
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        w = np.random.rand(k, m).astype(np.float32)
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, m])],
                                  [numpy_helper.from_array(w, "w")])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(helper.make_model(graph).SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        xn = np.random.rand(n, k).astype(np.float32)
        rates["onnxruntime MatMul (MLAS)"] = flops / timing.median_time(lambda: sess.run(None, {"x": xn}),
                                                                       min_time=0.3)
        del onnx
    except ModuleNotFoundError:
        pass
    env = {k_: v for k_, v in os.environ.items() if k_ not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    try:
        done = subprocess.run([sys.executable, "-c", _OPENBLAS, str(n), str(k), str(m), str(threads)], env=env,
                              capture_output=True, text=True, timeout=120, check=True)
        res = json.loads(done.stdout)
        rates[f"numpy OpenBLAS ({res['kernel']})"] = flops / res["seconds"]
    except (subprocess.SubprocessError, ValueError, KeyError):
        pass
    return rates


def run(cells, passes: int, min_time: float, compile_: bool, threads: int) -> list[dict]:
    rows = []
    for cell in cells:
        x, y = torch.randn(cell.B, cell.D), (torch.rand(cell.B, cell.T) > 0.5).float()
        fns = contenders(cell, x, y, compile_)
        times = {name: t.best for name, t in timing.interleaved(fns, passes=passes, min_time=min_time).items()}
        rates = gemm_rates(cell.B, cell.D, cell.E * cell.experts[0], threads)
        roof = max(rates.values())
        limit = 3 * cell.forward_flops() / roof
        others = {k: v for k, v in times.items() if not k.startswith("mmoe_fast")}
        best = min(others, key=others.get)
        row = dict(cell=str(cell), name=cell.name, B=cell.B, times=times, best=best, limit=limit,
                   roof=roof, rates=rates)
        rows.append(row)
        print(f"{cell}: " + ", ".join(f"{k} {format_time(v)}" for k, v in times.items())
              + f"; mmoe_fast / best ({best}) = {format_ratio(times['mmoe_fast'], times[best])}; limit "
              f"{format_time(limit)} at {roof / 1e9:.0f} GFLOP/s", flush=True)
    return rows


def render(rows: list[dict], command: str, threads: int, plot_path: Path | None = None) -> str:
    names = list(rows[0]["times"])
    lines = [f"## CPU: a training step (bench_train.py, {datetime.date.today()})", "",
             f"Command: `{command}`  ",
             f"Machine: {os.cpu_count()} CPUs, {threads} threads; torch {torch.__version__}; _C instruction set: "
             f"{mf.backends.cpp.isa()}; {timing.conditions()}.  ",
             "Step: zero_grad, forward, BCE-with-logits summed over tasks, backward, Adam. mmoe_fast: the step `fit` "
             "takes (no autograd; fit's Adam); every other column: `loss.backward()` and "
             "torch's `Adam(fused=True)`; "
             "towers of the cell's widths, float32. Each figure: best of the interleaved passes' medians, one process."
             + (f" Drawn in `{plot_path}`." if plot_path else ""),
             "", "| cell | " + " | ".join(names) + " | mmoe_fast / best | limit | mmoe_fast / limit |",
             "|---|" + "---:|" * (len(names) + 3)]
    for r in rows:
        t = r["times"]
        lines.append(f"| {r['cell']} | " + " | ".join(format_time(t[n]) for n in names)
                     + f" | {format_ratio(t['mmoe_fast'], t[r['best']])} ({r['best']}) | {format_time(r['limit'])} | "
                     f"{format_ratio(t['mmoe_fast'], r['limit'])} |")
    lines += ["", "The limit is 3 x forward FLOPs at the best fp32 GEMM rate measured in the run on the cell's expert "
              "GEMM: " + "; ".join(f"{r['cell'].split(' / ')[0]} B={r['B']}: " + ", ".join(
                  f"{k} {v / 1e9:.0f}" for k, v in r["rates"].items()) + " GFLOP/s" for r in rows) + "."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["times"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [f"{r['name']}\nB={r['B']}" for r in rows]
    width = 0.8 / (len(names) + 1)
    for i, name in enumerate([*names, "limit"]):
        ratios = [(r["limit"] if name == "limit" else r["times"][name]) / r["times"]["mmoe_fast"] for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], ratios, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(2.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([j + width * len(names) / 2 for j in range(len(rows))], labels)
    ax.set_ylabel("step time / mmoe_fast's (higher: mmoe_fast faster)")
    ax.set_title("Training step, CPU, 2 threads (dashed: the 2x target; 'limit': 3x forward FLOPs at the GEMM roof)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def breakdown(cells, steps: int = 40) -> str:
    """Where ``fit``'s step goes, per cell: ``steps`` steps under cProfile, the time of each call grouped as torch's
    GEMMs, the C++ kernels (``_C``), the Adam kernel and the rest (Python, small torch ops), per step."""
    lines = []
    for cell in cells:
        torch.manual_seed(0)
        x, y = torch.randn(cell.B, cell.D), (torch.rand(cell.B, cell.T) > 0.5).float()
        model = mf.MMoE(cell.D, cell.T, num_experts=cell.E, expert_hidden=cell.experts, tower_hidden=cell.towers)
        step = fit_step_fn(model, x, y)
        for _ in range(5):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(steps):
            step()
        profile.disable()
        groups: dict[str, float] = {}
        for (_, _, name), (_, _, own, _, _) in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
            if "_fused_adam" in name:
                group = "Adam kernel"
            elif "mmoe_fast._C." in name:
                group = "C++ kernels"
            elif name.startswith("<built-in method torch.") and name.rstrip(">").split(".")[-1] in (
                    "mm", "bmm", "addmm", "baddbmm"):
                group = "torch GEMMs"
            else:
                group = "the rest"
            groups[group] = groups.get(group, 0.0) + own / steps
        parts = ", ".join(f"{g} {format_time(t)}" for g, t in sorted(groups.items(), key=lambda kv: -kv[1]))
        lines.append(f"{cell}: {format_time(wall)} a step ({format_time(sum(groups.values()))} profiled): {parts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per contender per pass")
    parser.add_argument("--quick", action="store_true", help="two cells, two passes (a smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    parser.add_argument("--write", type=Path, help="replace this benchmark's section of that markdown file")
    parser.add_argument("--plot", type=Path, help="draw the ratios to that PNG file")
    parser.add_argument("--breakdown", action="store_true",
                        help="only where mmoe_fast's step goes: GEMMs, C++ kernels, Adam, the rest (cProfile)")
    args = parser.parse_args(argv)
    timing.raise_priority()
    torch.set_num_threads(args.threads)
    cells = QUICK if args.quick else CELLS
    if args.breakdown:
        print(breakdown(cells))
        return 0
    rows = run(cells, 2 if args.quick else args.passes, 0.05 if args.quick else args.min_time, not args.no_compile,
               args.threads)
    command = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = render(rows, command.strip(), args.threads, args.plot)
    print(text)
    if args.write:
        timing.write_section(args.write, "bench_train", text)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
