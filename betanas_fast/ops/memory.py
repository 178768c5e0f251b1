"""Host memory for a search on the CPU: `cache_cpu_allocations` installs the library's caching allocator
(csrc/cpu/caching_allocator.cpp), so that a step's activations reuse the blocks of the step before
instead of being page-faulted in (and zeroed by the kernel) again."""
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
