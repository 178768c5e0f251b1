"""Loads the compiled kernel library betanas_fast._C, or explains why not and lets the ops fall back.

Importing the package never fails because of the kernels: when `_C` is missing, or was built against
another torch than the one running, a single warning gives the command that rebuilds it, and every op
runs its pure-PyTorch reference instead. Set BETANAS_REQUIRE_KERNELS=1 to make that a hard error.
"""
import os
import warnings

import torch

REBUILD_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps ."

try:
    from . import _build_config as _config
except ImportError:  # a source tree that was never built
    _config = None

_load_error = None
if _config is not None and _config.TORCH_VERSION != torch.__version__:
    _load_error = (f"betanas_fast._C was built against torch {_config.TORCH_VERSION}, but torch "
                   f"{torch.__version__} is running")
else:
    try:
        from . import _C  # noqa: F401  (loading the library registers the ops)
    except (ImportError, OSError) as e:
        _load_error = f"betanas_fast._C could not be loaded ({e})"

KERNELS_LOADED = _load_error is None

if not KERNELS_LOADED:
    message = (f"{_load_error}; every betanas_fast op falls back to its pure-PyTorch reference (slower). "
               f"Rebuild against the running torch from the source checkout with: {REBUILD_COMMAND}")
    if os.environ.get("BETANAS_REQUIRE_KERNELS", "0").lower() in ("1", "true", "yes"):
        raise ImportError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether the compiled library has a kernel for `betanas::<op_name>` on `device_type` ("cpu"/"cuda")."""
    if not KERNELS_LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"betanas::{op_name}", device_type.upper())


def build_info() -> dict:
    """How the kernel library was built, and which ops have CPU and CUDA kernels."""
    from .ops import OP_NAMES

    return {
        "kernels_loaded": KERNELS_LOADED,
        "load_error": _load_error,
        "built_with_torch": getattr(_config, "TORCH_VERSION", None),
        "built_with_torch_cuda": getattr(_config, "TORCH_CUDA_VERSION", None),
        "running_torch": torch.__version__,
        "cuda_kernels_compiled": bool(getattr(_config, "WITH_CUDA", False)) and KERNELS_LOADED,
        "nvcc": getattr(_config, "NVCC_VERSION", None),
        "cuda_archs": getattr(_config, "CUDA_ARCH_LIST", "") or None,
        "cpu_march": getattr(_config, "CPU_MARCH", None),
        "ops": {name: {"cpu": has_kernel(name, "cpu"), "cuda": has_kernel(name, "cuda")} for name in OP_NAMES},
    }
