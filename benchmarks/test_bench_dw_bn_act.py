"""The fused depthwise stage against the fair baseline `aten`, the ATen composite a PyTorch user writes
(F.conv2d groups=C + F.batch_norm + F.relu6) on the same tensors in the same layout, in alternating order in
the same process: forward and forward+backward, train and eval.

CPU: the embedded demo's shapes (N=64, fp32), NCHW and (training mode) NHWC, each against ATen in the same
layout; set BETANAS_BENCH_FULL=1 for every C x H combination.
CUDA (`-m cuda`; skipped without a GPU): MobileNetV2 ImageNet shapes (N=256, bf16, in the engine's layout,
runs.runtime.model_memory_format: channels_last), plus the eval-mode k=3 bandwidth against the device's measured
copy bandwidth.
"""
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from betanas_fast import ops
from betanas_fast.runs.runtime import model_memory_format

FULL = os.environ.get("BETANAS_BENCH_FULL") == "1"
# The demo supernet's depthwise stages: channels grow as resolution shrinks.
CPU_SHAPES = (list(itertools.product((48, 96, 144), (32, 16, 8))) if FULL else [(48, 32), (96, 16), (144, 8)])
CUDA_SHAPES = list(itertools.product((96, 144, 240), (56, 28, 14)))
KERNEL_SIZES = (3, 5, 7)
EPS, MOMENTUM = 1e-5, 0.1


def make_case(device, dtype, n, c, hw, k, memory_format):
    g = torch.Generator().manual_seed(c * 1000 + hw * 10 + k)
    x = torch.randn(n, c, hw, hw, generator=g).to(device, dtype).contiguous(memory_format=memory_format)
    weight = (torch.randn(c, 1, k, k, generator=g) / k).to(device, dtype)
    gamma = (torch.rand(c, generator=g) + 0.5).to(device, dtype)
    beta = torch.randn(c, generator=g).to(device, dtype)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    return x, weight, gamma, beta, rm, rv


def fused(x, weight, gamma, beta, rm, rv, training):
    return ops.dw_bn_act(x, weight, gamma, beta, rm, rv, stride=1, act="relu6", training=training,
                         momentum=MOMENTUM, eps=EPS)


def composite(x, weight, gamma, beta, rm, rv, training):
    z = F.conv2d(x, weight, padding=weight.shape[-1] // 2, groups=x.shape[1])
    return F.relu6(F.batch_norm(z, rm, rv, gamma, beta, training, MOMENTUM, EPS))


IMPLS = {"betanas_fast": fused, "aten": composite}


def make_step(impl, tensors, training, backward, sync):
    x, weight, gamma, beta, rm, rv = tensors
    if not backward:
        def step():
            with torch.no_grad():
                impl(x, weight, gamma, beta, rm, rv, training)
            sync()
        return step
    leaves = [t.detach().requires_grad_(True) for t in (x, weight, gamma, beta)]
    torch.manual_seed(0)  # the same dL/dy for every implementation, in the layout of its own output
    grad = torch.randn_like(impl(*leaves, rm, rv, training))

    def step():
        for t in leaves:
            t.grad = None
        impl(*leaves, rm, rv, training).backward(grad)
        sync()
    return step


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("k", KERNEL_SIZES)
@pytest.mark.parametrize("c,hw", CPU_SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cpu_demo_shapes(record_alternating, pass_, mode, k, c, hw, layout):
    if layout == "nhwc" and mode == "eval":
        pytest.skip("evaluation mode computes channels_last inputs in NCHW: the nchw rows are its kernels")
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    tensors = make_case("cpu", torch.float32, 64, c, hw, k, fmt)
    record_alternating("CPU fp32 N=64 stride 1 (ATen in the same layout)",
                       {"layout": layout, "C": c, "HxW": hw, "k": k, "mode": mode, "pass": pass_},
                       {impl: make_step(fn, tensors, mode == "train", pass_ == "fwd+bwd", lambda: None)
                        for impl, fn in IMPLS.items()})


# GPU cases carry the `cuda` marker (`pytest benchmarks/ -m cuda` selects them) and skip without a GPU.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA_LAYOUT = model_memory_format(torch.device("cuda"))  # the engine's: channels_last


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("k", KERNEL_SIZES)
@pytest.mark.parametrize("c,hw", CUDA_SHAPES)
def test_cuda_imagenet_shapes(record_alternating, pass_, mode, k, c, hw):
    torch.backends.cudnn.benchmark = True
    tensors = make_case("cuda", torch.bfloat16, 256, c, hw, k, CUDA_LAYOUT)
    record_alternating("CUDA bf16 channels_last N=256 stride 1",
                       {"C": c, "HxW": hw, "k": k, "mode": mode, "pass": pass_},
                       {impl: make_step(fn, tensors, mode == "train", pass_ == "fwd+bwd", torch.cuda.synchronize)
                        for impl, fn in IMPLS.items()})


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("c,hw", CUDA_SHAPES)
def test_cuda_eval_k3_bandwidth(benchmark, report_line, c, hw):
    """Eval-mode k=3 forward reads x and writes y once: its bytes / time against a device copy, each the mean of
    50 calls between CUDA events, both inside one pytest-benchmark round (so that --benchmark-only runs it)."""
    x, weight, gamma, beta, rm, rv = make_case("cuda", torch.bfloat16, 256, c, hw, 3, CUDA_LAYOUT)
    y = torch.empty_like(x)

    def timed(fn, reps=50):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    seconds = {}

    def measure():
        seconds["copy"] = timed(lambda: y.copy_(x))
        with torch.no_grad():
            seconds["fused"] = timed(lambda: fused(x, weight, gamma, beta, rm, rv, False))

    benchmark.group = f"CUDA eval k=3 bandwidth: C={c} HxW={hw}"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    copy_s, fused_s = seconds["copy"], seconds["fused"]
    nbytes = 2 * x.numel() * x.element_size()
    copy_bw, fused_bw = nbytes / copy_s / 1e9, nbytes / fused_s / 1e9
    report_line(f"- eval k=3 C={c} {hw}x{hw}: {fused_bw:.0f} GB/s = {100 * fused_bw / copy_bw:.0f}% of "
                       f"copy bandwidth ({copy_bw:.0f} GB/s)")
