"""Loads the compiled kernel library betanas_fast._C, and decides for every op whether its kernel or its
pure-PyTorch reference runs (`use_kernel`).

Importing the package never fails because of the kernels: when no usable library is found, a single
warning says why and what to do, and every op runs its reference instead. Set BETANAS_REQUIRE_KERNELS=1
to make that a hard error.

The library is the one in the package's own directory (an installed package, or a checkout built in
place). A source checkout without one, imported because `python -m ...` or `python -c ...` puts the
current directory first on sys.path, loads the library of an installed betanas_fast further along
sys.path instead, if that is the same version of the package, built against the running torch.
"""
import contextlib
import importlib.machinery
import importlib.util
import os
import runpy
import sys
import warnings
from typing import Iterator, List, Optional

import torch

from ._version import __version__

# Every op of the library (schemas in csrc/ops.cpp).
OP_NAMES = ("dw_bn_act_train", "dw_bn_act_train_backward", "dw_bn_act_eval", "dw_bn_act_eval_backward",
            "dw_bn_act_grouped_train", "dw_bn_act_grouped_train_backward", "block_gate_grads", "alpha_grad")

# The device types the library can have kernels for (TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/).
KERNEL_DEVICE_TYPES = ("cpu", "cuda")

REBUILD_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps ."
IN_PLACE_BUILD_COMMAND = "python setup.py build_ext --inplace"

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _library_file(package_dir: str) -> Optional[str]:
    """The compiled library in package_dir that this Python can load, if there is one."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(package_dir, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def _build_config(package_dir: str) -> Optional[dict]:
    """What setup.py recorded when it built the library in package_dir (its _build_config.py), if anything."""
    path = os.path.join(package_dir, "_build_config.py")
    if not os.path.isfile(path):
        return None
    return {key: value for key, value in runpy.run_path(path).items() if key.isupper()}


def _source_checkout(package_dir: str) -> Optional[str]:
    """The checkout whose source tree package_dir is (the directory above it holds setup.py), if it is one."""
    root = os.path.dirname(package_dir)
    return root if os.path.isfile(os.path.join(root, "setup.py")) else None


def _other_builds() -> Iterator[str]:
    """The other directories of this package on sys.path that hold a library, in sys.path order."""
    seen = {os.path.realpath(PACKAGE_DIR)}
    for entry in sys.path:
        package_dir = os.path.realpath(os.path.join(entry or os.getcwd(), __package__))
        if package_dir not in seen and _library_file(package_dir):
            seen.add(package_dir)
            yield package_dir


def _why_not_usable_here(config: Optional[dict]) -> Optional[str]:
    """Why another directory's library cannot stand in for this package's own, or None if it can."""
    if config is None:
        return "it has no _build_config.py"
    version = config.get("PACKAGE_VERSION")
    if version is None:
        return "its build did not record the package version"
    if version != __version__:
        return f"it is betanas_fast {version}, this source is {__version__}"
    if config.get("TORCH_VERSION") != torch.__version__:
        return f"it was built against torch {config.get('TORCH_VERSION')}, but torch {torch.__version__} is running"
    return None


def _advice(checkout: Optional[str]) -> str:
    if checkout is not None:
        return (f"To use the kernels, build them into this checkout ({IN_PLACE_BUILD_COMMAND}, run in {checkout}), "
                f"or install the package ({REBUILD_COMMAND}) and run from another directory")
    return f"Rebuild against the running torch from the source checkout with: {REBUILD_COMMAND}"


def _load(path: str) -> None:
    """Loads the library at path as betanas_fast._C; its static initialisers register the ops."""
    name = f"{__package__}._C"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module


def _find_and_load():
    """(path of the library loaded or None, its build config or None, why the kernels cannot be used or None)."""
    own = _library_file(PACKAGE_DIR)
    if own is not None:
        path, config = own, _build_config(PACKAGE_DIR)
        if config is not None and config.get("TORCH_VERSION") != torch.__version__:
            return None, config, (f"betanas_fast._C was built against torch {config.get('TORCH_VERSION')}, but "
                                  f"torch {torch.__version__} is running")
    else:
        path = config = None
        rejected: List[str] = []
        for package_dir in _other_builds():
            candidate_config = _build_config(package_dir)
            why_not = _why_not_usable_here(candidate_config)
            if why_not is None:
                path, config = _library_file(package_dir), candidate_config
                break
            rejected.append(f"{package_dir}: {why_not}")
        if path is None:
            checkout = _source_checkout(PACKAGE_DIR)
            if checkout is not None:
                problem = (f"betanas_fast is imported from the source checkout {checkout} (the current directory "
                           f"comes first on sys.path), which has no compiled library betanas_fast._C")
            else:
                problem = f"betanas_fast._C could not be loaded: {PACKAGE_DIR} has no compiled library"
            if rejected:
                problem += "; the builds elsewhere on sys.path cannot stand in for it (" + "; ".join(rejected) + ")"
            else:
                problem += "; no other build of betanas_fast is on sys.path"
            return None, None, problem
    try:
        _load(path)
    except (ImportError, OSError) as e:
        return None, config, f"betanas_fast._C could not be loaded from {path} ({e})"
    missing = [name for name in OP_NAMES if not hasattr(torch.ops.betanas, name)]
    if missing:
        return path, config, (f"betanas_fast._C at {path} does not define betanas::{', betanas::'.join(missing)}: "
                              f"it was built from another version of the source")
    return path, config, None


_library, _config, _load_error = _find_and_load()
KERNELS_LOADED = _load_error is None

if not KERNELS_LOADED:
    message = (f"{_load_error}. Every betanas_fast op falls back to its pure-PyTorch reference (slower). "
               f"{_advice(_source_checkout(PACKAGE_DIR))}")
    if os.environ.get("BETANAS_REQUIRE_KERNELS", "0").lower() in ("1", "true", "yes"):
        raise ImportError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether the loaded library has a kernel for `betanas::<op_name>` on `device_type` ("cpu"/"cuda")."""
    if not KERNELS_LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"betanas::{op_name}", device_type.upper())


# Asked once, at import: use_kernel is then plain Python over constants, which torch.compile traces.
_HAS_KERNEL = {(name, device): has_kernel(name, device) for name in OP_NAMES for device in KERNEL_DEVICE_TYPES}
_references_forced = False


def use_kernel(op_name: str, device_type: str) -> bool:
    """Whether `betanas::<op_name>` runs its compiled kernel on tensors of `device_type`; otherwise the op runs
    its pure-PyTorch reference (no library, a CPU-only build on a GPU, another backend, or `reference_ops`)."""
    return not _references_forced and _HAS_KERNEL.get((op_name, device_type), False)


@contextlib.contextmanager
def reference_ops():
    """Within this block every betanas op runs its pure-PyTorch reference, as if no kernel were built
    (to compare or benchmark the kernels against the references in one process)."""
    global _references_forced
    previous, _references_forced = _references_forced, True
    try:
        yield
    finally:
        _references_forced = previous


def build_info() -> dict:
    """How the kernel library was built, where it was loaded from, and which ops have CPU and CUDA kernels."""
    config = _config or {}
    return {
        "kernels_loaded": KERNELS_LOADED,
        "load_error": _load_error,
        "library": _library,
        "package_dir": PACKAGE_DIR,
        "package_version": __version__,
        "built_package_version": config.get("PACKAGE_VERSION"),
        "built_with_torch": config.get("TORCH_VERSION"),
        "built_with_torch_cuda": config.get("TORCH_CUDA_VERSION"),
        "running_torch": torch.__version__,
        "cuda_kernels_compiled": bool(config.get("WITH_CUDA", False)) and KERNELS_LOADED,
        "nvcc": config.get("NVCC_VERSION"),
        "cuda_archs": config.get("CUDA_ARCH_LIST", "") or None,
        "cuda_not_built_because": config.get("CUDA_NOT_BUILT_BECAUSE"),
        "cpu_march": config.get("CPU_MARCH"),
        "ops": {name: {device: has_kernel(name, device) for device in KERNEL_DEVICE_TYPES} for name in OP_NAMES},
    }
