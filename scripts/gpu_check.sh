#!/usr/bin/env bash
# One-call GPU check: on a Hopper machine without network access, install the nvidia-cutlass wheel
# from a local folder, build the extension with all cores, run the whole test suite (GPU tests
# included) and the benchmarks, and write logs and JSON under $OUT.
#
#   OUT=/tmp/out WHEELS=.whl scripts/gpu_check.sh
#
# WHEELS holds nvidia_cutlass-4.2.0.0-py3-none-any.whl, fetched where there is network with
#   pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl
# PYTEST_ARGS (default: tests) and BENCH_ARGS (default: all families) narrow a run; SANITIZE=0 skips
# the compute-sanitizer pass (scripts/sanitize.sh, a few minutes); BENCH=0 skips the benchmarks.
# PROTOTYPES="fp8_grouped_gemm bf16_grouped_gemm" (default: none) also runs those prototypes'
# run_gpu.py (checks and benchmark; their own extensions are built while the library builds).
# GIT_COMMIT=<the commit sent> stamps the benchmark JSON (the GPU machine's .git can be older than
# the tree it received).
# Object files stay in .gpu_build/ so a second call on the same machine only recompiles what changed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
WHEELS=${WHEELS:-.whl}
PY=${PY:-python3}
mkdir -p "$OUT"
# Never use NVLink multicast on shared machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

status=()
stage() {  # stage NAME LOG CMD...: run, tee to $OUT/LOG, remember the exit code
  local name=$1 log=$2
  shift 2
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  status+=("$name: exit $rc, $((SECONDS - start)) s")
  return "$rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/moe_kernels_site "$WHEELS"/nvidia_cutlass-*.whl ||
  { echo "gpu_check: no nvidia-cutlass wheel in $WHEELS"; exit 1; }
export PYTHONPATH=/tmp/moe_kernels_site:$PWD${PYTHONPATH:+:$PYTHONPATH}

# The prototypes' extensions (one translation unit each) build beside the library's, on the same
# cores: their builds need torch only, their checks and benchmarks the built library.
proto_pids=()
for proto in ${PROTOTYPES:-}; do
  CC=/usr/bin/gcc CXX=/usr/bin/g++ $PY "prototypes/$proto/run_gpu.py" --build-only >"$OUT/proto_${proto}_build.log" 2>&1 &
  proto_pids+=($!)
done
# The default g++ wrapper on the GPU machine produced extensions that crashed in libstdc++.
if stage build build.log env CC=/usr/bin/gcc CXX=/usr/bin/g++ MAX_JOBS="$(nproc)" \
  $PY setup.py build_ext --inplace --build-temp .gpu_build; then
  # shellcheck disable=SC2086
  stage tests tests.log $PY -m pytest ${PYTEST_ARGS:-tests} -q -rs --durations=10
  [ ${#proto_pids[@]} -eq 0 ] || wait "${proto_pids[@]}"
  for proto in ${PROTOTYPES:-}; do  # the builds above are cached: this only checks and benchmarks
    stage "prototype $proto" "proto_$proto.log" env OUT="$OUT" $PY "prototypes/$proto/run_gpu.py"
  done
  if [ "${BENCH:-1}" = 1 ]; then
    # shellcheck disable=SC2086
    stage bench bench.log $PY bench/run.py --out "$OUT" ${BENCH_ARGS:-}
  fi
  # compute-sanitizer over every op (scripts/sanitize.sh); SANITIZE=0 skips it.
  if [ "${SANITIZE:-1}" = 1 ]; then
    stage sanitize sanitize.log env OUT="$OUT" PY="$PY" scripts/sanitize.sh
  fi
fi
printf '\ngpu_check summary\n'
printf '  %s\n' "${status[@]}"
grep -E "passed|failed" "$OUT/tests.log" 2>/dev/null | tail -1
! printf '%s\n' "${status[@]}" | grep -qv "exit 0"
