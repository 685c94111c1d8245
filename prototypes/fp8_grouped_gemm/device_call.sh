#!/usr/bin/env bash
# One device call for the FP8 kernel work (written in the twelfth session, never run yet: no device
# came). From the repo root on the GPU machine, carry [".whl", ".deepgemm"]:
#   GIT_COMMIT=<full sha> BUDGET=470 bash prototypes/fp8_grouped_gemm/device_call.sh
# Builds the library, the prototype extension and (BUDGET >= 420) DeepGEMM side by side; checks and
# benchmarks PROTO_CONFIGS on PROTO_CASES (run_gpu.py); then, with what is left of BUDGET seconds,
# Nsight Compute (full set, locked clocks) of DeepGEMM and ours on the balanced EP8 gate_up.
# DG=0 skips DeepGEMM (build and ncu); LIB_TESTS (pytest arguments) and LIB_BENCH (bench/run.py
# families) also run the library's tests and benchmarks on the tree sent, before the ncu step.
# Everything lands in $OUT as two tarballs (logs and JSON; the ncu reports).
set -u
cd "$(dirname "$0")/../.."
BUDGET=${BUDGET:-470}
: "${OUT:?set OUT to the folder that comes back}"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/moe_kernels_site:$PWD GIT_COMMIT=${GIT_COMMIT:?pass the full sha of the commit sent (the machine's .git is the session's start)}
export DG_JIT_CACHE_DIR=/tmp/deepgemm_jit CUDA_HOME=/usr/local/cuda CC=/usr/bin/gcc CXX=/usr/bin/g++
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }; left() { echo $(( BUDGET - ($(date +%s) - T0) - 15 )); }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/smi.txt
(timeout 250 python3 prototypes/fp8_grouped_gemm/run_gpu.py --build-only > $OUT/proto_build.log 2>&1) & pb=$!
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/moe_kernels_site .whl/nvidia_cutlass-*.whl
dg=""; if [ $BUDGET -ge 420 ] && [ "${DG:-1}" = 1 ]; then bash prototypes/deepgemm/run_gpu.sh build > $OUT/dg_build_bg.log 2>&1 & dg=$!; fi
MAX_JOBS=13 timeout 250 python3 setup.py build_ext --inplace --build-temp .gpu_build > $OUT/build.log 2>&1; el "our build exit $?"
wait $pb; el "proto build exit $?"
# Optional: the library's own tests and benchmark families on the tree sent (LIB_TESTS: pytest
# arguments; LIB_BENCH: bench/run.py --only families), each within what is left of BUDGET. They
# run before the prototype's benchmark, which gets what is left (at most 200 s).
if [ -n "${LIB_TESTS:-}" ]; then T=$(left); timeout $(( T < 30 ? 30 : T )) python3 -m pytest $LIB_TESTS -q -x > $OUT/lib_tests.log 2>&1; el "lib tests exit $?"; fi
if [ -n "${LIB_BENCH:-}" ]; then T=$(left); timeout $(( T < 30 ? 30 : T )) python3 bench/run.py --out $OUT --only $LIB_BENCH > $OUT/lib_bench.log 2>&1; el "lib bench exit $?"; fi
T=$(left); T=$(( T > 200 ? 200 : (T < 30 ? 30 : T) ))
PROTO_CASES=${PROTO_CASES:-ep8_realistic,ep8_down,ep8_balanced,e256_realistic} timeout $T python3 prototypes/fp8_grouped_gemm/run_gpu.py --configs ${PROTO_CONFIGS:-V2_BN192_S4,V2_BN192_S4_KC,V2_BN192_S4_KC_TS,V4_BN192_S4_M2_KC} > $OUT/proto.log 2>&1; el "proto exit $?"
[ -n "$dg" ] && { wait $dg; el "dg build exit $?"; }
T=$(left); if [ -n "$dg" ] && [ $T -gt 40 ]; then timeout $T ncu --nvtx --nvtx-include profiled/ --import-source no --set full -f -o $OUT/prof_full python3 prototypes/deepgemm/bench.py --profile "EP8 gate_up balanced" > $OUT/ncu_full.log 2>&1; el "ncu exit $? (limit $T s)"; ncu --import $OUT/prof_full.ncu-rep --page details > $OUT/ncu_details.txt 2>&1; else el "no time for ncu"; fi
tail -3 $OUT/build.log; tail -2 $OUT/dg_build_bg.log; grep -E "PASS|FAIL|configs|us|EP8|256|decode" $OUT/proto.log | grep -v "^  \[PASS" | tail -30; grep -c PASS $OUT/proto.log; tail -2 $OUT/lib_tests.log 2>/dev/null; tail -40 $OUT/lib_bench.log 2>/dev/null | cut -c1-160; grep -E "^  [a-zA-Z_]|Duration|SM Frequency|Compute \(SM\) Throughput|Executed Ipc A" $OUT/ncu_details.txt | head -30
cd $OUT && (tar czf /tmp/rep.tgz *.ncu-rep; rm -f *.ncu-rep; tar czf /tmp/all.tgz *; rm -rf ./*; mv /tmp/all.tgz /tmp/rep.tgz .) 2>/dev/null; ls -la
