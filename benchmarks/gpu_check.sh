#!/usr/bin/env bash
# The triton backend on a lent GPU: correctness (fp32 ieee and tf32, bf16, fp16, fp64; forward and every
# gradient against the float64 reference, buffers poisoned with NaN), then layer timings against batched
# eager in the input dtype, torch.compile of it and the loop form, with the measured roofs and a summary
# table. Ends within 8 minutes on an H100/H200, compilations included. Output also goes to $OUT (when set):
# gpu_check.log, timings.json, tuned_configs.json (the autotuner's picks, for mmoe_fast/kernels/). --smoke: both parts with tiny shapes on the CPU through
# Triton's interpreter (the test suite runs that).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--smoke" ]]; then
    echo "+ TRITON_INTERPRET=1 $PY benchmarks/bench_gpu.py --smoke"
    TRITON_INTERPRET=1 exec timeout 290 "$PY" benchmarks/bench_gpu.py --smoke
fi
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
date -u
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
export TRITON_DEFAULT_FP_FUSION=1
rc=0
echo "+ MMOE_FAST_TRITON_AUTOTUNE=0 $PY benchmarks/bench_gpu.py --part correctness"
MMOE_FAST_TRITON_AUTOTUNE=0 timeout 210 "$PY" benchmarks/bench_gpu.py --part correctness || rc=$?
echo "+ $PY benchmarks/bench_gpu.py --part timings --budget 170 --json $OUT/timings.json --tuned-out $OUT/tuned_configs.json"
timeout 230 "$PY" benchmarks/bench_gpu.py --part timings --budget 170 --json "$OUT/timings.json" \
    --tuned-out "$OUT/tuned_configs.json" || rc=$?
echo "exit status $rc; log and timings in $OUT"
exit $rc
