#!/usr/bin/env bash
# compute-sanitizer's four tools over scripts/sanitize_ops.py (every CUDA op once, small inputs with
# edges, every documented output read back), run side by side on one GPU; one log per tool under $OUT
# (scripts/sanitize_report.py keeps the first reports in full and ends the log with the reports
# counted per op call and kernel) and a summary line per tool. Each tool must report 0 errors.
# PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor is its own allocation, so an out-of-bounds access
# cannot land silently in a neighbour.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PY:-python3}
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
mkdir -p "$OUT"
tools=(memcheck racecheck synccheck initcheck)
pids=()
for tool in "${tools[@]}"; do
  # initcheck cannot see TMA stores: MOE_KERNELS_INITCHECK=1 zero-fills GEMM outputs (sanitize_ops.py).
  initcheck=$([ "$tool" = initcheck ] && echo 1 || echo 0)
  (
    MOE_KERNELS_INITCHECK=$initcheck PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 9 --print-limit 100000000 \
      --show-backtrace no "$PY" scripts/sanitize_ops.py 2>&1 |
      "$PY" scripts/sanitize_report.py --keep 20 >"$OUT/sanitize_$tool.log"
    exit $((PIPESTATUS[0] | PIPESTATUS[1]))
  ) &
  pids+=($!)
done
rc=0
for i in "${!tools[@]}"; do
  wait "${pids[$i]}"
  code=$?
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize_${tools[$i]}.log" | tail -1)
  families=$(grep -c "sanitize_ops: [a-z]* done" "$OUT/sanitize_${tools[$i]}.log")
  echo "sanitize ${tools[$i]}: exit $code, ${summary:-no summary}, $families/6 op families ran"
  [ "$code" -eq 0 ] && [ "$families" -eq 6 ] || rc=1
done
exit "$rc"
