"""CPU benchmark: many small training runs at once, per run-step, at the paper's size.

The model: MMoE with D=100 inputs, 8 experts of 16 units, towers of 8, 2 regression tasks, batches of 128 (the
synthetic study's). Each contender trains S independent runs (own data order, own weights, own Adam state) for
``--steps`` steps; the figure is its wall time per run and step, setup included:
- ``fit, one run at a time``: ``mmoe_fast.fit`` (its autograd-free fused step, fused Adam);
- ``fit_many S=..``: ``mmoe_fast.fit_many`` on S models (packed: one C++ call a step, each run's GEMMs, gradients
  and Adam update in its thread);
- ``stacked eager S=..``: plain PyTorch written for S replicas at once (every weight with a leading S dimension:
  ``baddbmm`` for the experts and the gates, softmax, a batched matmul for the mixture, einsum towers, autograd,
  torch's ``Adam(fused=True)``): the best form a user could write by hand;
- ``torch.compile`` of that step's model (``--no-compile`` skips it);
- ``torch.func vmap S=..``: the standard ensembling idiom on S ``mf.MMoE`` models (``stack_module_state``,
  ``vmap(grad(...))`` of ``functional_call``, torch's ``Adam(fused=True)`` on the stacked weights), its fused ops
  through their vmap rules: the C++ kernels over S replicas per call (``--loop-vmap`` adds the same with one
  call per slice, the rule before replica kernels).
The limit is the step's unavoidable GEMM work (the experts' and gates' forward and weight gradient: the input
needs none) at the best GEMM rate measured in the same run (``bench_train.gemm_rates``: torch.mm, onnxruntime,
OpenBLAS), per run-step. Contenders are timed in interleaved passes; each figure is the best pass's median.

Run: python benchmarks/bench_fit_many.py [--runs 64,256] [--steps 200] [--passes 3] [--loop-vmap]
     [--write benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path

import torch
from torch import nn

import mmoe_fast as mf
from mmoe_fast import timing
from mmoe_fast.backends import cpp as cpp_backend
from mmoe_fast.timing import format_ratio, format_time
from mmoe_fast.train import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import gemm_rates  # noqa: E402

D, E, H, T, TOWER, B = 100, 8, 16, 2, 8, 128
N_ROWS = 10_000  # the synthetic study's training rows


class StackedMMoE(nn.Module):
    """S MMoE replicas as one plain-PyTorch module: every parameter has a leading replica dimension."""

    def __init__(self, S: int) -> None:
        super().__init__()

        def init(*shape, fan_in):
            return nn.Parameter(torch.empty(*shape).uniform_(-fan_in ** -0.5, fan_in ** -0.5))

        self.w, self.b = init(S, D, E * H, fan_in=D), init(S, E * H, fan_in=D)
        self.wg, self.bg = init(S, D, T * E, fan_in=D), init(S, T * E, fan_in=D)
        self.w1, self.b1 = init(S, T, TOWER, H, fan_in=H), init(S, T, TOWER, fan_in=H)
        self.w2, self.b2 = init(S, T, TOWER, fan_in=TOWER), init(S, T, fan_in=TOWER)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x[S, B, D] -> [S, B, T]
        S, n, _ = x.shape
        f = torch.relu(torch.baddbmm(self.b[:, None], x, self.w)).view(S, n, E, H)
        g = torch.softmax(torch.baddbmm(self.bg[:, None], x, self.wg).view(S, n, T, E), -1)
        m = torch.matmul(g, f)  # [S, B, T, H]
        h = torch.relu(torch.einsum("sbth,stnh->sbtn", m, self.w1) + self.b1[:, None])
        return torch.einsum("sbtn,stn->sbt", h, self.w2) + self.b2[:, None]


def stacked_runner(S: int, steps: int, x: torch.Tensor, y: torch.Tensor, compile_: bool):
    """A function that trains S stacked replicas ``steps`` steps (MSE per task, mean over the batch, Adam)."""
    model = StackedMMoE(S)
    forward = torch.compile(model) if compile_ else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    gens = [torch.Generator().manual_seed(s) for s in range(S)]

    def run() -> None:
        orders = torch.stack([torch.randperm(len(x), generator=g) for g in gens])
        for i in range(steps):
            index = orders[:, (i * B) % (len(x) - B) :][:, :B].reshape(-1)
            xb, yb = x[index].view(S, B, D), y[index].view(S, B, T)
            opt.zero_grad(set_to_none=True)
            loss = (forward(xb) - yb).square().mean(1).sum()  # each replica's loss is its own: summed, not mixed
            loss.backward()
            opt.step()

    return run


def func_runner(one: nn.Module, S: int, steps: int, x: torch.Tensor, y: torch.Tensor, loop: bool):
    """A function that trains S copies of ``one`` ``steps`` steps through ``torch.func`` (MSE per task, mean over
    the batch, Adam); ``loop``: the ops' vmap rules run one call per slice (the C++ replica kernels hidden)."""
    params, buffers = torch.func.stack_module_state([copy.deepcopy(one) for _ in range(S)])
    base = copy.deepcopy(one).to("meta")

    def loss(p, b, xb, yb):
        return (torch.func.functional_call(base, (p, b), (xb,)) - yb).square().mean(0).sum()

    step = torch.func.vmap(torch.func.grad(loss))
    leaves = list(params.values())
    opt = torch.optim.Adam(leaves, lr=1e-3, fused=True)
    gens = [torch.Generator().manual_seed(s) for s in range(S)]
    kernels = [name for name in dir(cpp_backend) if name.endswith("_replicas")]

    def run() -> None:
        hidden = {name: getattr(cpp_backend, name) for name in kernels}
        if loop:
            for name in kernels:
                setattr(cpp_backend, name, None)
        try:
            orders = torch.stack([torch.randperm(len(x), generator=g) for g in gens])
            for i in range(steps):
                index = orders[:, (i * B) % (len(x) - B) :][:, :B].reshape(-1)
                xb, yb = x.index_select(0, index).view(S, B, D), y.index_select(0, index).view(S, B, T)
                grads = step(params, buffers, xb, yb)
                for p, key in zip(leaves, params):
                    p.grad = grads[key]
                opt.step()
        finally:
            for name, fn in hidden.items():
                setattr(cpp_backend, name, fn)

    run.params = params  # the stacked weights it trains
    return run


def contenders(sizes: list[int], steps: int, compile_: bool, loop_vmap: bool = False) -> tuple[dict, dict]:
    """``({name: fn}, {name: run-steps per call})``."""
    x, y = torch.randn(N_ROWS, D), torch.randn(N_ROWS, T)
    options = dict(num_experts=E, expert_hidden=H, tower_hidden=(TOWER,), task_types=["regression"] * T)
    quiet = dict(steps=steps, batch_size=B, progress=False, log=lambda _: None)
    one = mf.MMoE(D, T, **options)
    fns = {"fit, one run at a time": lambda: fit(one, x, y, **quiet)}
    per_call = {"fit, one run at a time": steps}
    for S in sizes:
        models = [copy.deepcopy(one) for _ in range(S)]
        fns[f"fit_many S={S}"] = lambda models=models: mf.fit_many(models, x, y, packed=True, **quiet)
        fns[f"stacked eager S={S}"] = stacked_runner(S, steps, x, y, False)
        fns[f"torch.func vmap S={S}"] = func_runner(one, S, steps, x, y, False)
        per_call[f"fit_many S={S}"] = per_call[f"stacked eager S={S}"] = per_call[f"torch.func vmap S={S}"] = steps * S
        if loop_vmap:
            fns[f"torch.func vmap, loop rule S={S}"] = func_runner(one, S, steps, x, y, True)
            per_call[f"torch.func vmap, loop rule S={S}"] = steps * S
        if compile_:
            fns[f"torch.compile S={S}"] = stacked_runner(S, steps, x, y, True)
            per_call[f"torch.compile S={S}"] = steps * S
    return fns, per_call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="64,256", help="numbers of runs trained at once (comma-separated)")
    parser.add_argument("--steps", type=int, default=200, help="steps per timed call (setup included)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--loop-vmap", action="store_true", help="also time torch.func with one op call per slice")
    parser.add_argument("--write", type=Path, help="replace this benchmark's section of that markdown file")
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.runs.split(",")]
    timing.raise_priority()
    torch.set_num_threads(args.threads)
    fns, per_call = contenders(sizes, args.steps, not args.no_compile, args.loop_vmap)
    for fn in fns.values():  # compile, warm caches
        fn()
    times = timing.interleaved(fns, passes=args.passes, min_time=0.0, min_reps=3, warmup=0)
    per_step = {name: t.best / per_call[name] for name, t in times.items()}
    rates = gemm_rates(max(sizes) * B, D, E * H + T * E, args.threads)
    roof = max(rates.values())
    limit = 2 * 2 * B * D * (E * H + T * E) / roof  # forward and weight gradient of the first layer
    fit_step = per_step["fit, one run at a time"]
    command = "python benchmarks/bench_fit_many.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"## CPU: many runs at once (bench_fit_many.py, {datetime.date.today()})", "",
             f"Command: `{command.strip()}`  ",
             f"{args.threads} threads, torch {torch.__version__}, {timing.conditions()}; MMoE D={D}, {E} experts "
             f"x {H}, towers of {TOWER}, T={T} regression, B={B}, float32; {args.steps} steps per call, setup "
             f"included; best of {args.passes} interleaved passes' medians. Limit: the first layer's forward and "
             f"weight-gradient GEMMs at {roof / 1e9:.0f} GFLOP/s (best of "
             f"{', '.join(f'{k} {v / 1e9:.0f}' for k, v in rates.items())}).",
             "", "| contender | per run-step | fit's step / this | this / limit |", "|---|---|---|---|"]
    for name, t in per_step.items():
        lines.append(f"| {name} | {format_time(t, us_digits=1)} | {format_ratio(fit_step, t)} | "
                     f"{format_ratio(t, limit)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        timing.write_section(args.write, "bench_fit_many", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
