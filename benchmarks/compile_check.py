"""Compile every Triton kernel variant for an NVIDIA GPU without one, and check what the compiler made of it.

The interpreter runs the kernels' logic but not the compiler, which rejects things the interpreter
accepts (non-constexpr globals, dot shapes, layouts). This lowers each kernel, with the constexprs and
pointer dtypes its launcher in ``mmoe_fast/backends/triton.py`` really passes, for each autotune config and
input mode (fp32 with ieee and with tf32 dots, bf16, fp16; fp64 on request), to a cubin for ``--arch``
(sm_90: H100/H200) with Triton's bundled ptxas, twice: with the integer sizes and strides known to be
multiples of 16 (the benchmark shape, D = H = 512; E too for the gate kernels) and with nothing known
(D = 100, E = 8, odd H); each with the configs the kernel's prune keeps for such a launch (``common.aligned``).
Gate kernels run at every expert chunk width (E_BLOCK 16..64), the mixture backward up to T_PAD = 64.

Per variant it prints registers and spill bytes (bundled cuobjdump), shared memory (static + dynamic),
the configured stages, whether the PTX uses wgmma and whether the TTGIR pipelines the loads (async copies
to shared memory, cp.async or TMA, into a multi-buffer). It exits 1 on a compile failure, a spill, shared
memory over the arch's per-block limit, or a main GEMM kernel (``MAIN``) whose tf32/bf16/fp16 dot is not on
wgmma (sm_90) or, at aligned shapes, not pipelined (ieee fp32 has no wgmma; unaligned 2-byte rows are too
narrow for cp.async). Spills of fp64 variants are reported and counted, and fail only with ``--strict``
(fp64 is for checking results; a compile failure or shared memory over the limit always fails: the launch
would). The configs compiled are those each kernel's prune keeps for the variant: the ones a launch can run.

    python benchmarks/compile_check.py [--arch 90] [--quick] [--only NAME] [--dtypes fp32,bf16,fp16] [--jobs N]

``--quick`` (the test suite's): one activation, first config, fewer flags and unaligned variants.
Must run without TRITON_INTERPRET (the kernels are decorated once, for the interpreter or the compiler).
Works with Triton 3.6 and 3.9 (``PYTHONPATH=DIR_WITH_TRITON_3_6``; ``make compile-check TRITON36=DIR``).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check.py: unset TRITON_INTERPRET (the interpreter never compiles)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said out loud (it warns)
os.environ.setdefault("MMOE_FAST_TRITON_AUTOTUNE", "1")  # either works: _jit reads configs from both wrappers

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

if importlib.util.find_spec("mmoe_fast") is None:  # not installed: this source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmoe_fast.kernels import common, gating, linear, mixture  # noqa: E402

# mode -> (input dtype, fp32 dot precision the launcher passes: precision() for fp32, "tf32" otherwise)
MODES = {"fp32-ieee": ("fp32", "ieee"), "fp32-tf32": ("fp32", "tf32"), "bf16": ("bf16", "tf32"),
         "fp16": ("fp16", "tf32"), "fp64": ("fp64", "tf32")}
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
# Aligned set: the kernel's alignment arguments (``common.autotune``'s ``aligned_args``: sizes and row
# strides, E only for the gate kernels and input_grad) as multiples of 16, which Triton then specializes as
# such; B, T and the rest (E of the expert GEMMs) stay unknown, their worst case. The unaligned set marks no
# integer: a launch with any alignment argument not a multiple of 16 runs the unaligned configs, and with
# fewer of them known its loads can only get wider, so this set is the worst case of those launches.
# Pointers from torch are 16-byte aligned in both. So are the replica strides (``stride_*r``, between two
# replicas' tensors) in both: 0 in a single model's launch, and in a vmapped one a multiple of 16 wherever B or
# the weight sizes are (the paper's D=100 included: its weights hold E*D*H = 8*100*16 elements). A vmapped
# launch whose replica strides are not multiples of 16 (an odd B, T*E = 15) is not compiled here.
ALIGNED = common.ALIGNED_ARGS


def _aligned_args(kernel) -> frozenset:
    """The arguments whose divisibility by 16 decides a launch of ``kernel`` (``common.autotune``): marked
    in the aligned set. The rest stay unknown there (E for the expert GEMMs), their worst case."""
    return getattr(kernel, "aligned_args", ALIGNED)


def _replica_stride(arg: str) -> bool:
    return arg.startswith("stride_") and arg.endswith("r")
# Shared memory a block may use (static + dynamic, opt-in maximum), by arch.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# The GEMM kernels that carry the time: they must be on wgmma (sm_90) and pipelined where they can be.
MAIN = {"expert_mixture_fwd", "expert_mixture_bwd_rows", "grouped_linear_fwd", "grouped_linear_bwd_rows",
        "input_grad", "weight_grad"}
# --quick compiles the unaligned set only for these (the biggest register footprints).
QUICK_UNALIGNED = {"expert_mixture_fwd", "expert_mixture_bwd_rows", "input_grad"}


@dataclass(frozen=True)
class Spec:
    """One launch of a kernel: its flag constexprs, the pointers it passes in the ACC dtype (fp32; fp64 for
    fp64) whatever the input dtype, and whether its ``DOT`` is ACC (the gate weight gradient)."""

    kernel: object
    flags: dict = field(default_factory=dict)
    acc_ptrs: tuple = ()
    dot_acc: bool = False


def _jit(kernel, flags: dict, acc, prec: str, dot, aligned: bool):
    """The JITFunction under the autotuner (triton's Autotuner, or common.FirstFit when
    MMOE_FAST_TRITON_AUTOTUNE=0: both have configs/early_config_prune/fn), and the configs its prune keeps
    for these constexprs at an aligned or unaligned launch (the ones a launch could run)."""
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    configs = kernel.configs
    if getattr(kernel, "early_config_prune", None) is not None:
        # the integer arguments common.aligned reads, as a launch passes them: the kernel's alignment
        # arguments multiples of 16 in the aligned set, the others (E of the expert GEMMs) not
        sizes = {name: 16 if aligned and name in _aligned_args(kernel) else 17 for name in ALIGNED
                 if name in fn.arg_names}
        configs = kernel.early_config_prune(configs, sizes, **flags, ACC=acc, PREC=prec, DOT=dot)
    return fn, configs


def _specs(quick: bool):
    """Every kernel launch worth lowering, as ``backends/triton.py`` makes it."""
    mix, lin, gate = mixture, linear, gating
    for act in ["gelu"] if quick else ["relu", "gelu"]:
        for tasks in (3,) if quick else (1, 2, 3, 4):
            yield Spec(mix.expert_mixture_fwd, dict(ACT=act, HAS_BIAS=True, TASKS=tasks))
        for t_pad in (4,) if quick else (1, 2, 4, 64):
            flags = dict(ACT=act, HAS_BIAS=True, T_PAD=t_pad)
            yield Spec(mix.expert_mixture_bwd_rows, flags, acc_ptrs=("dg_ptr",))  # mmoe_backward: fp32 dG
            if not quick:
                yield Spec(mix.expert_mixture_bwd_rows, flags)  # expert_mixture_backward: dG in the input dtype
        yield Spec(lin.grouped_linear_fwd, dict(ACT=act, HAS_BIAS=True))
        yield Spec(lin.grouped_linear_bwd_rows, dict(ACT=act, HAS_BIAS=True))
    yield Spec(lin.input_grad, dict(GATE=False))
    yield Spec(lin.input_grad, dict(GATE=True), acc_ptrs=("dlogit_ptr",))  # mmoe_backward adds the gate's dx
    # weight_grad writes dW/db in the input dtype (one batch slice) or ACC partials (several); the gate's
    # weight gradient reads dy = dlogit in ACC dtype and runs its dot in ACC.
    yield Spec(lin.weight_grad, {})
    if not quick:
        yield Spec(lin.weight_grad, {}, acc_ptrs=("dw_ptr", "db_ptr"))
        yield Spec(lin.weight_grad, {}, acc_ptrs=("dy_ptr",), dot_acc=True)
    yield Spec(lin.weight_grad, {}, acc_ptrs=("dy_ptr", "dw_ptr", "db_ptr"), dot_acc=True)
    for e_block in (16, 64) if quick else (16, 32, 64):
        yield Spec(gate.gate_softmax_fwd, dict(HAS_BIAS=True, E_BLOCK=e_block), acc_ptrs=("logit_ptr",))
        # mmoe_backward: fp32 dG, no dx (dx_ptr is dlogit); gate_softmax_backward: dG in the input dtype,
        # without dx (input_grad=False: dx_ptr is dlogit again) or with it, at gating.DX_E_BLOCK.
        bwd = dict(E_BLOCK=e_block)
        if not quick or e_block == 64:
            yield Spec(gate.gate_softmax_bwd, dict(bwd, WRITE_DX=False), acc_ptrs=("dg_ptr", "dx_ptr", "dlogit_ptr"))
        if not quick:
            yield Spec(gate.gate_softmax_bwd, dict(bwd, WRITE_DX=False), acc_ptrs=("dx_ptr", "dlogit_ptr"))
    yield Spec(gate.gate_softmax_bwd, dict(E_BLOCK=gate.DX_E_BLOCK, WRITE_DX=True), acc_ptrs=("dlogit_ptr",))


@dataclass
class Job:
    """One variant to lower: everything ``triton.compile`` needs, and how to report it."""

    fn: object
    sig: dict
    consts: dict
    attrs: dict
    num_warps: int
    num_stages: int
    what: str
    need_wgmma: bool
    need_pipeline: bool
    aligned: bool
    strict: bool  # its spills fail the check (not fp64: fp64 is for checking results, not speed)


def _jobs(args) -> list[Job]:
    jobs, seen = [], set()
    modes = [m for name in args.dtypes.split(",") for m in (("fp32-ieee", "fp32-tf32") if name == "fp32" else (name,))]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"compile_check.py: unknown --dtypes {unknown}; known: fp32 (both precisions), {', '.join(MODES)}")
    for spec in _specs(args.quick):
        for mode in modes:
            dtype_name, prec = MODES[mode]
            acc_name = "fp64" if dtype_name == "fp64" else "fp32"
            fn = spec.kernel
            while not isinstance(fn, triton.runtime.jit.JITFunction):
                fn = fn.fn
            if args.only not in fn.__name__:
                continue
            main = fn.__name__ in MAIN and not spec.dot_acc
            unaligned = not args.quick or (main and fn.__name__ in QUICK_UNALIGNED)
            for aligned in (True, False) if unaligned else (True,):
                fn, configs = _jit(spec.kernel, spec.flags, DTYPES[acc_name], prec,
                                   DTYPES[acc_name if spec.dot_acc else dtype_name], aligned)
                for cfg in configs[:1] if args.quick else configs:
                    consts = dict(spec.flags, **cfg.kwargs, ACC=DTYPES[acc_name], PREC=prec)
                    if "DOT" in fn.arg_names:
                        consts["DOT"] = DTYPES[acc_name if spec.dot_acc else dtype_name]
                    missing = [a for a, p in zip(fn.arg_names, fn.params) if p.is_constexpr and a not in consts]
                    assert not missing, f"{fn.__name__}: no value for constexpr {missing}"
                    sig = {a: "constexpr" if a in consts else
                           "*" + (acc_name if a in spec.acc_ptrs else dtype_name) if a.endswith("_ptr") else "i32"
                           for a in fn.arg_names}
                    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a not in consts
                             and (a.endswith("_ptr") or _replica_stride(a)
                                  or (aligned and a in _aligned_args(spec.kernel)))}
                    key = (fn.__name__, tuple(sig.items()), repr(sorted(consts.items())), tuple(attrs),
                           cfg.num_warps, cfg.num_stages)
                    if key in seen:  # e.g. fp32: the ACC-dtype pointer variants are the input-dtype ones
                        continue
                    seen.add(key)
                    flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in spec.flags.items())
                    accs = [a[:-4] for a in spec.acc_ptrs if dtype_name != acc_name]
                    if accs or spec.dot_acc:
                        flags += f" {acc_name}:{','.join(accs)}" + (" DOT=ACC" if spec.dot_acc else "")
                    blocks = " ".join(f"{k[6:]}{v}" for k, v in cfg.kwargs.items())
                    what = (f"{fn.__name__:23s} {mode:9s} {'aligned' if aligned else 'unaligned':9s} {flags:40s} "
                            f"{blocks:13s} w{cfg.num_warps} s{cfg.num_stages}")
                    fast_dot = consts.get("DOT", DTYPES[acc_name]) != tl.float64 and not (
                        prec == "ieee" and consts.get("DOT", DTYPES[acc_name]) == tl.float32)
                    jobs.append(Job(fn, sig, consts, attrs, cfg.num_warps, cfg.num_stages, what,
                                    need_wgmma=main and fast_dot and args.arch == 90,
                                    need_pipeline=main and fast_dot and aligned, aligned=aligned,
                                    strict=dtype_name != "fp64"))
    return jobs


def _cubin_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers per thread, spill bytes (stack frame), static shared bytes) from cuobjdump -res-usage."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    field_ = lambda name: int(m.group(1)) if (m := re.search(rf"\b{name}:(\d+)", out)) else 0  # noqa: E731
    return field_("REG"), field_("STACK"), field_("SHARED")


def _pipelined(ttgir: str) -> bool:
    """Loads copied asynchronously to shared memory (cp.async: ``ttg.async_copy_global_to_local``; TMA:
    ``ttng.async_tma_copy_global_to_local``) into a buffer of >= 2 stages: the software pipeline of
    Triton 3.6 and 3.9 alike."""
    copies = re.search(r"\bttn?g\.async_(tma_)?copy_global_to_local\b", ttgir)
    stages = [int(n) for n in re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x", ttgir)]
    return bool(copies) and max(stages, default=0) >= 2


_JOBS: list[Job] = []
_TARGET = None
_LIMIT = 0


def _compile(i: int) -> tuple[str, str]:
    """(problems, report line) of job i lowered to a cubin; problems is empty when it passes."""
    job = _JOBS[i]
    try:
        compiled = triton.compile(triton.compiler.ASTSource(job.fn, job.sig, job.consts, job.attrs), target=_TARGET,
                                  options=dict(num_warps=job.num_warps, num_stages=job.num_stages))
    except Exception as exc:  # noqa: BLE001 - report every failing variant, then fail
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        return "FAIL", f"FAIL    {job.what}: {lines[-1][:200]}"
    regs, spill, static = _cubin_usage(compiled.asm["cubin"])
    smem = compiled.metadata.shared + static
    wgmma = "wgmma.mma_async" in compiled.asm["ptx"]
    pipe = _pipelined(compiled.asm["ttgir"])
    problems = [p for p, bad in (("SPILL", spill), ("SMEM", smem > _LIMIT), ("NOWGMMA", job.need_wgmma and not wgmma),
                                 ("NOPIPE", job.need_pipeline and not pipe)) if bad]
    yes = lambda b, need: ("yes" if b else "no") + ("!" if need and not b else "")  # noqa: E731
    line = (f"{job.what}: {regs:3d} regs {spill:5d} B spill {smem:6d} B smem  wgmma {yes(wgmma, job.need_wgmma):4s}"
            f" pipelined {yes(pipe, job.need_pipeline)}")
    return ",".join(problems), f"{','.join(problems) or 'ok':10s} {line}"


def main() -> int:
    global _JOBS, _TARGET, _LIMIT
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true", help="one activation, first config, fewer variants")
    parser.add_argument("--only", default="", help="kernels whose name contains this")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16,fp64",
                        help=f"comma-separated, of {', '.join(MODES)} and fp32 (both precisions); fp64 runs "
                        "correctly but its large tiles spill: it is for checking, not speed")
    parser.add_argument("--strict", action="store_true", help="fail on fp64 variants' spills too")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compiler processes")
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv), flush=True)
    print(f"triton {triton.__version__} ({Path(triton.__file__).parent}); line: problems kernel mode alignment "
          "flags blocks warps stages: regs, spill bytes, smem bytes (static + dynamic), wgmma, pipelined "
          "('!': required)", flush=True)
    _TARGET, _LIMIT = GPUTarget("cuda", args.arch, 32), SMEM_LIMIT.get(args.arch, 232448)
    start = time.monotonic()
    _JOBS = _jobs(args)
    bad, loose = [], []  # problems that fail the check, and fp64's spills (reported; fail with --strict)
    if args.jobs > 1 and len(_JOBS) > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:  # workers inherit _JOBS
            results = list(zip(range(len(_JOBS)), pool.imap(_compile, range(len(_JOBS)))))
    else:
        results = [(i, _compile(i)) for i in range(len(_JOBS))]
    for i, (problems, line) in results:
        if problems:
            # A compile failure or a block over the shared-memory limit (its launch would fail) always counts.
            hard = "FAIL" in problems or "SMEM" in problems
            (bad if _JOBS[i].strict or args.strict or hard else loose).append(problems)
        print(line, flush=True)
    took = time.monotonic() - start
    where = f"for sm_{args.arch} with triton {triton.__version__} in {took:.0f} s"
    counts = lambda found: ", ".join(f"{n} {p}" for p in ("FAIL", "SPILL", "SMEM", "NOWGMMA", "NOPIPE")  # noqa: E731
                                     if (n := sum(p in b.split(",") for b in found)))
    lenient = sum(not j.strict for j in _JOBS)
    tail = (f"; fp64 variants (for checking results, not speed) with problems: {len(loose)} of {lenient} "
            f"({counts(loose)}; reported, not failed; --strict fails them)" if loose else "")
    if not bad:
        print(f"all {len(_JOBS)} variants compiled {where}: aligned and unaligned without spills (fp64 aside), "
              f"smem <= {_LIMIT} B, main "
              f"kernels on {'wgmma and ' if args.arch == 90 else ''}pipelined where required{tail}")
        return 0
    print(f"{len(bad)} of {len(_JOBS)} variants failed {where}: {counts(bad)}{tail}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
