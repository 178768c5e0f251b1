"""The process-wide settings of a run: whether this CPU computes bf16 natively, and how `--amp` picks its
precision on one that does (a measurement of both, the faster one runs)."""
import copy
import math
import platform
import time

import pytest
import torch
from torch import nn

from betanas_fast.runs import provenance
from betanas_fast.runs import runtime
from betanas_fast.search.engine import supernet_step

from common import built

CPU = torch.device("cpu")


@pytest.mark.skipif(not provenance.cpu_flags(), reason="no /proc/cpuinfo flags to compare with (not Linux)")
def test_native_bf16_detector_agrees_with_cpuinfo():
    flags = set(provenance.cpu_flags())
    native = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    assert runtime.cpu_has_native_bf16() == native
    assert runtime.native_bf16_features() == [f for f in runtime.NATIVE_BF16_FLAGS if f in flags]
    if native:  # torch's oneDNN has bf16 kernels wherever the hardware computes bf16
        assert runtime.onednn_bf16_supported()
    if platform.machine() == "x86_64" and not flags & {"avx512bw", "avx_ne_convert"}:
        # oneDNN's bf16 starts at AVX512BW (emulated there, native with AVX512-BF16): an AVX2 CPU gets a no
        assert not runtime.onednn_bf16_supported()


@pytest.mark.parametrize("fp32_ms,bf16_ms,dtype,verdict", [(33.0, 41.0, None, "fp32"),
                                                           (40.0, 25.5, torch.bfloat16, "bf16"),
                                                           (30.0, 30.0, None, "fp32")])  # a tie: the accurate one
def test_choice_is_the_faster_precision_and_says_why(fp32_ms, bf16_ms, dtype, verdict):
    c = runtime.choose_cpu_amp(fp32_ms, bf16_ms, "Phase-1 step", cpu="AVX512-BF16")
    assert (c.dtype, c.fp32_ms, c.bf16_ms) == (dtype, fp32_ms, bf16_ms)
    assert c.reason == (f"--amp: bf16 autocast {bf16_ms:.3g} ms vs fp32 {fp32_ms:.3g} ms per Phase-1 step on this "
                        f"CPU (AVX512-BF16): running {verdict}")


@pytest.mark.parametrize("timings", [(12.0, 30.0), (30.0, 12.0)])
def test_measured_choice_with_a_fake_timer(timings):
    made, timed, lines = [], [], []

    def make_step():
        step = runtime.TimedStep(lambda context: None, "probe step")
        made.append(step)
        return step

    def timer(step, device):
        timed.append((step, device))
        return timings

    c = runtime.measure_cpu_amp(make_step, CPU, log=lines.append, timer=timer)
    assert len(made) == 1 and timed == [(made[0], CPU)]  # the step is built once and timed as given
    assert (c.fp32_ms, c.bf16_ms) == timings
    assert c.dtype == (torch.bfloat16 if timings[1] < timings[0] else None)
    assert lines == [c.reason] and "per probe step" in c.reason  # one line


def test_time_autocast_times_each_precision_in_its_context():
    """A step whose cost depends on the precision it runs in: 2 ms in fp32, 8 ms under bf16 autocast."""
    a = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def run(context):
        with context:
            seen.append((a @ a).dtype)
            time.sleep(0.008 if torch.is_autocast_enabled("cpu") else 0.002)

    fp32_ms, bf16_ms = runtime.time_autocast(runtime.TimedStep(run, "sleep"), CPU, repeats=4, warmup=2,
                                             budget_s=60)
    assert seen.count(torch.float32) == seen.count(torch.bfloat16) == 2 + 4 and len(seen) == 12
    assert seen[:4] == [torch.float32, torch.bfloat16] * 2  # the warm-up, then pairs in turn first
    assert seen[4:8] == [torch.float32, torch.bfloat16, torch.bfloat16, torch.float32]
    assert 2 <= fp32_ms < 1000 and 8 <= bf16_ms < 1000 and bf16_ms > fp32_ms
    # the budget shortens the pairs to the minimum, never below it
    seen.clear()
    runtime.time_autocast(runtime.TimedStep(run, "sleep"), CPU, repeats=50, warmup=0, budget_s=0, min_pairs=3)
    assert len(seen) == 6
    with pytest.raises(ValueError, match="repeats >= 1"):
        runtime.time_autocast(runtime.TimedStep(run, "sleep"), CPU, repeats=0)


def _snapshot(s):
    return {"model": {k: v.clone() for k, v in s.model.state_dict().items()},
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in s.model.named_parameters()},
            "sgd": copy.deepcopy(s.sgd.state_dict()), "rng": torch.get_rng_state(),
            "path_gen": s.path_gen.get_state()}


def _assert_same(a, b):
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # weights and BN statistics
    assert all((a["grads"][n] is None) == (b["grads"][n] is None)
               and (a["grads"][n] is None or torch.equal(a["grads"][n], b["grads"][n])) for n in a["grads"])
    sa, sb = a["sgd"], b["sgd"]
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    assert all(torch.equal(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"]) for i in sa["state"])
    assert torch.equal(a["rng"], b["rng"]) and torch.equal(a["path_gen"], b["path_gen"])


def test_amp_probe_leaves_the_search_state_untouched(tmp_path):
    s = built(tmp_path, threads=1)
    for _ in range(2):  # momentum buffers and gradients to keep
        s.phase1_step()
    before = _snapshot(s)
    assert before["sgd"]["state"] and any(g is not None for g in before["grads"].values())
    x, y = s.data.train.batch(torch.arange(16), train=False)
    x = x.contiguous(memory_format=torch.channels_last)
    path = [int(row.nonzero()[0]) for row in s.state.allowed]
    step = runtime.forward_backward_step(s.model, x, y, lambda m, inputs: m(inputs, path), "probe")
    times = runtime.time_autocast(step, CPU, repeats=2, warmup=1, min_pairs=1)
    search_step = supernet_step(s.space, s.data.train, s.local_batch, CPU, torch.channels_last)
    times += runtime.time_autocast(search_step, CPU, repeats=1, warmup=1, min_pairs=1)
    assert all(0 < t < 60_000 and math.isfinite(t) for t in times)
    _assert_same(before, _snapshot(s))
    assert "Phase-1 forward+backward" in search_step.what and f"({min(s.local_batch, 392)} images)" in search_step.what


def test_forward_backward_step_trains_a_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 10, 10, generator=g), torch.randint(0, 4, (6,), generator=g)
    model(x)  # materialises the lazy layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outputs = []

    def forward(m, inputs):
        out = m(inputs)
        outputs.append((out.dtype, m is model))
        return out

    step = runtime.forward_backward_step(model, x, y, forward, "conv")
    step.run(runtime.autocast(CPU, None))
    step.run(runtime.autocast(CPU, torch.bfloat16))
    assert outputs == [(torch.float32, False), (torch.bfloat16, False)]  # a copy, in each context's precision
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_measured_choice_on_a_real_supernet_step(tmp_path):
    """The branch --amp takes on a CPU with native bf16, run here on a real Phase-1 step of the search's space
    (on a CPU without it bf16 is the slow one, which does not matter to what is checked)."""
    s = built(tmp_path, threads=1)
    lines = []
    c = runtime.measure_cpu_amp(lambda: supernet_step(s.space, s.data.train, s.local_batch, CPU,
                                                              torch.channels_last),
                                CPU, log=lines.append, timer=lambda step, device: runtime.time_autocast(
                                    step, device, repeats=3, budget_s=0))
    assert 0 < c.fp32_ms < 60_000 and 0 < c.bf16_ms < 60_000
    assert c.dtype == (torch.bfloat16 if c.bf16_ms < c.fp32_ms else None)
    assert lines == [c.reason] and f"per Phase-1 forward+backward ({s.local_batch} images)" in c.reason
