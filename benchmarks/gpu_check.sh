#!/usr/bin/env bash
# The triton backend on a lent GPU: correctness (fp32 tf32/ieee, bf16, fp16; forward and backward against
# the float64 reference), then layer timings against the eager and compiled forms. Ends within 5 minutes
# on an H200. --smoke: both parts with tiny shapes on the CPU through Triton's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--smoke" ]]; then
    echo "+ TRITON_INTERPRET=1 $PY benchmarks/bench_gpu.py --smoke"
    TRITON_INTERPRET=1 exec timeout 290 "$PY" benchmarks/bench_gpu.py --smoke
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
rc=0
echo "+ MMOE_FAST_TRITON_AUTOTUNE=0 $PY benchmarks/bench_gpu.py --part correctness"
MMOE_FAST_TRITON_AUTOTUNE=0 timeout 120 "$PY" benchmarks/bench_gpu.py --part correctness || rc=$?
echo "+ $PY benchmarks/bench_gpu.py --part timings --budget 140"
timeout 170 "$PY" benchmarks/bench_gpu.py --part timings --budget 140 || rc=$?
exit $rc
