#!/usr/bin/env bash
# DeepGEMM's sm90 FP8 grouped GEMM (m_grouped_fp8_gemm_nt_contiguous) beside ours and torch, on a
# Hopper machine without network. From the repo root, after our library is built in place
# (python3 setup.py build_ext --inplace --build-temp .gpu_build, PYTHONPATH=/tmp/moe_kernels_site:$PWD)
# and with .deepgemm/ carried (prototypes/deepgemm/make_bundle.sh makes it):
#
#   OUT=/tmp/out bash prototypes/deepgemm/run_gpu.sh          # build DeepGEMM's _C, then bench.py
#   OUT=/tmp/out bash prototypes/deepgemm/run_gpu.sh build    # build only (can run beside our build)
#   OUT=/tmp/out bash prototypes/deepgemm/run_gpu.sh bench    # bench only (_C already built)
#
# Writes $OUT/deepgemm_build.log, $OUT/deepgemm_bench.log, $OUT/deepgemm.json (bench.py's rows) and
# $OUT/deepgemm_status.txt. Every step runs under `timeout` (BUILD_TIMEOUT, BENCH_TIMEOUT seconds).
# Env: DG_DIR (default .deepgemm), SITE (where the nvidia-cutlass wheel is installed, default
# /tmp/moe_kernels_site; installed from WHEELS=.whl if absent), CUTLASS_INCLUDE (default: that
# wheel's cutlass_library/source/include), DG_JIT_CACHE_DIR (default /tmp/deepgemm_jit),
# BENCH_ARGS (passed to bench.py, split on spaces: e.g. "--cases E=32 --reps 20").
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
MODE=${1:-all}
OUT=${OUT:-$ROOT/deepgemm_out}
PY=${PY:-python3}
DG_DIR=$(realpath -m "${DG_DIR:-$ROOT/.deepgemm}")
SITE=${SITE:-/tmp/moe_kernels_site}
WHEELS=${WHEELS:-$ROOT/.whl}
CUTLASS_INCLUDE=${CUTLASS_INCLUDE:-$SITE/cutlass_library/source/include}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export DG_JIT_CACHE_DIR=${DG_JIT_CACHE_DIR:-/tmp/deepgemm_jit}
export DG_PRINT_CONFIGS=${DG_PRINT_CONFIGS:-1}  # DeepGEMM prints the config it picks for each shape
# The GPU machine's default g++ wrapper produced extensions that crashed in libstdc++ (scripts/gpu_check.sh).
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ NVCC_CCBIN=${NVCC_CCBIN:-/usr/bin/g++}
fi
status() { echo "$*" | tee -a "$OUT/deepgemm_status.txt"; }
# A toolkit root with bin/nvcc and include/cuda_runtime.h, as setup.py picks it (the nvcc on PATH can
# be a wrapper script whose parent has no headers). DeepGEMM's JIT runs $CUDA_HOME/bin/nvcc.
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$(dirname "$(dirname "$(realpath "$(command -v nvcc)" 2>/dev/null)")")" /usr/local/cuda; do
  if [ -n "$home" ] && [ -x "$home/bin/nvcc" ] && [ -f "$home/include/cuda_runtime.h" ]; then
    export CUDA_HOME=$home
    break
  fi
done

[ -f "$DG_DIR/csrc/python_api.cpp" ] || { status "no DeepGEMM tree in $DG_DIR (run prototypes/deepgemm/make_bundle.sh, carry .deepgemm)"; exit 1; }
if [ ! -d "$CUTLASS_INCLUDE/cute" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/nvidia_cutlass-*.whl ||
    { status "no CUTLASS headers at $CUTLASS_INCLUDE and no nvidia-cutlass wheel in $WHEELS"; exit 1; }
fi
# DeepGEMM's JIT compiles with -I<deep_gemm package>/include only: cute/ and cutlass/ must be there
# (its setup.py copies them from third-party/cutlass; here they are links to the wheel's headers).
for d in cute cutlass; do
  ln -sfn "$CUTLASS_INCLUDE/$d" "$DG_DIR/deep_gemm/include/$d"
done
export PYTHONPATH=$DG_DIR:$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}

build() {
  # DeepGEMM's own setup.py imports wheel.bdist_wheel and scripts/; this is its CUDAExtension
  # (same sources, include dirs, libraries and flags) built in place with torch's BuildExtension.
  local start=$SECONDS rc
  (cd "$DG_DIR" && CUTLASS_INCLUDE=$CUTLASS_INCLUDE MAX_JOBS=${MAX_JOBS:-16} timeout "$BUILD_TIMEOUT" $PY - <<'PYEOF') 2>&1 | tee "$OUT/deepgemm_build.log"
import glob, os, sys
import setuptools
import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

cuda_lib = next((d for d in (f"{CUDA_HOME}/lib64", f"{CUDA_HOME}/lib") if os.path.isdir(d)), f"{CUDA_HOME}/lib64")
here = os.getcwd()  # absolute paths: ninja compiles from the build folder
include_dirs = [f"{CUDA_HOME}/include", f"{CUDA_HOME}/include/cccl", f"{here}/deep_gemm/include",
                os.environ["CUTLASS_INCLUDE"], f"{here}/third-party/fmt/include"]
libraries, library_dirs, link_args = ["cudart"], [cuda_lib], []
# nvrtc.h / cublasLt.h and libnvrtc may be missing from a minimal toolkit and live only in the nvidia
# wheels torch uses (nvidia/cu13/... for cu130 builds): the toolkit comes first, the wheels fill in.
try:
    import nvidia
    wheel_dirs = sorted(p for base in nvidia.__path__ for p in glob.glob(f"{base}/*") if os.path.isdir(p))
except ImportError:
    wheel_dirs = []
for header in ("nvrtc.h", "cublasLt.h"):
    if not os.path.exists(f"{CUDA_HOME}/include/{header}"):
        found = [d for d in wheel_dirs if os.path.exists(f"{d}/include/{header}")]
        print(f"{header}: not in the toolkit, from {found[:1] or 'nowhere (the build will fail)'}")
        include_dirs += [f"{d}/include" for d in found[:1] if f"{d}/include" not in include_dirs]
if glob.glob(f"{cuda_lib}/libnvrtc.so"):
    libraries.append("nvrtc")
else:
    so = sorted(f for d in wheel_dirs for f in glob.glob(f"{d}/lib/libnvrtc.so*") + glob.glob(f"{cuda_lib}/libnvrtc.so.*"))
    if so:  # link the versioned library by name, and find it at run time
        link_args += [f"-l:{os.path.basename(so[0])}", f"-L{os.path.dirname(so[0])}",
                      f"-Wl,-rpath,{os.path.dirname(so[0])}"]
    else:
        libraries.append("nvrtc")
# DeepGEMM's setup.py passes -std=c++17; torch >= 2.12's headers need C++20, so the standard is left
# to torch (it adds its own -std when none is given).
cxx_flags = ["-O3", "-fPIC", "-Wno-psabi", "-Wno-deprecated-declarations",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
print(f"torch {torch.__version__}, CUDA_HOME {CUDA_HOME}, cutlass {os.environ['CUTLASS_INCLUDE']}, "
      f"libraries {libraries}, extra link {link_args}", flush=True)
setuptools.setup(
    name="deep_gemm",
    ext_modules=[CUDAExtension(name="deep_gemm._C", sources=["csrc/python_api.cpp"], include_dirs=include_dirs,
                               libraries=libraries, library_dirs=library_dirs,
                               extra_compile_args=cxx_flags, extra_link_args=link_args)],
    cmdclass={"build_ext": BuildExtension},
    script_args=["build_ext", "--inplace", "--build-temp", "build/temp"],
)
PYEOF
  rc=${PIPESTATUS[0]}
  status "deepgemm build: exit $rc, $((SECONDS - start)) s"
  [ "$rc" = 0 ] || return "$rc"
  local start2=$SECONDS
  (cd "$ROOT" && timeout 120 $PY -c "import deep_gemm; print('deep_gemm', deep_gemm.__version__, deep_gemm.__file__)") 2>&1 |
    tee -a "$OUT/deepgemm_build.log"
  rc=${PIPESTATUS[0]}
  status "deepgemm import: exit $rc, $((SECONDS - start2)) s"
  return "$rc"
}

bench() {
  local start=$SECONDS rc
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee "$OUT/deepgemm_bench.log"
  # shellcheck disable=SC2086
  timeout "$BENCH_TIMEOUT" $PY prototypes/deepgemm/bench.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/deepgemm_bench.log"
  rc=${PIPESTATUS[0]}
  status "deepgemm bench: exit $rc, $((SECONDS - start)) s"
  return "$rc"
}

case $MODE in
  build) build ;;
  bench) bench ;;
  all) build && bench ;;
  *) echo "usage: $0 [all|build|bench]"; exit 2 ;;
esac
rc=$?
# Keep the JIT's generated kernels (kernel.cu, a few KB each) for inspection; the cubins stay behind.
if [ -d "$DG_JIT_CACHE_DIR/cache" ]; then
  (cd "$DG_JIT_CACHE_DIR/cache" && find . -name kernel.cu | head -40 | tar -czf "$OUT/deepgemm_jit_sources.tgz" -T -) 2>/dev/null
fi
exit "$rc"
