"""The search step of the demo supernet (all 7 paths remaining in every block, as at the start of a
search; batch 64, 32x32 digits, fp32) with the kernels against the references, in one run:

- Phase-2 step (`Supernet.gate_grad_table` + the α gradient, in fp32 as the engine runs it): betanas_fast (fused depthwise op and one
  block_gate_grads call per block) vs `reference` (every op's pure-PyTorch reference: the sampled path
  with autograd, then an eager no-grad loop over the other candidates) vs `module-loop` (the loop over
  the candidates' own modules that the engine ran before the all-candidate op, with the fused
  depthwise kernel);
- whole search step (`phase_ratio` Phase-1 steps + one Phase-2 step, SGD and Adam included): kernels
  vs references;
- the cost of Phase 2's precision: the engine's fp32 Phase 2 vs the same step under bf16 autocast
  (`--phase2-amp`), whose α-gradient signs disagree with float64 far more often (tests/test_precision.py);
- peak memory of the Phase-2 step: the CPU allocation records of torch.profiler (or the CUDA
  allocator's peak on a GPU), reported under the tables.
On a GPU the Phase-2 step also runs at ImageNet shapes (mobile space, batch 256, 224x224, fp32 and bf16).
"""
import contextlib
import os
import tempfile

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from betanas_fast import ops
from betanas_fast.nn import set_bn_batch_stats_frozen
from betanas_fast.search import Search, SearchConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_search(tmp, device="cpu", **kw):
    cfg = dict(space="demo", epochs=4, warmup_epochs=0, batch_size=64, heldout_batch_size=64, progress=False,
               plots=False, tensorboard=False, device=device, out=os.path.join(tmp, "run"), seed=0)
    cfg.update(kw)
    s = Search(SearchConfig(**cfg))
    s._build()
    return s


def module_loop_gates(s, x, y, arch):
    """The engine's Phase-2 gate gradients before the all-candidate op: every other remaining candidate
    through its own modules (no_grad), reduced against dL/dO one at a time."""
    model, remaining = s.model, s.state.remaining
    model.train()
    set_bn_batch_stats_frozen(model, True)
    try:
        logits, inputs, outputs = model.forward_with_blocks(x, arch)
        out_grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), outputs)
        gate = torch.zeros(remaining.shape)
        with torch.no_grad():
            for l, block in enumerate(model.blocks):
                for m in remaining[l].nonzero().flatten().tolist():
                    o = outputs[l] if m == arch[l] else block(inputs[l], m)
                    gate[l, m] = (o.float() * out_grads[l].float()).sum()
    finally:
        set_bn_batch_stats_frozen(model, False)
    return gate


PHASE2 = {
    "betanas_fast": lambda s, x, y, arch, autocast=None: s.model.gate_grad_table(x, y, arch, s.state.remaining,
                                                                                  autocast=autocast)[0],
    "module-loop": module_loop_gates,
}


def phase2_fn(impl, s, x, y, arch, precision="fp32"):
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    gates = PHASE2.get(impl, PHASE2["betanas_fast"])
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16" else None

    def step():
        if impl == "module-loop":
            with autocast or contextlib.nullcontext():
                gate = gates(s, x, y, arch)
        else:
            with ops.reference_ops() if impl == "reference" else contextlib.nullcontext():
                gate = gates(s, x, y, arch, autocast)
        s.state.alpha_grad(gate, s.cost.table, 0.05)
        sync()

    return step


def heldout_batch(s, device):
    x, y = s.data.heldout.batch(torch.arange(64), train=False)
    arch = s.state.sample_from_p(torch.Generator().manual_seed(1))
    return x.to(device), y.to(device), arch


def peak_bytes(fn, device):
    """Peak bytes allocated during fn() above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() - base
    # The profiler's allocation records (bytes, negative for a free; the data export_memory_timeline reads) in
    # time order, summed: the running total's maximum. Not export_memory_timeline itself: its data-flow analysis
    # of the same records asserts ("version mismatch") on some patterns of address reuse.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)

    records = sorted((e.start_time_ns, e.typed[1].alloc_size)
                     for e in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu")
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return float(peak)


@pytest.mark.parametrize("impl", ["betanas_fast", "reference", "module-loop"])
@pytest.mark.parametrize("device", DEVICES)
def test_phase2_step(record, report_line, impl, device):
    with tempfile.TemporaryDirectory() as tmp:
        s = make_search(tmp, device)
        x, y, arch = heldout_batch(s, device)
        step = phase2_fn(impl, s, x, y, arch)
        record("Phase-2 step, demo supernet, 7 paths per block", {"device": device}, impl, step)
        peak = peak_bytes(step, device)
    assert peak > 0  # the measurement saw the step's allocations
    report_line(f"- Phase-2 step peak memory (profiler allocation records), demo, {device}, {impl}: "
                f"{peak / 2**20:.1f} MiB")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_phase2_precision(record, precision, device):
    """What the fp32 Phase 2 costs against bf16 autocast (ratio > 1: fp32 is faster)."""
    with tempfile.TemporaryDirectory() as tmp:
        s = make_search(tmp, device)
        x, y, arch = heldout_batch(s, device)
        impl = "betanas_fast" if precision == "fp32" else "bf16 autocast"
        record("Phase-2 step precision: fp32 (engine default) vs bf16 autocast, demo", {"device": device}, impl,
               phase2_fn("betanas_fast", s, x, y, arch, precision))


@pytest.mark.parametrize("impl", ["betanas_fast", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_search_step(record, impl, device):
    with tempfile.TemporaryDirectory() as tmp:
        s = make_search(tmp, device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def step():
            s.state.remaining.copy_(s.state.allowed)  # keep every path: the same work in every round
            if impl == "reference":
                with ops.reference_ops():
                    s._iteration()
            else:
                s._iteration()
            sync()

        record(f"whole search step ({s.cfg.phase_ratio} Phase-1 + 1 Phase-2), demo", {"device": device}, impl, step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="ImageNet shapes only on a GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["betanas_fast", "reference", "module-loop"])
def test_phase2_step_imagenet_shapes(record, report_line, impl, precision):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        s = make_search(tmp, "cuda", space="mobile", heldout_batch_size=256, amp=True, amp_dtype="bf16")
        x = torch.randn(256, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, s.space.config.num_classes, (256,), device="cuda")
        arch = s.state.sample_from_p(torch.Generator().manual_seed(1))
        fn = phase2_fn(impl, s, x, y, arch, precision)
        record(f"Phase-2 step, mobile space, batch 256, 224x224, {precision}", {"device": "cuda"}, impl, fn)
        report_line(f"- Phase-2 peak memory at ImageNet shapes, {impl}, {precision}: "
                    f"{peak_bytes(fn, 'cuda') / 2**30:.2f} GiB")
