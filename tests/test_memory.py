"""The caching CPU allocator (betanas::cache_cpu_allocations): freed large blocks are handed out again,
small ones and every size class still work, the profiler still sees allocations, and results do not
change. Installing it is process-wide, as a search on the CPU does (runs.runtime.configure_process)."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import betanas_fast
from betanas_fast import ops
from betanas_fast.ops.memory import default_cache_bytes

pytestmark = pytest.mark.skipif(not betanas_fast.KERNELS_LOADED, reason="kernel library not built")


@pytest.fixture(scope="module")
def cached():
    assert ops.cache_cpu_allocations()


def test_freed_large_block_is_reused(cached):
    a = torch.empty(3 << 20, dtype=torch.uint8)
    ptr = a.data_ptr()
    del a
    b = torch.empty((3 << 20) - 1000, dtype=torch.uint8)  # the same size class
    assert b.data_ptr() == ptr
    assert b.data_ptr() % 64 == 0


def test_every_size_works_and_keeps_its_contents(cached):
    g = torch.Generator().manual_seed(0)
    for numel in (1, 7, 1000, 65535, 65537, 300_001, (1 << 20) + 3, 5 << 20):
        t = torch.randn(numel, generator=g)
        assert t.data_ptr() % 64 == 0
        u = t.clone()
        t.resize_(2 * numel)  # reallocates through the allocator and copies
        torch.testing.assert_close(t[:numel], u, rtol=0, atol=0)


def test_results_unchanged(cached):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, 20, 20, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(32, 16, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    out = F.relu6(F.batch_norm(F.conv2d(x, w, padding=1), None, None, training=True))
    out.sum().backward()
    # the same computation written out by hand in float64, checked against autograd's values
    z = F.conv2d(x.detach(), w.detach(), padding=1)
    mean, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(out.detach(), ((z - mean) / torch.sqrt(var + 1e-5)).clamp(0, 6))
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_profiler_sees_the_allocations(cached):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t = torch.ones(1 << 20)
        del t
    assert sum(e.cpu_memory_usage for e in prof.key_averages() if e.cpu_memory_usage > 0) >= 4 << 20


def test_bad_limit_is_refused():
    with pytest.raises(ValueError, match="max_cached_bytes must be >= 0"):
        ops.cache_cpu_allocations(-1)
    assert 0 < default_cache_bytes() <= 8 << 30
