"""Builds betanas_fast._C: CPU kernels always, CUDA kernels when torch has CUDA and a toolkit is found.

Which CUDA architectures, following torch's own convention:
  - TORCH_CUDA_ARCH_LIST set (e.g. "9.0", or "8.0;9.0+PTX"): exactly those; the way to build on a GPU-less
    login node for GPU nodes;
  - otherwise, GPUs visible: their architectures (torch's cpp_extension picks them);
  - otherwise, no CUDA kernels at all (the CPU kernels only), unless BETANAS_FORCE_CUDA=1, which builds
    csrc/DEFAULT_CUDA_ARCHS (filtered to what the nvcc found supports) so that the CUDA sources keep
    compiling on machines without a GPU (CI does this).

Switches (environment variables):
  BETANAS_FORCE_CPU=1      build the CPU kernels only, even where CUDA is available
  BETANAS_FORCE_CUDA=1     build the CUDA kernels even without a GPU or an arch list; fail instead of falling
                           back to a CPU-only build when CUDA is not usable
  TORCH_CUDA_ARCH_LIST     CUDA architectures, e.g. "9.0"; the CMake build reads the same setting
  MAX_JOBS                 parallel compile jobs (torch's knob)
  CUDA_HOME                the CUDA toolkit (default: the directory of the nvcc on PATH, resolved)
  BETANAS_CPU_MARCH        -march for the CPU kernels (default "native": the library is always built
                           on the machine that runs it, because torch's C++ ABI ties it to the local
                           torch; set e.g. "x86-64-v2" to build for other machines, "" for none)
  BETANAS_DEBUG=1          -O0 -g
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The real toolkit directory. `/usr/local/bin/nvcc` can be a wrapper script, from which torch would
    guess CUDA_HOME=/usr/local (no libcudart there); look for a directory that has bin/nvcc and a cudart."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        has_nvcc = os.path.exists(os.path.join(home, "bin", "nvcc"))
        has_cudart = glob.glob(os.path.join(home, "lib*", "libcudart.so*")) or glob.glob(
            os.path.join(home, "targets", "*", "lib", "libcudart.so*"))
        if has_nvcc and has_cudart:
            return home
    return None


def _nvcc_version(cuda_home):
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _default_arch_list(nvcc_version):
    with open(os.path.join(ROOT, "csrc", "DEFAULT_CUDA_ARCHS")) as f:
        archs = [a for a in f.read().split() if a and not a.startswith("#")]
    # CUDA 13 dropped sm_70 and older; CUDA 12 still accepts 7.0.
    min_arch = 7.5 if nvcc_version and nvcc_version[0] >= 13 else 7.0
    return ";".join(a for a in archs if float(a.replace("+PTX", "")) >= min_arch)


# CUDA_HOME must be right before torch.utils.cpp_extension is imported: it reads it at import time.
cuda_home = None if _env_flag("BETANAS_FORCE_CPU") else _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

torch_has_cuda = torch.version.cuda is not None
cuda_usable = (not _env_flag("BETANAS_FORCE_CPU")) and torch_has_cuda and cuda_home is not None
if _env_flag("BETANAS_FORCE_CUDA") and not cuda_usable:
    sys.exit(f"BETANAS_FORCE_CUDA=1 but CUDA is not usable: torch.version.cuda={torch.version.cuda}, "
             f"CUDA toolkit={cuda_home}, BETANAS_FORCE_CPU={os.environ.get('BETANAS_FORCE_CPU', '0')}")
gpus_visible = cuda_usable and torch.cuda.is_available() and torch.cuda.device_count() > 0
# Compiling for GPUs nobody asked for takes most of an install on a machine without any.
use_cuda = cuda_usable and (bool(os.environ.get("TORCH_CUDA_ARCH_LIST")) or gpus_visible
                            or _env_flag("BETANAS_FORCE_CUDA"))

nvcc_version = _nvcc_version(cuda_home) if use_cuda else None
if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not gpus_visible:
    # BETANAS_FORCE_CUDA without a GPU: torch cannot pick an arch (and older releases crash trying).
    os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list(nvcc_version)

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
cxx_flags = ["-O0", "-g"] if _env_flag("BETANAS_DEBUG") else ["-O3"]
cxx_flags += ["-fopenmp"]
cpu_march = os.environ.get("BETANAS_CPU_MARCH", "native").strip()
if cpu_march:
    cxx_flags.append(f"-march={cpu_march}")
nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
include_dirs = [os.path.join(ROOT, "csrc")]
# The library uses no Python API beyond creating its (empty) module, so it is built for CPython's stable ABI
# (_C.abi3.so, Python >= 3.10): one build loads in every Python version of the torch it was built against, which
# lets a GPU machine with another Python use a library built elsewhere (benchmarks/gpu_library.py). torch then
# links no libtorch_python either.
define_macros = [("Py_LIMITED_API", "0x030A0000")]

if use_cuda:
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # ATen/cuda/CUDAContext.h includes cuBLAS/cuSPARSE headers that a bare toolkit may lack; the
    # nvidia-* wheels installed with torch ship them next to torch.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs += sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d))
    define_macros.append(("BETANAS_WITH_CUDA", None))
    ext = CUDAExtension(
        "betanas_fast._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"],
        py_limited_api=True)
else:
    ext = CppExtension(
        "betanas_fast._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"], py_limited_api=True)

print("betanas_fast build configuration:")
print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
print(f"  kernels: CPU{' + CUDA' if use_cuda else ' only'}"
      + ("" if use_cuda else f"  (torch CUDA: {torch.version.cuda}, toolkit: {cuda_home},"
                               f" BETANAS_FORCE_CPU={os.environ.get('BETANAS_FORCE_CPU', '0')})"))
if cuda_usable and not use_cuda:
    print("  no GPU visible and TORCH_CUDA_ARCH_LIST unset: no CUDA kernels built (set TORCH_CUDA_ARCH_LIST, "
          "e.g. \"9.0\", to build for GPUs elsewhere; BETANAS_FORCE_CUDA=1 for the default list)")
if use_cuda:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs' (" + ", ".join(
        sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})) + ")"
    print(f"  CUDA_HOME {cuda_home}, nvcc {nvcc_version}, architectures: {archs}")
print(f"  MAX_JOBS={os.environ.get('MAX_JOBS', '(torch default)')}, sources: {len(sources)}, "
      f"CPU -march={cpu_march or '(compiler default)'}")

BUILD_CONFIG = {
    "TORCH_VERSION": torch.__version__,
    "TORCH_CUDA_VERSION": torch.version.cuda,
    "WITH_CUDA": use_cuda,
    "CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if use_cuda else "",
    "NVCC_VERSION": ".".join(map(str, nvcc_version)) if nvcc_version else None,
    "CPU_MARCH": cpu_march,
    "CUDA_NOT_BUILT_BECAUSE": None if use_cuda or not cuda_usable else "no GPU visible and TORCH_CUDA_ARCH_LIST unset",
}


class BuildExt(BuildExtension):
    """Also writes betanas_fast/_build_config.py next to the library it builds (never into a source tree
    whose library came from elsewhere), so that build_info() reports how this very library was built."""

    def run(self):
        super().run()
        package_dir = os.path.join(ROOT if self.inplace else self.build_lib, "betanas_fast")
        with open(os.path.join(package_dir, "_build_config.py"), "w") as f:
            f.write("# Written by setup.py when it built _C.\n")
            # A source checkout without a library of its own loads an installed one only of its own version.
            for key, value in {"PACKAGE_VERSION": self.distribution.get_version(), **BUILD_CONFIG}.items():
                f.write(f"{key} = {value!r}\n")


# a wheel built from here says so in its tag (cp310-abi3)
setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt}, options={"bdist_wheel": {"py_limited_api": "cp310"}})
