"""Build moe_kernels._C: Hopper (sm_90a) CUDA kernels registered with the PyTorch dispatcher.

Install (PyTorch with CUDA must already be installed; see README.md):
    pip install ninja nvidia-cutlass==4.2.0.0 && pip install --no-build-isolation -e .

Environment:
    CUDA_HOME    CUDA toolkit with nvcc (found from PATH or /usr/local/cuda when unset)
    CUTLASS_DIR  a CUTLASS checkout (with include/ and tools/util/include/) instead of the
                 headers shipped in the nvidia-cutlass wheel
    NCCL_HOME    an NCCL install (include/, lib/) instead of the nvidia-nccl wheel torch uses
    MAX_JOBS     parallel compile jobs (ninja)
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
HOPPER_ARCH = "-gencode=arch=compute_90a,code=sm_90a"


def fail(message: str) -> None:
    sys.exit(f"\nmoe_kernels build error: {message}\n")


def find_cuda_home() -> str | None:
    """A toolkit root holding bin/nvcc and include/cuda_runtime.h.

    torch guesses CUDA_HOME from the nvcc on PATH; when that nvcc is a wrapper script (as in
    /usr/local/bin/nvcc -> /usr/local/cuda-13.0) the guess has no headers, so check it.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        if (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


cuda_home = find_cuda_home()
if cuda_home is None:
    fail(
        "no CUDA toolkit found (need bin/nvcc and include/cuda_runtime.h). Install the CUDA toolkit "
        "matching your PyTorch build (nvcc 12.8+ for sm_90a) and set CUDA_HOME to its root."
    )
os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
except ImportError:
    fail(
        "PyTorch is not importable. Install a CUDA build of PyTorch first, then build with "
        "`pip install --no-build-isolation -e .` so the build sees it."
    )

if torch.version.cuda is None:
    fail(
        f"torch {torch.__version__} is a CPU-only build; moe_kernels needs a CUDA build of PyTorch "
        "(e.g. `pip install torch --index-url https://download.pytorch.org/whl/cu130`)."
    )


def package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_cutlass() -> list[str]:
    if os.environ.get("CUTLASS_DIR"):
        root = Path(os.environ["CUTLASS_DIR"])
    else:
        lib = package_dir("cutlass_library")
        if lib is None:
            fail("CUTLASS headers not found: `pip install nvidia-cutlass==4.2.0.0` or set CUTLASS_DIR.")
        root = lib / "source"
    includes = [root / "include", root / "tools" / "util" / "include"]
    if not (includes[0] / "cutlass" / "cutlass.h").exists():
        fail(f"CUTLASS headers not found under {root} (expected include/cutlass/cutlass.h).")
    return [str(p) for p in includes]


def find_nccl() -> tuple[str, str]:
    if os.environ.get("NCCL_HOME"):
        root = Path(os.environ["NCCL_HOME"])
    else:
        root = package_dir("nvidia.nccl")
        if root is None:
            fail("NCCL not found: install the nvidia-nccl wheel that your torch uses, or set NCCL_HOME.")
    include, lib = root / "include", root / "lib"
    if not (include / "nccl.h").exists() or not (lib / "libnccl.so.2").exists():
        fail(f"NCCL not found under {root} (expected include/nccl.h and lib/libnccl.so.2).")
    return str(include), str(lib)


def torch_cuda_wheel_includes() -> list[str]:
    # torch's CUDA headers include cuBLAS/cuSPARSE headers; with pip-installed CUDA they live in
    # site-packages/nvidia/cu13/include rather than in the system toolkit.
    cu = package_dir("nvidia.cu13")
    return [str(cu / "include")] if cu is not None and (cu / "include").exists() else []


cutlass_includes = find_cutlass()
nccl_include, nccl_lib = find_nccl()
sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu"))
include_dirs = [str(ROOT / "csrc"), str(ROOT / "csrc" / "include"), *cutlass_includes, nccl_include]
include_dirs += torch_cuda_wheel_includes()

nvcc_flags = [
    HOPPER_ARCH,
    "-O3",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    # torch disables the half/bf16 operators that CUTLASS and our kernels use
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-DNDEBUG",
]


class BuildWithSummary(BuildExtension):
    def run(self):
        super().run()
        print(
            "\nmoe_kernels build summary\n"
            f"  torch        {torch.__version__} (CUDA {torch.version.cuda})\n"
            f"  CUDA_HOME    {cuda_home}\n"
            f"  arch         {HOPPER_ARCH}\n"
            f"  CUTLASS      {cutlass_includes[0]}\n"
            f"  NCCL         {nccl_lib}\n"
            f"  MAX_JOBS     {os.environ.get('MAX_JOBS', 'ninja default')}\n"
            f"  sources      {len(sources)}: {', '.join(sources)}\n"
        )


setup(
    packages=find_packages(include=["moe_kernels", "moe_kernels.*"]),
    ext_modules=[
        CUDAExtension(
            name="moe_kernels._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": ["-O3", "-DNDEBUG"], "nvcc": nvcc_flags},
            # link torch's own NCCL so communicators interoperate with torch.distributed
            extra_link_args=[f"-L{nccl_lib}", "-l:libnccl.so.2", f"-Wl,-rpath,{nccl_lib}"],
        )
    ],
    cmdclass={"build_ext": BuildWithSummary},
)
