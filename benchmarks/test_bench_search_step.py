"""The search step of the demo supernet (all 7 paths remaining in every block, as at the start of a
search; batch 64, 32x32 digits, fp32, in the engine's layout as the search runs, runs.runtime.model_memory_format:
channels_last), every implementation in the same process, in alternating order (conftest.record_alternating), on
the same inputs:

- Phase-2 step (`Supernet.gate_grad_table` + dL/dα, in fp32 as the engine runs it): betanas_fast (fused
  depthwise op, one block_gate_grads call per block, the α kernel) vs the fair baseline `torch_modules`
  (the same supernet from plain nn modules with the same weights, plain_supernet: the sampled path with
  autograd and frozen weights, every other remaining candidate's forward through its own modules reduced
  against dL/dO, dL/dα by autograd through the masked softmax); `betanas_fast_module_loop` (a variant: the
  same loop over the engine's own candidate modules, fused depthwise op included: what the all-candidate
  op alone gains) and `reference_oracle` (every op on its pure-PyTorch reference, the correctness oracle)
  are listed, not as speed-ups. The tables are checked to agree before the timing;
- whole search step (`phase_ratio` Phase-1 steps + one Phase-2 step, SGD and Adam included): betanas_fast
  vs `plain_torch_supernet` (plain_supernet.PlainSearch, checked by plain_supernet.check_matches_engine to
  compute the engine's numbers), each on its own Search from the same configuration and seed;
  `reference_oracle` listed;
- the cost of Phase 2's precision: the engine's fp32 Phase 2 vs the same step under bf16 autocast
  (`--phase2-amp`), whose α-gradient signs disagree with float64 far more often (tests/test_precision.py);
- peak memory of the Phase-2 step: the CPU allocation records of torch.profiler (or the CUDA
  allocator's peak on a GPU), reported under the tables.
On a GPU (the `cuda` cases: `pytest benchmarks/ -m cuda`) the same on CUDA, and the Phase-2 step also at ImageNet
shapes (mobile space, batch 256, 224x224, fp32 and bf16); and the check of the layout choice: the engine's Phase-1
step at ImageNet shapes in channels_last (`betanas_fast`, the engine's layout) against the same step in NCHW
(`betanas_fast_nchw`).
"""
import contextlib
import copy
import os
import tempfile

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from betanas_fast import ops
from betanas_fast.nn import set_bn_batch_stats_frozen
from betanas_fast.search import Search, SearchConfig

import plain_supernet as plain

# GPU cases carry the `cuda` marker (`pytest benchmarks/ -m cuda` selects them) and skip without a GPU.
CUDA = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def make_search(tmp, device="cpu", name="run", **kw):
    cfg = dict(space="demo", epochs=4, warmup_epochs=0, batch_size=64, heldout_batch_size=64, progress=False,
               plots=False, tensorboard=False, device=device, out=os.path.join(tmp, name), seed=0)
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


BETA = 0.05


def phase2_fns(s, plain_model, x, y, arch, precision="fp32"):
    """{impl: one Phase-2 step (gate-gradient table, then dL/dα)} on the same batch, path and weights. The
    baseline and the module loop run in the engine table's arithmetic (ops.ieee_fp32: float32 convolutions and
    matmuls in IEEE float32, which Supernet.gate_grad_table sets on CUDA; no effect on the CPU)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16" else None
    st, cost = s.state, s.cost.table

    def engine():
        gate = s.model.gate_grad_table(x, y, arch, st.remaining, autocast=autocast)[0]
        st.alpha_grad(gate, cost, BETA)
        sync()

    def torch_modules():
        with ops.ieee_fp32():
            gate = plain.gate_grad_table(plain_model, x, y, arch, st.remaining, autocast=autocast)[0]
        plain.alpha_grad(st.alpha, st.remaining, gate, cost, BETA)
        sync()

    def module_loop():
        with ops.ieee_fp32(), autocast or contextlib.nullcontext():
            gate = module_loop_gates(s, x, y, arch)
        st.alpha_grad(gate, cost, BETA)
        sync()

    def oracle():
        with ops.reference_ops():
            gate = s.model.gate_grad_table(x, y, arch, st.remaining, autocast=autocast)[0]
            st.alpha_grad(gate, cost, BETA)
        sync()

    return {"betanas_fast": engine, "torch_modules": torch_modules, "betanas_fast_module_loop": module_loop,
            "reference_oracle": oracle}


def check_phase2(s, plain_model, x, y, arch, report_line, label, precision="fp32"):
    """The gate-gradient tables of betanas_fast, torch_modules and the module loop agree (fp32: within 10 % of
    the largest entry, fp32 rounding alone moving either implementation's table by a few %; bf16: reported
    only), the loss to rounding, and the α gradients of the kernel and of autograd agree on the same table. On
    the CPU also in float64 (NCHW copies of the same weights): the same function, within 1e-5."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16" else None
    st = s.state
    want, loss, _ = s.model.gate_grad_table(x, y, arch, st.remaining, autocast=autocast)
    with ops.ieee_fp32():  # the engine's table arithmetic on CUDA (phase2_fns)
        got, loss_p, _ = plain.gate_grad_table(plain_model, x, y, arch, st.remaining, autocast=autocast)
        with autocast or contextlib.nullcontext():
            loop = module_loop_gates(s, x, y, arch)
    scale = float(want.abs().max())
    err, err_loop = float((got - want).abs().max()) / scale, float((loop - want).abs().max()) / scale
    if precision == "fp32":
        assert abs(loss - loss_p) <= 1e-5 * abs(loss), (loss, loss_p)
        assert err < 0.1 and err_loop < 0.1, (err, err_loop)
    torch.testing.assert_close(plain.alpha_grad(st.alpha, st.remaining, want, s.cost.table, BETA),
                               st.alpha_grad(want, s.cost.table, BETA), rtol=1e-5, atol=1e-7)
    line = (f"- Phase-2 step, {label}, {precision}: gate-gradient table, max |difference| / largest entry vs "
            f"betanas_fast: torch_modules {err:.1e}, betanas_fast_module_loop {err_loop:.1e}; loss {loss:.6f} vs "
            f"{loss_p:.6f}; dL/dα from the same table: autograd = the kernel")
    if x.device.type == "cpu":
        model64 = copy.deepcopy(s.model).double().to(memory_format=torch.contiguous_format)
        x64 = x.double().contiguous()
        want64 = model64.gate_grad_table(x64, y, arch, st.remaining)[0]
        got64 = plain.gate_grad_table(plain.PlainSupernet.like(model64), x64, y, arch, st.remaining)[0]
        scale64 = float(want64.abs().max())
        err64 = float((got64 - want64).abs().max()) / scale64
        assert err64 < 1e-5, err64
        line += (f"; in float64 torch_modules vs betanas_fast {err64:.1e}; fp32 vs float64: betanas_fast "
                 f"{float((want - want64).abs().max()) / scale64:.1e}, torch_modules "
                 f"{float((got - want64).abs().max()) / scale64:.1e}")
    report_line(line)


def heldout_batch(s, device):
    """A held-out batch as the engine's Phase 2 gets it (on the device, in the model's memory format) and a path."""
    x, y = s.data.heldout.batch(torch.arange(64), train=False)
    arch = s.state.sample_from_p(torch.Generator().manual_seed(1))
    return s._on_device(x), y.to(device), arch


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


PHASE2_SUITE = "Phase-2 step, demo supernet, 7 paths per block"


@pytest.mark.parametrize("device", DEVICES)
def test_phase2_step(record_alternating, report_line, device):
    with tempfile.TemporaryDirectory() as tmp:
        s = make_search(tmp, device)
        x, y, arch = heldout_batch(s, device)
        plain_model = plain.PlainSupernet.like(s.model, s.memory_format)
        check_phase2(s, plain_model, x, y, arch, report_line, f"demo, {device}")
        fns = phase2_fns(s, plain_model, x, y, arch)
        record_alternating(PHASE2_SUITE, {"device": device}, fns)
        peaks = {impl: peak_bytes(fn, device) for impl, fn in fns.items()}
    assert all(peak > 0 for peak in peaks.values())  # the measurement saw the step's allocations
    for impl, peak in peaks.items():
        report_line(f"- Phase-2 step peak memory (profiler allocation records), demo, {device}, {impl}: "
                    f"{peak / 2**20:.1f} MiB")


@pytest.mark.parametrize("device", DEVICES)
def test_phase2_precision(record_alternating, device):
    """What the fp32 Phase 2 costs against bf16 autocast (time ratio < 1: fp32 is slower)."""
    with tempfile.TemporaryDirectory() as tmp:
        s = make_search(tmp, device)
        x, y, arch = heldout_batch(s, device)
        plain_model = plain.PlainSupernet.like(s.model, s.memory_format)
        fp32, bf16 = (phase2_fns(s, plain_model, x, y, arch, p)["betanas_fast"] for p in ("fp32", "bf16"))
        record_alternating("Phase-2 step precision: fp32 (engine default) vs bf16 autocast, demo", {"device": device},
                           {"betanas_fast": fp32, "betanas_fast_bf16_autocast": bf16})


@pytest.mark.parametrize("device", DEVICES)
def test_search_step(record_alternating, report_line, device):
    """The whole step, each implementation on its own Search from the same configuration and seed (the same
    batches and paths every round), the plain one checked first to compute the engine's numbers."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        engine, base, oracle = (make_search(tmp, device, name) for name in ("engine", "plain", "oracle"))
        plain_search = plain.PlainSearch(base)
        with ops.ieee_fp32():  # the same arithmetic on both sides for the check (no TF32 on CUDA)
            errors = plain.check_matches_engine(engine, plain_search)
        with ops.reference_ops():
            oracle.phase1_step()  # the same batches from here on
        report_line(f"- plain_torch_supernet computes the engine's numbers, demo, {device} (max error / largest "
                    f"value): " + "; ".join(f"{k} {v:.1e}" for k, v in errors.items()))

        def stepper(search, run, reference=False):
            def step():
                search.state.remaining.copy_(search.state.allowed)  # keep every path: the same work in every round
                with ops.reference_ops() if reference else contextlib.nullcontext():
                    run()
                sync()
            return step

        record_alternating(f"whole search step ({engine.cfg.phase_ratio} Phase-1 + 1 Phase-2), demo",
                           {"device": device},
                           {"betanas_fast": stepper(engine, engine._iteration),
                            "plain_torch_supernet": stepper(base, plain_search.iteration),
                            "reference_oracle": stepper(oracle, oracle._iteration, reference=True)})
        for s in (engine, base, oracle):
            s.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="ImageNet shapes only on a GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_phase2_step_imagenet_shapes(record_alternating, report_line, precision):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        s = make_search(tmp, "cuda", space="mobile", heldout_batch_size=256, amp=True, amp_dtype="bf16")
        x = torch.randn(256, 3, 224, 224, device="cuda").contiguous(memory_format=s.memory_format)
        y = torch.randint(0, s.space.config.num_classes, (256,), device="cuda")
        arch = s.state.sample_from_p(torch.Generator().manual_seed(1))
        plain_model = plain.PlainSupernet.like(s.model, s.memory_format)
        check_phase2(s, plain_model, x, y, arch, report_line, "mobile, batch 256, 224x224, cuda", precision)
        fns = phase2_fns(s, plain_model, x, y, arch, precision)
        record_alternating(f"Phase-2 step, mobile space, batch 256, 224x224, {precision}", {"device": "cuda"}, fns)
        for impl, fn in fns.items():
            report_line(f"- Phase-2 peak memory at ImageNet shapes, {impl}, {precision}: "
                        f"{peak_bytes(fn, 'cuda') / 2**30:.2f} GiB")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="ImageNet shapes only on a GPU")
def test_phase1_step_layouts_imagenet_shapes(record_alternating, report_line):
    """The layout choice (runs.runtime.model_memory_format) checked on the device: the engine's Phase-1 weight step
    (forward, backward, SGD; bf16 autocast as --amp trains) of the mobile space at 224x224, batch 256, one path
    per block, in channels_last (`betanas_fast`, the engine's layout) and in NCHW (`betanas_fast_nchw`: the same
    Search with its model and batch converted), each on its own Search from the same configuration and seed, on
    the same batch and the same sequence of paths; the data pipeline is not timed. A time ratio
    betanas_fast_nchw / betanas_fast above 1: channels_last is the faster layout here."""
    layouts = {"betanas_fast": torch.channels_last, "betanas_fast_nchw": torch.contiguous_format}
    with tempfile.TemporaryDirectory() as tmp:
        searches = {impl: make_search(tmp, "cuda", impl, space="mobile", batch_size=256, heldout_batch_size=256,
                                      amp=True, amp_dtype="bf16") for impl in layouts}
        assert searches["betanas_fast"].memory_format == torch.channels_last  # the engine's layout on CUDA
        x_cpu, y_cpu = searches["betanas_fast"].data.train.batch(torch.arange(256), train=False)
        batches = {}
        for impl, s in searches.items():
            s.memory_format = layouts[impl]
            s.model.to(memory_format=layouts[impl])
            batches[impl] = (s._on_device(x_cpu), y_cpu.to(s.device))
        # the same function in both layouts: the same loss from the same weights, to bf16 rounding
        with torch.no_grad():
            losses = {}
            for impl, s in searches.items():
                x, y = batches[impl]
                arch = s.state.sample_uniform_cycle(torch.Generator().manual_seed(0))
                with s._autocast():
                    losses[impl] = float(torch.nn.functional.cross_entropy(s.model(x, arch).float(), y))
        assert abs(losses["betanas_fast_nchw"] - losses["betanas_fast"]) <= 2e-2 * abs(losses["betanas_fast"]), losses
        report_line(f"- Phase-1 step layouts, mobile, batch 256, 224x224, bf16, cuda: loss channels_last "
                    f"{losses['betanas_fast']:.5f}, NCHW {losses['betanas_fast_nchw']:.5f}")

        def stepper(s, x, y):
            paths = torch.Generator().manual_seed(1)  # the same sequence of paths in both: called as often

            def step():
                arch = s.state.sample_uniform_cycle(paths)
                s._weight_step(x, y, lambda inputs: s.model(inputs, arch), lambda: None)
                torch.cuda.synchronize()
            return step

        record_alternating("Phase-1 step by layout, mobile space, batch 256, 224x224, bf16 autocast",
                           {"device": "cuda"}, {impl: stepper(s, *batches[impl]) for impl, s in searches.items()})
        for s in searches.values():
            s.close()
