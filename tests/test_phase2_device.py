"""Phase 2 and the batches on the device: the gate-gradient table in IEEE float32 (no TF32), fp16's dynamic loss
scale, one host synchronisation per table, per-sample routes sent once per step, page-locked batches copied without
blocking. The CUDA cases run where a GPU is present (benchmarks/gpu_check.sh selects them with `-m cuda`)."""
import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from betanas_fast import ops
from betanas_fast.data.stream import BatchStream, to_device
from betanas_fast.data.base import BatchOrder
from betanas_fast.nn import Supernet, set_bn_batch_stats_frozen
from betanas_fast.nn import supernet as supernet_module
from betanas_fast.nn.per_sample import per_sample_routes
from common import HAS_CUDA, phase2_net

cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]


def _phase2_net(device="cpu"):
    return phase2_net(torch.channels_last, device)[:5]


@pytest.fixture
def tf32_allowed():
    """Both TF32 switches on (as a user may set them), restored after the test."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_gate_grad_table_turns_tf32_off_while_it_runs(monkeypatch, tf32_allowed):
    net, x, y, arch, remaining = _phase2_net()
    seen = []
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    forward, block_op = Supernet.forward_with_blocks, ops.block_gate_grads

    def forward_spy(self, *args):
        seen.append(("sampled path", flags()))
        return forward(self, *args)

    def op_spy(*args, **kw):
        seen.append(("other candidates", flags()))
        return block_op(*args, **kw)

    monkeypatch.setattr(Supernet, "forward_with_blocks", forward_spy)
    monkeypatch.setattr(ops, "block_gate_grads", op_spy)
    net.gate_grad_table(x, y, arch, remaining)
    assert {part for part, _ in seen} == {"sampled path", "other candidates"}
    assert all(f == (False, False) for _, f in seen), seen
    assert flags() == (True, True)  # the process's settings back


class _Fp16Autocast(contextlib.nullcontext):
    fast_dtype = torch.float16


def test_fp16_loss_scale_halves_on_overflow_grows_and_gives_up(monkeypatch):
    """The control of Phase 2's fp16 loss scale, with the table's computation replaced by one that overflows when
    told: a table with a value that is not finite is recomputed at half the scale and the returned table is the
    finite one divided by its scale; the scale doubles after FP16_SCALE_GROWTH_STEPS finite tables; an overflow at
    the smallest scale is an error that names the way out."""
    net, x, y, arch, remaining = _phase2_net()
    entries = int(remaining.sum())  # the sampled path is one of the remaining ones in every block
    overflow, scales = [], []

    def fake_values(self, x, y, arch, others, autocast, timer, memory_budget, scale):
        scales.append(scale)
        values = torch.full((entries + 2,), 3.0, dtype=torch.float64) * scale
        values[-2:] = torch.tensor([1.5, 0.25])
        if overflow and overflow.pop(0):
            values[1] = float("inf")
        return values

    monkeypatch.setattr(Supernet, "_gate_grad_values", fake_values)
    init = supernet_module.FP16_SCALE_INIT
    overflow[:] = [True, True, False]
    table, loss, acc = net.gate_grad_table(x, y, arch, remaining, autocast=_Fp16Autocast())
    assert scales == [init, init / 2, init / 4]
    assert net._phase2_fp16_scale == init / 4
    assert (loss, acc) == (1.5, 0.25)
    assert int((table == 3.0).sum()) == entries and int((table != 0).sum()) == entries
    scales.clear()
    for _ in range(supernet_module.FP16_SCALE_GROWTH_STEPS - 1):  # one finite table is already counted
        net.gate_grad_table(x, y, arch, remaining, autocast=_Fp16Autocast())
    assert net._phase2_fp16_scale == init / 2 and set(scales) == {init / 4}
    # fp32: no scale, no retry, whatever the values
    scales.clear()
    overflow[:] = [True]
    table, _, _ = net.gate_grad_table(x, y, arch, remaining)
    assert scales == [1.0] and torch.isinf(table).any()
    net._phase2_fp16_scale = supernet_module.FP16_SCALE_MIN
    overflow[:] = [True]
    with pytest.raises(ValueError, match="not finite even at loss scale 1.*without --phase2-amp"):
        net.gate_grad_table(x, y, arch, remaining, autocast=_Fp16Autocast())


def test_gate_grads_as_floats_equal_the_table_entries():
    """ChoiceBlock.gate_grads (floats, for callers outside the table) gives every other candidate's table entry."""
    net, x, y, arch, remaining = _phase2_net()
    table, _, _ = net.gate_grad_table(x, y, arch, remaining)
    net.train()
    set_bn_batch_stats_frozen(net, True)
    logits, inputs, outputs = net.forward_with_blocks(x, arch)
    out_grads = torch.autograd.grad(F.cross_entropy(logits, y), outputs)
    set_bn_batch_stats_frozen(net, False)
    checked = 0
    for l, block in enumerate(net.blocks):
        others = [m for m in remaining[l].nonzero().flatten().tolist() if m != arch[l]]
        values = block.gate_grads(inputs[l].detach(), out_grads[l], others)
        assert list(values) == others or sorted(values) == sorted(others)
        for m, value in values.items():
            assert isinstance(value, float) and value == pytest.approx(float(table[l, m]), rel=1e-4, abs=1e-7)
            checked += 1
    assert checked == int(remaining.sum()) - len(arch)


def test_per_sample_routes_group_and_restore_the_samples():
    gen = torch.Generator().manual_seed(3)
    paths = torch.randint(0, 7, (5, 23), generator=gen)
    routes = per_sample_routes(paths, 7, torch.device("cpu"))
    for l, row in enumerate(paths):
        assert routes.counts[l] == torch.bincount(row, minlength=7).tolist()
        assert torch.equal(routes.order[l], torch.argsort(row, stable=True))
        assert torch.equal(row[routes.order[l]].sort().values, row[routes.order[l]])  # grouped by candidate
        assert torch.equal(routes.order[l][routes.inverse[l]], torch.arange(23))  # inverse undoes the grouping


def _sync_warnings(fn):
    """fn's result and the number of host synchronisations it caused (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.parametrize("dummy", [pytest.param(0, marks=cuda)])
def test_gate_grad_table_synchronises_once_on_cuda(dummy):
    net, x, y, arch, remaining = _phase2_net("cuda")
    net.gate_grad_table(x, y, arch, remaining)  # warm-up: cuDNN's algorithm search, allocations
    (table, _, _), syncs = _sync_warnings(lambda: net.gate_grad_table(x, y, arch, remaining))
    assert syncs == 1, f"{syncs} host synchronisations in one gate-gradient table"
    cpu_net, cx, cy, _, _ = _phase2_net("cpu")
    want, _, _ = cpu_net.gate_grad_table(cx, cy, arch, remaining)
    torch.testing.assert_close(table, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


@pytest.mark.parametrize("dummy", [pytest.param(0, marks=cuda)])
def test_per_sample_forward_does_not_synchronise_on_cuda(dummy):
    net, x, _, _, _ = _phase2_net("cuda")
    paths = torch.randint(0, 6, (net.space.num_blocks, x.shape[0]))
    net(x, [0] * net.space.num_blocks)  # warm-up
    net.forward_per_sample(x, paths)
    out, syncs = _sync_warnings(lambda: net.forward_per_sample(x, paths))
    assert syncs == 0, f"{syncs} host synchronisations in a per-sample forward"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dummy", [pytest.param(0, marks=cuda)])
def test_fp16_phase2_table_is_finite_and_near_fp32_on_cuda(dummy):
    net, x, y, arch, remaining = _phase2_net("cuda")
    want, _, _ = net.gate_grad_table(x, y, arch, remaining)
    got, _, _ = net.gate_grad_table(x, y, arch, remaining, autocast=torch.autocast("cuda", torch.float16))
    assert torch.isfinite(got).all()
    big = want.abs() > 0.01 * want.abs().max()
    assert (torch.sign(got[big]) == torch.sign(want[big])).float().mean() >= 0.9
    torch.testing.assert_close(got, want, rtol=0.1, atol=0.05 * float(want.abs().max()))


class _Split:
    decodes = True

    def __init__(self, n=32):
        self.x, self.y = torch.randn(n, 3, 8, 8), torch.arange(n) % 10

    def __len__(self):
        return len(self.x)

    def batch(self, idx, train, generator=None):
        return self.x[idx].clone(), self.y[idx].clone()


@pytest.mark.parametrize("prefetch", [pytest.param(0, marks=cuda), pytest.param(2, marks=cuda)])
def test_batches_are_pinned_in_the_stream_and_copied_without_blocking(prefetch):
    split = _Split()
    stream = BatchStream(split, BatchOrder(len(split), 8, 0), train=False, prefetch=prefetch, pin_memory=True,
                         memory_format=torch.channels_last)
    x, y = stream.next()
    stream.close()
    assert x.is_pinned() and y.is_pinned() and x.is_contiguous(memory_format=torch.channels_last)
    (xd, yd), syncs = _sync_warnings(lambda: (to_device(x, torch.device("cuda"), torch.channels_last),
                                              to_device(y, torch.device("cuda"), torch.contiguous_format)))
    assert syncs == 0 and xd.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(xd.cpu(), x) and torch.equal(yd.cpu(), y)


def test_unpinned_batches_reach_the_device_unchanged():
    split = _Split()
    stream = BatchStream(split, BatchOrder(len(split), 8, 0), train=False, prefetch=0)
    x, _ = stream.next()
    assert not x.is_pinned()
    out = to_device(x, torch.device("cpu"), torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, x)
