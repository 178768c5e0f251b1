"""The grouped ops' single-launch ragged CUDA kernels against what they replace, in one run (GPU only; every test
skips without CUDA):

- `dw_bn_act_grouped_train` forward+backward (one ragged launch each, every group's channels at once) vs the
  per-group composition: a Python loop over the groups calling the dense `ops.dw_bn_act_train` on views of the
  flat tensors, its outputs concatenated into the op's flat output, then backward. Demo shapes (64 samples over
  the 7 paths of a choice block: the 6 MBConv paths' groups of 8-10 samples, 48-144 channels, 32x32 / 16x16 /
  8x8, fp32) and ImageNet shapes (batch 256 over the 7 paths: 6 groups of 36-38 samples, 112x112 with 96/192
  channels, 112->56 stride 2, 56x56 with 72/144, 28x28, 14x14 with 240/480; bf16).
- `block_gate_grads` (expand GEMM, one BN-statistics launch, one ragged depthwise launch, a GEMM per candidate,
  one reduction launch) vs the eager recompute loop (`reference.grouped.block_gate_grads`: every candidate
  through conv2d / batch norm / activation / depthwise / conv2d / batch norm in pure PyTorch, reduced against
  dL/dO one at a time) and vs the per-group composition (the same stages with the dense depthwise kernel launched
  once per candidate and ATen batch norms), at demo and ImageNet block shapes, fp32 (Phase 2's precision) and
  one bf16 case.

Required on the GPU: the ragged op >= 2x the per-group composition at demo and ImageNet shapes, block_gate_grads
>= 3x the eager recompute loop. Nothing asserts speed: each ratio is printed under the tables with its required
minimum (lines "- required ratio: ..."), which benchmarks/gpu_check.sh repeats in its summary.
"""
import pytest
import torch
import torch.nn.functional as F

from betanas_fast import ops
from betanas_fast._rules import conv_out_size, stats_dtype
from betanas_fast.nn.mbconv import MBConv
from betanas_fast.reference import grouped as ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

EPS = 1e-5
ACT = "relu6"
# The MBConv paths of a choice block, (kernel size, expansion); the seventh path, the identity, has no
# depthwise stage and is not part of either op.
CANDIDATES = [(3, 3), (3, 6), (5, 3), (5, 6), (7, 3), (7, 6)]
REQUIRED = {"per-group": 2.0}  # dw_bn_act_grouped_train: minimum ratio baseline / ragged, per baseline
GATE_REQUIRED = {"eager-loop": 3.0}  # block_gate_grads

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

MEDIANS = {}  # (suite, case name) -> implementation -> median seconds


def file_median(report_line, benchmark, suite, name, impl, impls, required, what):
    """Keeps this run's median; once every implementation of the case ran, prints each baseline's ratio and its
    required minimum (if any)."""
    if benchmark.stats is None:  # benchmarks disabled: nothing was timed
        return
    medians = MEDIANS.setdefault((suite, name), {})
    medians[impl] = benchmark.stats.stats.median
    if set(medians) != set(impls):
        return
    for baseline in impls:
        if baseline == "betanas_fast":
            continue
        ratio = medians[baseline] / medians["betanas_fast"]
        need = required.get(baseline)
        verdict = f"(required >= {need:g}x) {'ok' if ratio >= need else 'BELOW'}" if need else "(no minimum)"
        report_line(f"- required ratio: {what}, {name}: {baseline} / ragged = {ratio:.2f}x {verdict}")


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


GROUPED_IMPLS = {"betanas_fast": ragged_forward, "per-group": per_group_forward}


@requires_cuda
@pytest.mark.parametrize("impl", list(GROUPED_IMPLS))
@pytest.mark.parametrize("name", list(GROUPED_CASES))
def test_cuda_grouped_fwd_bwd(record, report_line, benchmark, impl, name):
    samples, cin, hw, stride, dtype = GROUPED_CASES[name]
    leaves, groups = grouped_tensors(samples, cin, hw, dtype)
    forward = GROUPED_IMPLS[impl]
    grad = torch.randn_like(forward(leaves, groups, hw, stride))

    def step():
        for t in leaves:
            t.grad = None
        forward(leaves, groups, hw, stride).backward(grad)
        torch.cuda.synchronize()

    suite = "CUDA dw_bn_act_grouped_train, ragged vs per-group composition"
    record(suite, {"shapes": name, "dtype": str(dtype)[6:], "pass": "fwd+bwd"}, impl, step)
    file_median(report_line, benchmark, suite, name, impl, GROUPED_IMPLS, REQUIRED,
                f"dw_bn_act_grouped_train fwd+bwd {str(dtype)[6:]}")


# ---------------------------------------------------------------------------------------------------------
# block_gate_grads.

def gate_block(n, cin, cout, hw, stride, dtype):
    torch.manual_seed(hw * 10 + cin)
    mods = [MBConv(cin, cout, k, stride, e) for k, e in CANDIDATES]
    for m in mods:
        for bn in (m.expand[1], m.depthwise.bn, m.project[1]):
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.normal_(0, 0.5)
    mods = [m.cuda().train().requires_grad_(False) for m in mods]  # parameters stay fp32, as under autocast
    x = (torch.randn(n, cin, hw, hw, device="cuda") * 1.5 + 0.2).to(dtype)
    ho = conv_out_size(hw, stride)
    grad_out = torch.randn(n, cout, ho, ho, device="cuda").to(dtype)
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


GATE_IMPLS = {
    "betanas_fast": lambda args: ops.block_gate_grads(*args),
    "eager-loop": lambda args: ref.block_gate_grads(*args),
    "per-group": lambda args: gate_per_group(*args),
}


@requires_cuda
@pytest.mark.parametrize("impl", list(GATE_IMPLS))
@pytest.mark.parametrize("name", list(GATE_CASES))
def test_cuda_block_gate_grads(record, report_line, benchmark, impl, name):
    args = gate_block(*GATE_CASES[name])
    fn = GATE_IMPLS[impl]

    def step():
        with torch.no_grad():
            fn(args)
        torch.cuda.synchronize()

    suite = "CUDA block_gate_grads, 6 MBConv candidates"
    dtype = str(GATE_CASES[name][-1])[6:]
    record(suite, {"shapes": name, "dtype": dtype, "device": "cuda"}, impl, step)
    file_median(report_line, benchmark, suite, name, impl, GATE_IMPLS, GATE_REQUIRED, "block_gate_grads")
