"""Builds revgnn_ext._C against the torch that is already installed.

    pip install --no-build-isolation -e .

Environment:
  FORCE_CUDA=1                 build the CUDA kernels or fail loudly.
  FORCE_ONLY_CPU=1             skip the CUDA kernels.
  TORCH_CUDA_ARCH_LIST         CUDA architectures (default "8.0;9.0").
  REVGNN_EXT_CPU_CAPABILITY    "avx2" or "default" SIMD for the CPU kernels; by default avx2
                               when the building machine has AVX2, FMA and F16C.
  REVGNN_EXT_EMULATOR=1        also build revgnn_ext._emu: the CUDA kernels compiled for the CPU
                               under our emulator of the CUDA execution model (csrc/simt.h), which
                               the tests run (`make test` sets it; no GPU or nvcc needed).
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup



def _locate_cuda_home():
    """torch takes CUDA_HOME from `which nvcc`; a wrapper script on the PATH (e.g. /usr/local/bin/nvcc)
    then points it at a directory with no CUDA libraries. Pick a real toolkit instead."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("revgnn_ext: torch must be installed before building (pip install torch), "
             "then `pip install --no-build-isolation -e .`")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("FORCE_ONLY_CPU"):
        return False
    nvcc = CUDA_HOME is not None and (
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc"))
    if _flag("FORCE_CUDA"):
        if torch.version.cuda is None:
            sys.exit(f"revgnn_ext: FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build")
        if not nvcc:
            sys.exit("revgnn_ext: FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    return torch.version.cuda is not None and bool(nvcc)


def _cuda_library_includes():
    """ATen's CUDA headers include cusparse.h / cublas_v2.h. A bare nvcc install may lack
    them; the nvidia-* wheels that come with a CUDA torch carry them."""
    if os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    found = []
    for site in sys.path:
        base = os.path.join(site, "nvidia")
        for header in ("cusparse.h", "cublas_v2.h"):
            for path in glob.glob(os.path.join(base, "**", "include", header), recursive=True):
                inc = os.path.dirname(path)
                if inc not in found:
                    found.append(inc)
    if not found:
        sys.exit(f"revgnn_ext: cusparse.h is neither under {CUDA_HOME}/include nor in the "
                 "pip nvidia packages; install nvidia-cusparse / nvidia-cublas headers")
    return found


def _cpu_capability_flags():
    choice = os.environ.get("REVGNN_EXT_CPU_CAPABILITY", "").strip().lower()
    if not choice:
        flags = ""
        if platform.machine() in ("x86_64", "AMD64") and os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        choice = "avx2" if all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c")) else "default"
    if choice == "avx2":
        # at::vec selects its SIMD by these macros and keeps each choice in its own inline
        # namespace, as ATen's own kernels do (F16C: its float16 conversions).
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if choice != "default":
        sys.exit(f"revgnn_ext: REVGNN_EXT_CPU_CAPABILITY must be 'avx2' or 'default', got {choice!r}")
    return []


def _emulated_cuda_kernels():
    """revgnn_ext._emu: csrc/cuda/*.cu, included by csrc/emu/*.cpp, built by the host compiler."""
    return CppExtension("revgnn_ext._emu", sorted(glob.glob("csrc/emu/*.cpp")),
                        include_dirs=[os.path.join(ROOT, "csrc")],
                        extra_compile_args={"cxx": ["-O2", "-g0", "-Wno-unknown-pragmas", "-DSIMT_EMULATE",
                                                    "-DREVGNN_LIBRARY=revgnn_ext_emu"]})


def extensions():
    emulated = [_emulated_cuda_kernels()] if _flag("REVGNN_EXT_EMULATOR") else []
    with_cuda = _want_cuda()
    sources = ["csrc/revgnn_ext.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    define = [f'-DREVGNN_EXT_TORCH_VERSION="{torch.__version__}"']
    cxx = ["-O3", "-fopenmp"] + define + _cpu_capability_flags()
    args = dict(extra_compile_args={"cxx": cxx}, include_dirs=[os.path.join(ROOT, "csrc")])
    if not with_cuda:
        print("revgnn_ext: building the CPU kernels only")
        return [CppExtension("revgnn_ext._C", sources, **args)] + emulated
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print(f"revgnn_ext: building CPU and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    cxx.append("-DWITH_CUDA")
    args["extra_compile_args"]["nvcc"] = ["-O3", "-DWITH_CUDA", "--expt-relaxed-constexpr",
                                          "-lineinfo"] + define
    args["include_dirs"] += _cuda_library_includes()
    return [CUDAExtension("revgnn_ext._C", sources, **args)] + emulated


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
