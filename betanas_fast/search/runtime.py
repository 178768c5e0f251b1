"""Process-wide settings of a run, in one place: device, threads, determinism, and the mixed-precision
dtype that makes this machine faster (or none)."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.utils.deterministic

from .. import ops


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Without it, CPU bf16 autocast runs
    3-4x slower than fp32."""
    cpu = getattr(torch._C, "_cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return cpu is not None and any(getattr(cpu, c, lambda: False)() for c in checks)


def resolve_amp_dtype(amp: bool, amp_dtype: str, device: torch.device, log=print) -> Optional[torch.dtype]:
    """The autocast dtype of a run, or None for fp32. `--amp` means mixed precision where it makes the
    run faster; an explicit `amp_dtype` is obeyed."""
    if not amp:
        return None
    if amp_dtype == "fp16":
        return torch.float16
    if amp_dtype == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cpu_has_native_bf16():
        return torch.bfloat16
    log(f"--amp: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16, where bf16 autocast is "
        f"slower than fp32: running in fp32 (--amp-dtype bf16 forces bf16)")
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """torch.autocast for `dtype`, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def configure_process(device: torch.device, threads: Optional[int], deterministic: bool = True) -> None:
    """Threads, determinism (which exact resume needs; on CUDA it costs speed) and, on the CPU, the caching
    host allocator."""
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    # ...without its NaN-filling of every new tensor (a guard against reading uninitialised memory, which
    # no op here does): on the CPU that fill cost as much as the small convolutions themselves.
    torch.utils.deterministic.fill_uninitialized_memory = False
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        # Every step allocates the same activations: reuse the blocks instead of page-faulting them in again.
        ops.cache_cpu_allocations()
