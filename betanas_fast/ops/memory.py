"""Memory for a search: `cache_cpu_allocations` installs the library's caching allocator
(csrc/cpu/caching_allocator.cpp), so that a step's activations reuse the blocks of the step before
instead of being page-faulted in (and zeroed by the kernel) again; `default_phase2_budget` sizes the
extra memory that Phase 2's all-candidate op may take on a device."""
import os

import torch

from .._ext import KERNELS_LOADED


def default_cache_bytes() -> int:
    """A quarter of this machine's memory, at most 8 GiB: the free blocks the cache may keep."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(min(total // 4, 8 << 30))


def cache_cpu_allocations(max_cached_bytes: int = None) -> bool:
    """Install the caching CPU allocator (once per process) with at most `max_cached_bytes` of free blocks
    kept (default: default_cache_bytes()). Returns False, and changes nothing, without the compiled library."""
    if not KERNELS_LOADED or not hasattr(torch.ops.betanas, "cache_cpu_allocations"):
        return False
    limit = default_cache_bytes() if max_cached_bytes is None else int(max_cached_bytes)
    if limit < 0:
        raise ValueError(f"max_cached_bytes must be >= 0, got {limit}")
    torch.ops.betanas.cache_cpu_allocations(limit)
    return True


def _available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping, reclaimable page cache
    included; a container's own memory limit is not seen), else the free physical pages (os.sysconf,
    page cache not counted), else default_cache_bytes() (a quarter of physical memory, at most 8 GiB)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return default_cache_bytes()


def default_phase2_budget(device: torch.device, fraction: float = 0.5) -> int:
    """The memory budget (bytes) of Phase 2's all-candidate op (Supernet.gate_grad_table's memory_budget):
    `fraction` of the memory free on `device` now, leaving the rest for the sampled path's activations and
    graph, which exist at the same time, and for everything else on the machine. On CUDA the free memory is
    the driver's (torch.cuda.mem_get_info) plus what PyTorch's caching allocator holds unused (it hands
    that out first); elsewhere the host's available memory."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = _available_host_bytes()
    return int(max(free, 0) * fraction)
