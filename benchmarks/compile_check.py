"""Compile every Triton kernel config for an NVIDIA GPU without one: compile errors, registers, spills.

The interpreter runs the kernels' logic but not the compiler, which rejects things the interpreter
accepts (non-constexpr globals, dot shapes, layouts). This lowers each kernel and each autotune config,
for each input dtype, to a cubin for ``--arch`` (sm_90: H100/H200) with Triton's bundled ptxas, and
reads the registers, spill bytes and shared memory from the cubin with the bundled cuobjdump.

    python benchmarks/compile_check.py [--arch 90] [--quick] [--only NAME] [--dtypes fp32,bf16,fp16]

Exits 1 if a kernel fails to compile or spills; prints one line per variant. Needs no GPU and must run
without TRITON_INTERPRET (the kernels are decorated once, for the interpreter or for the compiler).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check.py: unset TRITON_INTERPRET (the interpreter never compiles)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said out loud (it warns)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import _import_package  # noqa: E402

_import_package()
from mmoe_fast.kernels import gating, linear, mixture  # noqa: E402

DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
# Integer arguments assumed multiples of 16, as Triton specializes them at D = H = 512 (the benchmark
# shape); pointers from torch are 16-byte aligned too.
ALIGNED = {"K", "N", "D", "stride_ab", "stride_ae", "stride_yb", "stride_ye", "stride_db", "stride_de"}
# Pointers that hold the accumulator dtype whatever the input dtype (scratch and fp32 partials).
ACC_POINTERS = {"gate_softmax_bwd": {"dlogit_ptr"}, "weight_grad": {"dw_ptr", "db_ptr"}}


def _jit(kernel, flags: dict, acc):
    """The JITFunction under the autotuner, and the configs the autotuner would try for these flags."""
    configs = kernel.configs
    if kernel.early_config_prune is not None:
        configs = kernel.early_config_prune(configs, {}, **flags, ACC=acc)
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel, configs


def _variants(quick: bool):
    """(kernel, extra constexprs, dtype names): one entry per kernel and flag combination worth lowering."""
    acts = ["gelu"] if quick else ["relu", "gelu"]
    for act in acts:
        for tasks in (1, 3) if quick else (1, 2, 3, 4):
            yield mixture.expert_mixture_fwd, dict(ACT=act, HAS_BIAS=True, TASKS=tasks)
        for t_pad in (1, 4):
            yield mixture.expert_mixture_bwd_rows, dict(ACT=act, HAS_BIAS=True, T_PAD=t_pad)
        yield linear.grouped_linear_fwd, dict(ACT=act, HAS_BIAS=True)
        yield linear.grouped_linear_bwd_rows, dict(ACT=act, HAS_BIAS=True)
    for gate in (False, True):
        yield linear.input_grad, dict(GATE=gate)
        yield gating.gate_softmax_bwd, dict(WRITE_DX=not gate, T_PAD=4, E_PAD=16)
    yield linear.weight_grad, {}
    yield gating.gate_softmax_fwd, dict(HAS_BIAS=True, T_PAD=4, E_PAD=16)


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spill stores in bytes) from cuobjdump's resource usage of a cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    spill = re.search(r"STACK:(\d+)", out)
    return regs, int(spill.group(1)) if spill else 0


ELEMENT = {tl.float32: "fp32", tl.float64: "fp64", tl.bfloat16: "bf16", tl.float16: "fp16"}


def compile_one(fn, cfg, flags: dict, dtype_name: str, target) -> tuple[bool, str]:
    """(ok, report line) of one kernel variant lowered to a cubin."""
    dtype = DTYPES[dtype_name]
    acc = tl.float64 if dtype_name == "fp64" else tl.float32
    consts = dict(flags, **cfg.kwargs, ACC=acc, PREC="tf32")
    if "DOT" in fn.arg_names:
        consts["DOT"] = dtype
    missing = [a for a, p in zip(fn.arg_names, fn.params) if p.is_constexpr and a not in consts]
    assert not missing, f"{fn.__name__}: no value for constexpr {missing}"
    sig = {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            sig[arg] = "*" + (ELEMENT[acc] if arg in ACC_POINTERS.get(fn.__name__, ()) else dtype_name)
        else:
            sig[arg] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
             if arg not in consts and (arg.endswith("_ptr") or arg in ALIGNED)}
    what = f"{fn.__name__:24s} {dtype_name} {flags} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
    try:
        compiled = triton.compile(triton.compiler.ASTSource(fn, sig, consts, attrs), target=target,
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    except Exception as exc:  # noqa: BLE001 - report every failing variant, then fail
        return False, f"FAIL  {what}: {str(exc).strip().splitlines()[-1]}"
    regs, spill = _resources(compiled.asm["cubin"])
    line = f"{what}: {regs} regs, {spill} B spilled, {compiled.metadata.shared} B smem"
    return spill == 0, f"{'SPILL' if spill else 'ok':5s} {line}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true", help="one activation, first config")
    parser.add_argument("--only", default="", help="kernels whose name contains this")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16", help=f"comma-separated, of {','.join(DTYPES)} "
                        "(fp64 runs correctly but large fp64 tiles spill: fp64 is for checking, not speed)")
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv), flush=True)
    target = GPUTarget("cuda", args.arch, 32)
    dtypes = args.dtypes.split(",")
    bad, start = 0, time.monotonic()
    for kernel, flags in _variants(args.quick):
        for name in dtypes:
            fn, configs = _jit(kernel, flags, tl.float64 if name == "fp64" else tl.float32)
            if args.only not in fn.__name__:
                continue
            for cfg in configs[:1] if args.quick else configs:
                ok, line = compile_one(fn, cfg, flags, name, target)
                bad += not ok
                print(line, flush=True)
    print(f"{'all compiled' if not bad else f'{bad} variants failed or spilled'} "
          f"for sm_{args.arch} in {time.monotonic() - start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
