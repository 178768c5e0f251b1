"""The grouped ops' single-launch ragged CUDA kernels against what they replace, in one run (GPU only; every test
skips without CUDA):

- `dw_bn_act_grouped_train` forward+backward (one ragged launch each, every group's channels at once) vs the
  fair baseline `aten_per_group` (a Python loop over the groups, each through F.conv2d groups=C +
  F.batch_norm + F.relu6 on views of the flat tensors, the outputs concatenated, then backward) and the
  variant `betanas_fast_per_group` (the same loop calling the dense `ops.dw_bn_act_train`). Demo shapes (64 samples over
  the 7 paths of a choice block: the 6 MBConv paths' groups of 8-10 samples, 48-144 channels, 32x32 / 16x16 /
  8x8, fp32) and ImageNet shapes (batch 256 over the 7 paths: 6 groups of 36-38 samples, 112x112 with 96/192
  channels, 112->56 stride 2, 56x56 with 72/144, 28x28, 14x14 with 240/480; bf16).
- `block_gate_grads` (expand GEMM, one BN-statistics launch, one ragged depthwise launch, a GEMM per candidate,
  one reduction launch; block input and dL/dO in the engine's layout, channels_last) vs the fair baseline
  `torch_modules` (the eager loop a PyTorch user writes: every candidate through F.conv2d / F.batch_norm on batch
  statistics / F.relu6 / F.conv2d groups=C / ... under autocast for bf16, reduced against dL/dO one at a time), the
  variant `betanas_fast_per_group` (the same stages with the dense fused depthwise kernel launched once per
  candidate and ATen batch norms) and
  `reference_oracle` (reference.grouped.block_gate_grads, the correctness oracle, listed only), at demo and
  ImageNet block shapes, fp32 (Phase 2's precision) and one bf16 case.
Every implementation of a case runs in alternating order in the same process, on the same tensors; the
baselines are checked against the kernel first.

Required on the GPU: the ragged op >= 2x the per-group composition of its dense kernel at demo and ImageNet
shapes, block_gate_grads >= 3x the eager loop of torch modules. Nothing asserts speed: each ratio is printed
under the tables with its required minimum (lines "- required ratio: ..."), which benchmarks/gpu_check.sh
repeats in its summary.
"""
import contextlib
import statistics

import pytest
import torch
import torch.nn.functional as F

from betanas_fast import ops
from betanas_fast._rules import conv_out_size, stats_dtype
from betanas_fast.nn.mbconv import MBConv
from betanas_fast.reference import grouped as ref
from betanas_fast.runs.runtime import model_memory_format

# GPU only: every benchmark here carries the `cuda` marker (`pytest benchmarks/ -m cuda`) and skips without a GPU.
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

EPS = 1e-5
ACT = "relu6"
# The MBConv paths of a choice block, (kernel size, expansion); the seventh path, the identity, has no
# depthwise stage and is not part of either op.
CANDIDATES = [(3, 3), (3, 6), (5, 3), (5, 6), (7, 3), (7, 6)]
REQUIRED = {"betanas_fast_per_group": 2.0}  # dw_bn_act_grouped_train: minimum ratio other / ragged
GATE_REQUIRED = {"torch_modules": 3.0}  # block_gate_grads

# name -> (samples per group, input channels, H = W, stride, dtype); group j has Cin * e_j channels.
GROUPED_CASES = {
    "demo-32x32": ([9, 8, 10, 9, 10, 9], 16, 32, 1, torch.float32),
    "demo-16x16": ([9, 8, 10, 9, 10, 9], 24, 16, 1, torch.float32),
    "demo-8x8": ([9, 8, 10, 9, 10, 9], 24, 8, 1, torch.float32),
    "imagenet-112x112": ([37, 36, 38, 37, 36, 38], 32, 112, 1, torch.bfloat16),
    "imagenet-112to56-s2": ([37, 36, 38, 37, 36, 38], 16, 112, 2, torch.bfloat16),
    "imagenet-56x56": ([37, 36, 38, 37, 36, 38], 24, 56, 1, torch.bfloat16),
    "imagenet-28x28": ([37, 36, 38, 37, 36, 38], 40, 28, 1, torch.bfloat16),
    "imagenet-14x14": ([37, 36, 38, 37, 36, 38], 80, 14, 1, torch.bfloat16),
}

# name -> (N, Cin, Cout, H = W, stride, dtype): one choice block's six MBConv candidates.
GATE_CASES = {
    "demo-16x16-8to16-s2": (64, 8, 16, 16, 2, torch.float32),
    "demo-8x8-16to16": (64, 16, 16, 8, 1, torch.float32),
    "demo-4x4-24to24": (64, 24, 24, 4, 1, torch.float32),
    "imagenet-112to56-16to24-s2": (256, 16, 24, 112, 2, torch.float32),
    "imagenet-56x56-24to24": (256, 24, 24, 56, 1, torch.float32),
    "imagenet-28x28-40to40": (256, 40, 40, 28, 1, torch.float32),
    "imagenet-14x14-80to80": (256, 80, 80, 14, 1, torch.float32),
    "imagenet-7x7-160to160": (256, 160, 160, 7, 1, torch.float32),
    "imagenet-56x56-24to24-bf16": (256, 24, 24, 56, 1, torch.bfloat16),
}

def required_lines(report_line, samples, name, required, what):
    """Each implementation's ratio of medians to betanas_fast (but the oracle's), with its required minimum if
    any."""
    med = {impl: statistics.median(v) for impl, v in samples.items()}
    for impl, seconds in med.items():
        if impl in ("betanas_fast", "reference_oracle"):
            continue
        ratio = seconds / med["betanas_fast"]
        need = required.get(impl)
        verdict = f"(required >= {need:g}x) {'ok' if ratio >= need else 'BELOW'}" if need else "(no minimum)"
        report_line(f"- required ratio: {what}, {name}: {impl} / betanas_fast = {ratio:.2f}x {verdict}")


# ---------------------------------------------------------------------------------------------------------
# dw_bn_act_grouped_train forward + backward.

def grouped_tensors(samples, cin, hw, dtype):
    channels = [cin * e for _, e in CANDIDATES]
    kernels = [k for k, _ in CANDIDATES]
    g = torch.Generator().manual_seed(hw * 100 + cin)
    numel = sum(n * c for n, c in zip(samples, channels)) * hw * hw
    x = (torch.randn(numel, generator=g) * 2 + 0.3).to("cuda", dtype)
    w = (torch.randn(sum(c * k * k for c, k in zip(channels, kernels)), generator=g) / 4).cuda()
    gamma = (torch.rand(sum(channels), generator=g) + 0.5).cuda()
    beta = (torch.randn(sum(channels), generator=g) * 0.5).cuda()
    leaves = [t.requires_grad_(True) for t in (x, w, gamma, beta)]
    return leaves, (list(samples), channels, kernels)


def ragged_forward(leaves, groups, hw, stride):
    return ops.dw_bn_act_grouped_train(*leaves, *groups, hw, hw, stride, ACT, EPS)[0]


def per_group_forward(leaves, groups, hw, stride):
    """The composition the ragged kernel replaces: the dense fused op once per group, on views of the flat
    tensors, its outputs concatenated into the op's flat output."""
    x, w, gamma, beta = leaves
    outs = []
    for (xo, xn, _, _, co, wo), n, c, k in zip(ref.group_layout(*groups, hw, hw, stride), *groups):
        if n == 0:
            continue
        out, _, _ = ops.dw_bn_act_train(x[xo:xo + xn].view(n, c, hw, hw), w[wo:wo + c * k * k].view(c, 1, k, k),
                                        gamma[co:co + c], beta[co:co + c], stride, ACT, EPS)
        outs.append(out.reshape(-1))
    return torch.cat(outs)


def aten_per_group_forward(leaves, groups, hw, stride):
    """What a PyTorch user writes: per group, F.conv2d(groups=C) + F.batch_norm (batch statistics) + F.relu6 on
    views of the flat tensors, the outputs concatenated into the op's flat output."""
    x, w, gamma, beta = leaves
    outs = []
    for (xo, xn, _, _, co, wo), n, c, k in zip(ref.group_layout(*groups, hw, hw, stride), *groups):
        if n == 0:
            continue
        z = F.conv2d(x[xo:xo + xn].view(n, c, hw, hw), w[wo:wo + c * k * k].view(c, 1, k, k).to(x.dtype),
                     stride=stride, padding=k // 2, groups=c)
        out = F.relu6(F.batch_norm(z, None, None, gamma[co:co + c].to(z.dtype), beta[co:co + c].to(z.dtype), True,
                                   0.0, EPS))
        outs.append(out.reshape(-1))
    return torch.cat(outs)


GROUPED_IMPLS = {"betanas_fast": ragged_forward, "aten_per_group": aten_per_group_forward,
                 "betanas_fast_per_group": per_group_forward}


@pytest.mark.parametrize("name", list(GROUPED_CASES))
def test_cuda_grouped_fwd_bwd(record_alternating, report_line, name):
    samples, cin, hw, stride, dtype = GROUPED_CASES[name]
    leaves, groups = grouped_tensors(samples, cin, hw, dtype)
    want = ragged_forward(leaves, groups, hw, stride).detach().float()
    for impl in ("aten_per_group", "betanas_fast_per_group"):
        got = GROUPED_IMPLS[impl](leaves, groups, hw, stride).detach().float()
        err = float((got - want).abs().max() / want.abs().max())
        report_line(f"- dw_bn_act_grouped_train {name}: {impl} vs betanas_fast, max |difference| / largest value "
                    f"{err:.1e}")
        if dtype == torch.float32:
            assert err < 1e-3, (impl, err)
    torch.manual_seed(0)
    grad = torch.randn_like(want).to(dtype)

    def stepper(forward):
        def step():
            for t in leaves:
                t.grad = None
            forward(leaves, groups, hw, stride).backward(grad)
            torch.cuda.synchronize()
        return step

    suite = "CUDA dw_bn_act_grouped_train, ragged vs per-group loops"
    times = record_alternating(suite, {"shapes": name, "dtype": str(dtype)[6:], "pass": "fwd+bwd"},
                               {impl: stepper(fn) for impl, fn in GROUPED_IMPLS.items()})
    required_lines(report_line, times, name, REQUIRED, f"dw_bn_act_grouped_train fwd+bwd {str(dtype)[6:]}")


# ---------------------------------------------------------------------------------------------------------
# block_gate_grads.

def gate_block(n, cin, cout, hw, stride, dtype, device="cuda"):
    torch.manual_seed(hw * 10 + cin)
    mods = [MBConv(cin, cout, k, stride, e) for k, e in CANDIDATES]
    for m in mods:
        for bn in (m.expand[1], m.depthwise.bn, m.project[1]):
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.normal_(0, 0.5)
    # the engine's layout (channels_last), in which Phase 2 hands the op its block input and dL/dO
    fmt = model_memory_format(torch.device(device))
    # parameters stay fp32, as under autocast
    mods = [m.to(device, memory_format=fmt).train().requires_grad_(False) for m in mods]
    x = (torch.randn(n, cin, hw, hw, device=device) * 1.5 + 0.2).to(dtype).contiguous(memory_format=fmt)
    ho = conv_out_size(hw, stride)
    grad_out = torch.randn(n, cout, ho, ho, device=device).to(dtype).contiguous(memory_format=fmt)
    params = [list(p) for p in zip(*(m.gate_grad_params() for m in mods))]
    return (x, grad_out, *params, stride, mods[0].has_skip, ops.ACTIVATIONS[ACT], EPS)


def _bn_batch(t, gamma, beta):
    z = t.to(stats_dtype(t))
    var, mean = torch.var_mean(z, dim=(0, 2), correction=0, keepdim=True)
    return (z - mean) * torch.rsqrt(var + EPS) * gamma.to(z.dtype).view(1, -1, 1) + beta.to(z.dtype).view(1, -1, 1)


def gate_per_group(x, grad_out, ew, ebw, ebb, dww, dbw, dbb, pw, pbw, pbb, stride, residual, act, eps):
    """The per-group composition the CUDA build ran before the ragged kernels: one expand GEMM, then per
    candidate ATen batch norms and the dense fused depthwise kernel."""
    n, cin, h, w = x.shape
    cout = grad_out.shape[1]
    g = grad_out.to(stats_dtype(x)).reshape(n, cout, -1)
    identity = (x.to(g.dtype).reshape(g.shape) * g).sum() if x.shape == grad_out.shape else g.new_zeros(())
    h_all = torch.matmul(torch.cat([t.reshape(-1, cin) for t in ew]).to(x.dtype), x.reshape(n, cin, h * w))
    values, c0 = [], 0
    for j in range(len(ew)):
        mid = ebw[j].numel()
        hj = F.relu6(_bn_batch(h_all[:, c0:c0 + mid], ebw[j], ebb[j])).to(x.dtype).view(n, mid, h, w)
        c0 += mid
        y = ops.dw_bn_act_train(hj, dww[j], dbw[j], dbb[j], stride, act, eps)[0]
        z = torch.matmul(pw[j].reshape(cout, mid).to(x.dtype), y.reshape(n, mid, -1))
        v = (_bn_batch(z, pbw[j], pbb[j]) * g).sum()
        values.append(v + identity if residual else v)
    return torch.stack(values + [identity]).float()


def gate_torch_modules(x, grad_out, ew, ebw, ebb, dww, dbw, dbb, pw, pbw, pbb, stride, residual, act, eps):
    """The eager loop a PyTorch user writes: each candidate's forward through F.conv2d / F.batch_norm (batch
    statistics) / F.relu6, the depthwise stage as F.conv2d(groups=C), under autocast for bf16 inputs (the
    parameters stay fp32), reduced against dL/dO; then the identity's sum(x * dL/dO) (0 if the shapes differ)."""
    assert act == ops.ACTIVATIONS["relu6"]
    low = x.dtype in (torch.bfloat16, torch.float16)
    autocast = torch.autocast(x.device.type, dtype=x.dtype) if low else contextlib.nullcontext()
    g = grad_out.float()
    identity = (x.float() * g).sum() if x.shape == grad_out.shape else g.new_zeros(())
    xin = x.float() if low else x  # under autocast the convolutions take it down to x's dtype again
    bn = lambda t, w, b: F.batch_norm(t, None, None, w, b, True, 0.0, eps)  # noqa: E731
    values = []
    with autocast:
        for j in range(len(ew)):
            h = F.relu6(bn(F.conv2d(xin, ew[j]), ebw[j], ebb[j]))
            k = dww[j].shape[-1]
            y = F.relu6(bn(F.conv2d(h, dww[j], stride=stride, padding=k // 2, groups=dww[j].shape[0]), dbw[j], dbb[j]))
            o = bn(F.conv2d(y, pw[j]), pbw[j], pbb[j])
            values.append(((o.float() + x.float()) if residual else o.float()).mul(g).sum())
    return torch.stack(values + [identity]).float()


GATE_IMPLS = {
    "betanas_fast": lambda args: ops.block_gate_grads(*args),
    "torch_modules": lambda args: gate_torch_modules(*args),
    "betanas_fast_per_group": lambda args: gate_per_group(*args),
    "reference_oracle": lambda args: ref.block_gate_grads(*args),
}


@pytest.mark.parametrize("name", list(GATE_CASES))
def test_cuda_block_gate_grads(record_alternating, report_line, name):
    args = gate_block(*GATE_CASES[name])
    with torch.no_grad():
        want = GATE_IMPLS["betanas_fast"](args)
        scale = float(want.abs().max())
        for impl in ("torch_modules", "betanas_fast_per_group"):
            err = float((GATE_IMPLS[impl](args) - want).abs().max()) / scale
            report_line(f"- block_gate_grads {name}: {impl} vs betanas_fast, max |difference| / largest value "
                        f"{err:.1e}")
            if GATE_CASES[name][-1] == torch.float32:
                assert err < 0.1, (impl, err)

    def stepper(fn):
        def step():
            with torch.no_grad():
                fn(args)
            torch.cuda.synchronize()
        return step

    suite = "CUDA block_gate_grads, 6 MBConv candidates"
    dtype = str(GATE_CASES[name][-1])[6:]
    times = record_alternating(suite, {"shapes": name, "dtype": dtype, "device": "cuda"},
                               {impl: stepper(fn) for impl, fn in GATE_IMPLS.items()})
    required_lines(report_line, times, name, GATE_REQUIRED, "block_gate_grads")
