"""The grouped depthwise op and the all-candidate block gate-gradient op against their references and
against PyTorch's own modules: forward, backward, dtypes, strides, kernel mixes, odd shapes, groups of
size 0 and 1, one group holding every sample, a block with a single candidate, bad input, opcheck and
float64 gradcheck; with a GPU, the same for the single-launch ragged CUDA kernels (the test_cuda_* cases)."""
import zlib

import pytest
import torch

import betanas_fast
from betanas_fast import ops
from betanas_fast.nn.mbconv import MBConv
from betanas_fast.reference import grouped as ref

from common import (DEVICES, LOW_PRECISION_FACTOR, RELATIVE_TOLERANCE, device_dtype_params, requires_cuda,
                    scaled_error)

pytestmark = pytest.mark.skipif(not betanas_fast.KERNELS_LOADED, reason="kernel library not built")

OPS = torch.ops.betanas
EPS = 1e-5


def case_seed(*case) -> int:
    """The same seed for the same case in every process (Python's hash() of a string is salted per process),
    so that a failure replays."""
    return zlib.crc32(repr(case).encode())


def grouped_inputs(samples, channels, kernels, H, W, dtype, device, seed):
    """Fresh random flat inputs (never zeros); parameters float32 (float64 with float64 inputs)."""
    g = torch.Generator().manual_seed(seed)
    numel = sum(n * c for n, c in zip(samples, channels)) * H * W
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(numel, generator=g) * 2 + 0.3).to(dtype)
    w = torch.randn(sum(c * k * k for c, k in zip(channels, kernels)), generator=g).to(pdt) / 4
    gamma = (torch.rand(sum(channels), generator=g) + 0.5).to(pdt)
    beta = (torch.randn(sum(channels), generator=g) * 0.5).to(pdt)
    return [t.to(device) for t in (x, w, gamma, beta)]


def run_grouped(x, w, gamma, beta, groups, H, W, stride, act, grad_seed=3):
    x, w, gamma, beta = (t.detach().requires_grad_(True) for t in (x, w, gamma, beta))
    out, mean, var = ops.dw_bn_act_grouped_train(x, w, gamma, beta, *groups, H, W, stride, act, EPS)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    out.backward(grad)
    return [out, mean, var, x.grad, w.grad, gamma.grad, beta.grad], grad


GROUP_CASES = {
    # samples, channels, kernel sizes
    "mixed": ([5, 3, 4], [6, 12, 6], [3, 5, 7]),
    "empty-and-single": ([4, 0, 1, 3], [3, 5, 4, 2], [7, 3, 5, 3]),
    "all-on-one-path": ([0, 9, 0], [3, 6, 3], [3, 5, 7]),
    "one-group": ([7], [5], [5]),
}


@pytest.mark.parametrize("device,dtype", device_dtype_params() + [pytest.param("cpu", torch.float64, id="cpu-float64")])
@pytest.mark.parametrize("case", list(GROUP_CASES))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("H,W", [(7, 9), (8, 8), (3, 2)])
def test_grouped_matches_reference(device, dtype, case, stride, H, W):
    groups = GROUP_CASES[case]
    inputs = grouped_inputs(*groups, H, W, dtype, device, seed=case_seed(case, stride, H, W))
    got, grad = run_grouped(*inputs, groups, H, W, stride, "relu6")
    # the float64 oracle on the same rounded inputs
    with ops.reference_ops():
        want, _ = run_grouped(*(t.double().cpu() for t in inputs), groups, H, W, stride, "relu6")
    if dtype in RELATIVE_TOLERANCE:
        for name, a, b in zip(("out", "mean", "var", "grad_x", "grad_w", "grad_gamma", "grad_beta"), got, want):
            assert scaled_error(a.cpu(), b) <= RELATIVE_TOLERANCE[dtype] * 10, name
        return
    # low precision: no worse than PyTorch's own composite (the reference in that dtype) against float64
    with ops.reference_ops():
        same_dtype, _ = run_grouped(*inputs, groups, H, W, stride, "relu6")
    for i, (a, b, r) in enumerate(zip(got, want, same_dtype)):
        bound = LOW_PRECISION_FACTOR["forward" if i < 3 else "backward"] * max(scaled_error(r.cpu(), b), 1e-3)
        assert scaled_error(a.cpu(), b) <= bound, i


def test_grouped_equals_the_dense_op_per_group():
    """Each group's slice equals betanas::dw_bn_act_train on that group alone (silu, stride 2)."""
    samples, channels, kernels = [3, 2, 5], [4, 8, 4], [5, 3, 7]
    H, W = 9, 6
    x, w, gamma, beta = grouped_inputs(samples, channels, kernels, H, W, torch.float32, "cpu", seed=1)
    out, mean, var = OPS.dw_bn_act_grouped_train(x, w, gamma, beta, samples, channels, kernels, H, W, 2, 2, EPS)
    layout = ref.group_layout(samples, channels, kernels, H, W, 2)
    for (xo, xn, yo, yn, co, wo), n, c, k in zip(layout, samples, channels, kernels):
        o, m, v = OPS.dw_bn_act_train(x[xo:xo + xn].view(n, c, H, W), w[wo:wo + c * k * k].view(c, 1, k, k),
                                      gamma[co:co + c], beta[co:co + c], 2, 2, EPS)
        torch.testing.assert_close(out[yo:yo + yn], o.flatten(), rtol=0, atol=0)
        torch.testing.assert_close(mean[co:co + c], m, rtol=0, atol=0)
        torch.testing.assert_close(var[co:co + c], v, rtol=0, atol=0)


def test_empty_group_has_zero_statistics_and_gradients():
    samples, channels, kernels = [3, 0], [2, 3], [3, 5]
    inputs = grouped_inputs(samples, channels, kernels, 5, 5, torch.float32, "cpu", seed=2)
    (out, mean, var, gx, gw, gg, gb), _ = run_grouped(*inputs, (samples, channels, kernels), 5, 5, 1, "relu6")
    assert (mean[2:] == 0).all() and (var[2:] == 0).all() and (var[:2] > 0).all()
    assert (gw[2 * 9:] == 0).all() and (gg[2:] == 0).all() and (gb[2:] == 0).all()
    assert gw[:2 * 9].abs().sum() > 0


def test_grouped_gradcheck_float64():
    samples, channels, kernels = [2, 0, 3], [2, 3, 1], [3, 5, 7]
    x, w, gamma, beta = (t.requires_grad_(True) for t in
                         grouped_inputs(samples, channels, kernels, 5, 4, torch.float64, "cpu", seed=4))
    for stride in (1, 2):
        fn = lambda *t: OPS.dw_bn_act_grouped_train(*t, samples, channels, kernels, 5, 4, stride, 2, EPS)[0]  # noqa
        assert torch.autograd.gradcheck(fn, (x, w, gamma, beta))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_grouped_opcheck(requires_grad, device):
    samples, channels, kernels = [3, 0, 2, 1], [2, 3, 4, 2], [3, 7, 5, 7]
    x, w, gamma, beta = grouped_inputs(samples, channels, kernels, 6, 5, torch.float32, device, seed=5)
    for t in (x, w, gamma, beta):
        t.requires_grad_(requires_grad)
    args = (x, w, gamma, beta, samples, channels, kernels, 6, 5, 2, 1, EPS)
    torch.library.opcheck(OPS.dw_bn_act_grouped_train.default, args)
    if not requires_grad:
        out, mean, var = OPS.dw_bn_act_grouped_train(*args)
        torch.library.opcheck(OPS.dw_bn_act_grouped_train_backward.default,
                              (torch.randn_like(out), x, w, gamma, beta, mean, var, *args[4:]))


@pytest.mark.parametrize("change, message", [
    (dict(samples=[3, 1]), "samples, channels and kernel_sizes must have one entry per group"),
    (dict(kernels=[3, 4, 5]), "kernel size 4"),
    (dict(x_extra=1), "x must be a flat tensor of"),
    (dict(samples=[3, 1, 2], H=1, W=1), "need more than 1 value per channel"),
    (dict(w_extra=2), "weight must be a flat tensor of"),
])
def test_grouped_bad_input_names_the_problem(change, message):
    samples, channels, kernels = change.get("samples", [3, 0, 2]), [2, 3, 4], change.get("kernels", [3, 7, 5])
    H, W = change.get("H", 6), change.get("W", 5)
    n = sum(a * b for a, b in zip(samples, channels)) * H * W + change.get("x_extra", 0)
    w = torch.randn(sum(c * k * k for c, k in zip(channels, [3, 7, 5])) + change.get("w_extra", 0))
    with pytest.raises(RuntimeError, match=message):
        OPS.dw_bn_act_grouped_train(torch.randn(n), w, torch.rand(9), torch.randn(9), samples, channels, kernels,
                                    H, W, 1, 1, EPS)


# --- block_gate_grads --------------------------------------------------------------------------------------------
def make_block(cin, cout, stride, kinds, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    mods = [MBConv(cin, cout, k, stride, e) for k, e in kinds]
    for m in mods:
        for bn in (m.expand[1], m.depthwise.bn, m.project[1]):
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.normal_(0, 0.5)
    return [m.to(dtype).train() for m in mods]


def gate_args(mods, x, grad_out):
    params = [list(p) for p in zip(*(m.gate_grad_params() for m in mods))] or [[]] * 9
    first = mods[0] if mods else None
    return (x, grad_out, *params, first.stride if first else 1, bool(first and first.has_skip), 1, EPS)


BLOCKS = {
    "residual": (8, 8, 1, [(3, 3), (3, 6), (5, 3), (5, 6), (7, 3), (7, 6)]),
    "stride2": (8, 12, 2, [(3, 6), (7, 3), (5, 3)]),
    "widen": (6, 10, 1, [(5, 6), (3, 3)]),
    "single": (8, 8, 1, [(7, 6)]),
}


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("N,H", [(5, 9), (1, 7), (16, 4)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_block_gate_grads_equal_the_eager_modules(block, N, H, layout):
    cin, cout, stride, kinds = BLOCKS[block]
    mods = make_block(cin, cout, stride, kinds, seed=N * H)
    x = (torch.randn(N, cin, H, H) * 1.5 + 0.2).contiguous(memory_format=layout)
    with torch.no_grad():
        outs = [m(x) for m in mods]  # training mode: batch statistics (running ones are not read)
    grad_out = torch.randn_like(outs[0]).contiguous(memory_format=layout)
    got = ops.block_gate_grads(*gate_args(mods, x, grad_out)[:-2], act="relu6", eps=EPS)
    eager = [float((o.double() * grad_out.double()).sum()) for o in outs]
    ident = float((x.double() * grad_out.double()).sum()) if x.shape == grad_out.shape else 0.0
    torch.testing.assert_close(got.double(), torch.tensor(eager + [ident], dtype=torch.float64), rtol=1e-4, atol=1e-3)
    with ops.reference_ops():
        want = ops.block_gate_grads(*gate_args(mods, x, grad_out)[:-2], act="relu6", eps=EPS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("block", ["residual", "stride2", "widen"])
def test_block_gate_grads_in_chunks_equal_the_eager_modules(block):
    """Planes large enough that the CPU kernel splits the batch into chunks of samples (2 MiB of expanded
    activations each: 2 + 2 + 1 samples here) and the depthwise output into chunks of rows, unevenly."""
    cin, cout, stride, kinds = BLOCKS[block]
    mods = make_block(cin, cout, stride, kinds, seed=11)
    x = (torch.randn(5, cin, 64, 61) * 1.5 + 0.2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        outs = [m(x) for m in mods]
    grad_out = torch.randn_like(outs[0]).contiguous(memory_format=torch.channels_last)
    got = OPS.block_gate_grads(*gate_args(mods, x, grad_out))
    eager = [float((o.double() * grad_out.double()).sum()) for o in outs]
    ident = float((x.double() * grad_out.double()).sum()) if x.shape == grad_out.shape else 0.0
    torch.testing.assert_close(got.double(), torch.tensor(eager + [ident], dtype=torch.float64), rtol=1e-4, atol=2e-3)
    # float64 (chunks of half as many samples) against the reference in float64
    mods64 = [m.double() for m in mods]
    args64 = gate_args(mods64, x.double(), grad_out.double())
    torch.testing.assert_close(OPS.block_gate_grads(*args64).double(), ref.block_gate_grads(*args64).double(),
                               rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_block_gate_grads_float64_and_bfloat16(layout):
    mods = make_block(8, 8, 1, BLOCKS["residual"][3], seed=3, dtype=torch.float64)
    x = torch.randn(6, 8, 7, 7, dtype=torch.float64).contiguous(memory_format=layout)
    grad_out = torch.randn_like(x)
    got = OPS.block_gate_grads(*gate_args(mods, x, grad_out))
    want = ref.block_gate_grads(*gate_args(mods, x, grad_out))
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-5)
    # bfloat16 activations with float32 parameters, as under autocast: no worse than the reference in bf16
    mods32 = [m.float() for m in mods]
    xb, gb = x.bfloat16(), grad_out.bfloat16()
    exact = ref.block_gate_grads(*gate_args(mods32, xb.double(), gb.double()))
    ours = OPS.block_gate_grads(*gate_args(mods32, xb, gb))
    theirs = ref.block_gate_grads(*gate_args(mods32, xb, gb))
    err = lambda a: ((a.double() - exact).abs().max() / exact.abs().max()).item()  # noqa: E731
    assert err(ours) <= 2 * max(err(theirs), 1e-3), (err(ours), err(theirs))


def test_block_gate_grads_inside_autocast():
    mods = make_block(8, 12, 2, BLOCKS["stride2"][3], seed=8)
    x = torch.randn(4, 8, 8, 8)
    grad_out = torch.randn(4, 12, 4, 4)
    plain = OPS.block_gate_grads(*gate_args(mods, x, grad_out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = OPS.block_gate_grads(*gate_args(mods, x, grad_out))
    torch.testing.assert_close(in_autocast, plain, rtol=1e-5, atol=1e-4)  # x is float32: the op stays float32


def test_identity_only_and_shapes():
    x = torch.randn(3, 4, 5, 5)
    g = torch.randn(3, 4, 5, 5)
    got = OPS.block_gate_grads(*gate_args([], x, g))
    assert got.shape == (1,) and torch.allclose(got[0], (x * g).sum())
    mods = make_block(4, 6, 2, [(3, 3)], seed=1)
    got = OPS.block_gate_grads(*gate_args(mods, x, torch.randn(3, 6, 3, 3)))
    assert got.shape == (2,) and got[1] == 0  # no identity where the shapes differ


def test_block_gate_grads_opcheck():
    mods = make_block(6, 10, 1, BLOCKS["widen"][3], seed=2)
    with torch.no_grad():
        args = gate_args([m.requires_grad_(False) for m in mods], torch.randn(3, 6, 5, 5), torch.randn(3, 10, 5, 5))
        args_nhwc = (args[0].contiguous(memory_format=torch.channels_last),
                     args[1].contiguous(memory_format=torch.channels_last)) + args[2:]
    torch.library.opcheck(OPS.block_gate_grads.default, args_nhwc)
    torch.library.opcheck(OPS.block_gate_grads.default, args)


@pytest.mark.parametrize("change, message", [
    ("drop_bn", "expand_bn_weight has 1 entries but expand_weight has 2"),
    ("bad_grad", "grad_out has spatial size"),
    ("residual_mismatch", "residual=True needs grad_out of x's shape"),
])
def test_block_gate_grads_bad_input(change, message):
    mods = make_block(6, 6, 1, [(3, 3), (5, 6)], seed=0)
    x = torch.randn(2, 6, 5, 5)
    g = torch.randn(2, 6, 4, 4) if change == "bad_grad" else torch.randn(2, 6, 5, 5)
    args = list(gate_args(mods, x, g))
    if change == "drop_bn":
        args[3] = args[3][:1]
    if change == "residual_mismatch":
        mods2 = make_block(6, 8, 1, [(3, 3)], seed=0)
        args = list(gate_args(mods2, x, torch.randn(2, 8, 5, 5)))
        args[-3] = True
    with pytest.raises(RuntimeError, match=message):
        OPS.block_gate_grads(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_block_gate_grads_device(device):
    mods = [m.to(device) for m in make_block(8, 8, 1, BLOCKS["residual"][3][:3], seed=5)]
    x = torch.randn(4, 8, 6, 6, device=device)
    g = torch.randn_like(x)
    got = OPS.block_gate_grads(*gate_args(mods, x, g))
    want = ref.block_gate_grads(*gate_args(mods, x, g))
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-3)


# --- the engine with kernels vs with references ------------------------------------------------------------------
def test_alpha_trajectory_with_kernels_equals_references(tmp_path):
    """Twenty seeded α steps from the same supernet follow the same α trajectory whether the ops run their
    kernels or their pure-PyTorch references. The weights are the same in both (Phase 2 never changes
    them; whole searches are not compared because SGD on the demo amplifies rounding-level weight
    differences to percent-level losses within a few steps). Adam's eps is set far above |dL/dα| so that its
    step is proportional to the gradient: with the default eps a step is about lr * sign(g), and a
    rounding-level difference of a near-zero gradient would flip it."""
    from common import built

    torch.manual_seed(0)
    trajectories = {}
    for name in ("kernels", "reference"):
        s = built(tmp_path / name, arch_eps=10.0, arch_lr=1.0, drop_threshold=-5.0)
        steps = []
        for _ in range(20):
            if name == "reference":
                with ops.reference_ops():
                    s.phase2_step()
            else:
                s.phase2_step()
            steps.append(s.state.alpha.detach().clone())
        trajectories[name] = torch.stack(steps)
    moved = trajectories["reference"].abs().max().item()
    assert moved > 1e-3  # α did move: not a comparison of two untouched zeros
    # fp32 itself moves the gate-gradient table by up to about 1 % of its largest entry on this supernet (measured
    # against a float64 oracle by benchmarks/precision.py, in the engine and in plain-torch fp32 code alike), so
    # the trajectories may differ by a fraction of a percent of how far α moved; a wrong op differs by far more
    torch.testing.assert_close(trajectories["kernels"], trajectories["reference"], rtol=1e-3, atol=5e-3 * moved)


# --- CUDA: the single-launch ragged kernels ----------------------------------------------------------------------
# One launch over every channel of every group (csrc/cuda/dw_ragged.cuh, csrc/cuda/grouped.cu). These run only with a
# GPU and call the CUDA kernels directly (no fallback to the reference); they carry the `cuda` marker (`-m cuda`).
CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

RAGGED_CASES = {
    # seven groups: one empty, one of a single sample, every kernel size, different channel counts
    "seven-groups": ([9, 0, 3, 12, 1, 5, 7], [6, 5, 12, 4, 9, 3, 8], [3, 5, 7, 5, 3, 7, 5]),
    # a group with more samples than a block stages at once (32), next to a wide one
    "wide-group": ([40, 2], [3, 33], [7, 3]),
}


def _assert_grouped_close(got, inputs, groups, H, W, stride, act, dtype, grad_seed=3):
    """got (run_grouped's outputs) against the float64 oracle on the same rounded inputs; float16 / bfloat16 no
    worse than PyTorch's own composite in that dtype (as test_grouped_matches_reference judges them)."""
    with ops.reference_ops():
        want, _ = run_grouped(*(t.double().cpu() for t in inputs), groups, H, W, stride, act, grad_seed)
    names = ("out", "mean", "var", "grad_x", "grad_w", "grad_gamma", "grad_beta")
    if dtype in RELATIVE_TOLERANCE:
        for name, a, b in zip(names, got, want):
            assert scaled_error(a.cpu(), b) <= RELATIVE_TOLERANCE[dtype] * 10, name
        return
    with ops.reference_ops():
        same_dtype, _ = run_grouped(*inputs, groups, H, W, stride, act, grad_seed)
    for i, (name, a, b, r) in enumerate(zip(names, got, want, same_dtype)):
        bound = LOW_PRECISION_FACTOR["forward" if i < 3 else "backward"] * max(scaled_error(r.cpu(), b), 1e-3)
        assert scaled_error(a.cpu(), b) <= bound, name


@requires_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(RAGGED_CASES))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("act", ["none", "relu6", "silu"])
@pytest.mark.parametrize("H,W", [(13, 11), (2, 7)])
def test_cuda_ragged_grouped_matches_reference(dtype, case, stride, act, H, W):
    groups = RAGGED_CASES[case]
    inputs = grouped_inputs(*groups, H, W, dtype, "cuda", seed=case_seed(case, stride, act, H, W))
    got, _ = run_grouped(*inputs, groups, H, W, stride, act)
    _assert_grouped_close(got, inputs, groups, H, W, stride, act, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("stride", [1, 2])
def test_cuda_ragged_grouped_large_planes(dtype, stride):
    """Planes of several tiles and groups of several sample chunks, as at ImageNet's early stages."""
    groups = ([37, 0, 20], [16, 8, 24], [3, 5, 7])
    inputs = grouped_inputs(*groups, 56, 56, dtype, "cuda", seed=11)
    got, _ = run_grouped(*inputs, groups, 56, 56, stride, "relu6")
    _assert_grouped_close(got, inputs, groups, 56, 56, stride, "relu6", dtype)


@requires_cuda
def test_cuda_ragged_grouped_equals_cpu_kernel_float64():
    samples, channels, kernels = RAGGED_CASES["seven-groups"]
    inputs = grouped_inputs(samples, channels, kernels, 9, 7, torch.float64, "cpu", seed=6)
    for stride in (1, 2):
        args = (samples, channels, kernels, 9, 7, stride, 2, EPS)
        cpu = OPS.dw_bn_act_grouped_train(*inputs, *args)
        cuda = OPS.dw_bn_act_grouped_train(*(t.cuda() for t in inputs), *args)
        for a, b in zip(cuda, cpu):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
        grad = torch.randn_like(cpu[0])
        cpu_b = OPS.dw_bn_act_grouped_train_backward(grad, *inputs, cpu[1], cpu[2], *args)
        cuda_b = OPS.dw_bn_act_grouped_train_backward(grad.cuda(), *(t.cuda() for t in inputs), cpu[1].cuda(),
                                                      cpu[2].cuda(), *args)
        for a, b in zip(cuda_b, cpu_b):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)


@requires_cuda
def test_cuda_ragged_grouped_is_deterministic():
    """No atomics: every reduction runs in a fixed order, so two runs agree bit for bit."""
    groups = RAGGED_CASES["seven-groups"]
    inputs = grouped_inputs(*groups, 16, 16, torch.float32, "cuda", seed=7)
    first, _ = run_grouped(*inputs, groups, 16, 16, 1, "silu")
    second, _ = run_grouped(*inputs, groups, 16, 16, 1, "silu")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_cuda
def test_cuda_grouped_gradcheck_float64():
    samples, channels, kernels = [2, 0, 3, 1], [2, 3, 1, 2], [3, 5, 7, 5]
    x, w, gamma, beta = (t.requires_grad_(True) for t in
                         grouped_inputs(samples, channels, kernels, 5, 4, torch.float64, "cuda", seed=4))
    def output(stride, act):
        return lambda *t: OPS.dw_bn_act_grouped_train(*t, samples, channels, kernels, 5, 4, stride, act, EPS)[0]

    for stride in (1, 2):
        for act in (0, 2):
            assert torch.autograd.gradcheck(output(stride, act), (x, w, gamma, beta))


def _gate_args_on(mods, x, grad_out, device, param_dtype=None):
    """gate_args with the modules' parameters copied to `device` (and param_dtype), the modules left as they are."""
    params = [[p.detach().to(device=device, dtype=param_dtype or p.dtype) for p in ps]
              for ps in zip(*(m.gate_grad_params() for m in mods))] or [[]] * 9
    first = mods[0] if mods else None
    return (x, grad_out, *params, first.stride if first else 1, bool(first and first.has_skip), 1, EPS)


@requires_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("N,H", [(5, 9), (16, 4)])
def test_cuda_block_gate_grads_match_reference(dtype, block, N, H):
    """Every candidate of a block at once on the GPU against the float64 oracle; parameters float32 (as under
    autocast) or float64."""
    cin, cout, stride, kinds = BLOCKS[block]
    mods = make_block(cin, cout, stride, kinds, seed=N * H, dtype=torch.float64)
    x64 = torch.randn(N, cin, H, H, dtype=torch.float64) * 1.5 + 0.2
    ho = (H - 1) // stride + 1
    g64 = torch.randn(N, cout, ho, ho, dtype=torch.float64)
    x, g = x64.to(dtype).cuda(), g64.to(dtype).cuda()
    args = _gate_args_on(mods, x, g, "cuda", torch.float64 if dtype == torch.float64 else torch.float32)
    got = OPS.block_gate_grads(*args)
    # the oracle on the same rounded inputs and parameters
    exact = ref.block_gate_grads(x.double().cpu(), g.double().cpu(),
                                 *[[p.double().cpu() for p in ps] for ps in args[2:11]], *args[11:])
    err = lambda a: scaled_error(a.cpu(), exact)  # noqa: E731
    if dtype == torch.float64:  # the result is float32, and the oracle sums float32 products
        assert err(got) <= 1e-6
    elif dtype == torch.float32:
        assert err(got) <= 2e-4
    else:  # no worse than the reference in the same dtype
        theirs = ref.block_gate_grads(*args)
        assert err(got) <= 2 * max(err(theirs), 1e-3), (err(got), err(theirs))


@requires_cuda
def test_cuda_block_gate_grads_float64_equals_cpu_kernel():
    for block in BLOCKS:
        cin, cout, stride, kinds = BLOCKS[block]
        mods = make_block(cin, cout, stride, kinds, seed=9, dtype=torch.float64)
        x = torch.randn(6, cin, 7, 7, dtype=torch.float64)
        ho = (7 - 1) // stride + 1
        g = torch.randn(6, cout, ho, ho, dtype=torch.float64)
        cpu = OPS.block_gate_grads(*_gate_args_on(mods, x, g, "cpu"))
        cuda = OPS.block_gate_grads(*_gate_args_on(mods, x.cuda(), g.cuda(), "cuda"))
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-6, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("x_dtype,grad_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                (torch.float16, torch.float32)])
def test_cuda_block_gate_grads_grad_out_in_another_dtype(x_dtype, grad_dtype):
    """grad_out is read in x's dtype when it has it, else in float32, as the CPU kernel reads it."""
    mods = make_block(8, 8, 1, BLOCKS["residual"][3], seed=4)
    x = (torch.randn(4, 8, 6, 6) * 1.5).to(x_dtype)
    g = torch.randn(4, 8, 6, 6).to(grad_dtype)
    got = OPS.block_gate_grads(*_gate_args_on(mods, x.cuda(), g.cuda(), "cuda"))
    cpu_x = x.float() if x_dtype == torch.float16 else x  # the CPU kernels have no float16
    want = OPS.block_gate_grads(*_gate_args_on(mods, cpu_x, g, "cpu"))
    tol = 1e-4 if x_dtype == torch.float32 else 3e-2
    assert scaled_error(got.cpu(), want) <= tol


@requires_cuda
def test_cuda_block_gate_grads_inside_autocast():
    mods = [m.cuda() for m in make_block(8, 12, 2, BLOCKS["stride2"][3], seed=8)]
    x = torch.randn(4, 8, 8, 8, device="cuda")
    grad_out = torch.randn(4, 12, 4, 4, device="cuda")
    plain = OPS.block_gate_grads(*gate_args(mods, x, grad_out))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        in_autocast = OPS.block_gate_grads(*gate_args(mods, x, grad_out))
    torch.testing.assert_close(in_autocast, plain, rtol=1e-5, atol=1e-4)  # x is float32: the op stays float32


@requires_cuda
def test_cuda_block_gate_grads_identity_only_and_deterministic():
    x = torch.randn(3, 4, 5, 5, device="cuda")
    g = torch.randn(3, 4, 5, 5, device="cuda")
    got = OPS.block_gate_grads(*gate_args([], x, g))
    assert got.shape == (1,) and torch.allclose(got[0], (x.double() * g.double()).sum().float())
    assert (OPS.block_gate_grads(*gate_args([], x, torch.randn(3, 4, 3, 3, device="cuda"))) == 0).all()
    mods = [m.cuda() for m in make_block(8, 8, 1, BLOCKS["residual"][3], seed=6)]
    x = torch.randn(16, 8, 9, 9, device="cuda")
    g = torch.randn_like(x)
    assert torch.equal(OPS.block_gate_grads(*gate_args(mods, x, g)), OPS.block_gate_grads(*gate_args(mods, x, g)))


@requires_cuda
def test_cuda_block_gate_grads_opcheck():
    mods = [m.cuda().requires_grad_(False) for m in make_block(6, 10, 1, BLOCKS["widen"][3], seed=2)]
    args = gate_args(mods, torch.randn(3, 6, 5, 5, device="cuda"), torch.randn(3, 10, 5, 5, device="cuda"))
    torch.library.opcheck(OPS.block_gate_grads.default, args)
