"""The fused depthwise stage against its float64 oracle (betanas_fast.reference) and against PyTorch's
own composite: forward, backward, every dtype, kernel size, stride, layout, mode and activation."""
import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

import betanas_fast
from betanas_fast import reference
from betanas_fast.ops import ACTIVATIONS

from common import LOW_PRECISION_FACTOR, RELATIVE_TOLERANCE, device_dtype_params, requires_cuda, scaled_error

pytestmark = pytest.mark.skipif(not betanas_fast.KERNELS_LOADED, reason="kernel library not built")

OPS = torch.ops.betanas
ACT_CODES = {"relu6": 1, "silu": 2, "none": 0}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
EPS = 1e-5


def case_seed(*case) -> int:
    """The same seed for the same case in every process (Python's hash() of a string is salted per process),
    so that a failure replays."""
    return zlib.crc32(repr(case).encode())


def make_inputs(shape, k, device, dtype, layout, seed, requires_grad=False):
    """Fresh random inputs (never zeros). Parameters stay float32, as in an autocast model (float64 with
    float64 inputs)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = (torch.randn(shape, generator=g) * 2 + 0.3).to(dtype).to(device).contiguous(memory_format=layout)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.randn(c, 1, k, k, generator=g) / k).to(device, param_dtype)
    gamma = (torch.rand(c, generator=g) + 0.5).to(device, param_dtype)
    beta = (torch.randn(c, generator=g) * 0.5).to(device, param_dtype)
    for t in (x, weight, gamma, beta):
        t.requires_grad_(requires_grad)
    return x, weight, gamma, beta


def run_train(x, weight, gamma, beta, stride, act):
    """Fused op forward + backward, returning every output and gradient."""
    x, weight, gamma, beta = (t.detach().requires_grad_(True) for t in (x, weight, gamma, beta))
    out, mean, var = OPS.dw_bn_act_train(x, weight, gamma, beta, stride, act, EPS)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    out.backward(grad)
    return {"out": out, "mean": mean, "var": var, "grad_x": x.grad, "grad_weight": weight.grad,
            "grad_bn_weight": gamma.grad, "grad_bn_bias": beta.grad}, grad


def run_eval(x, weight, scale, shift, stride, act):
    x, weight, scale, shift = (t.detach().requires_grad_(True) for t in (x, weight, scale, shift))
    out = OPS.dw_bn_act_eval(x, weight, scale, shift, stride, act)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    out.backward(grad)
    return {"out": out, "grad_x": x.grad, "grad_weight": weight.grad, "grad_scale": scale.grad,
            "grad_shift": shift.grad}, grad


def oracle(mode, tensors, grad, stride, act):
    """The reference in float64 on the same (already rounded) inputs."""
    t64 = [t.detach().double().cpu() for t in tensors]
    g64 = grad.double().cpu()
    if mode == "train":
        out, mean, var = reference.dw_bn_act_train(*t64, stride, act, EPS)
        grads = reference.dw_bn_act_train_backward(g64, *t64[:4], mean, var, stride, act, EPS)
        names = ("grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias")
        return {"out": out, "mean": mean, "var": var, **dict(zip(names, grads))}
    out = reference.dw_bn_act_eval(*t64, stride, act)
    grads = reference.dw_bn_act_eval_backward(g64, *t64, stride, act)
    return {"out": out, **dict(zip(("grad_x", "grad_weight", "grad_scale", "grad_shift"), grads))}


def composite(mode, tensors, grad, stride, act_name):
    """PyTorch's own conv2d(groups=C) + batch_norm + activation, every tensor in x's dtype."""
    x, weight, p1, p2 = (t.detach().to(tensors[0].dtype).requires_grad_(True) for t in tensors)
    z = F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2, groups=x.shape[1])
    if mode == "train":
        y = F.batch_norm(z, None, None, p1, p2, True, 0.0, EPS)
    else:
        y = z * p1.view(1, -1, 1, 1) + p2.view(1, -1, 1, 1)
    y = {"relu6": F.relu6, "silu": F.silu, "none": lambda t: t}[act_name](y)
    y.backward(grad)
    names = ("grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias") if mode == "train" else (
        "grad_x", "grad_weight", "grad_scale", "grad_shift")
    return {"out": y, **dict(zip(names, (x.grad, weight.grad, p1.grad, p2.grad)))}


def check_against_oracle(mode, tensors, stride, act_name, dtype):
    act = ACT_CODES[act_name]
    fused, grad = (run_train if mode == "train" else run_eval)(*tensors, stride, act)
    expected = oracle(mode, tensors, grad, stride, act)
    assert fused["out"].dtype == dtype and fused["out"].shape == expected["out"].shape
    assert fused["out"].is_contiguous(memory_format=torch.channels_last) == tensors[0].is_contiguous(
        memory_format=torch.channels_last)
    assert fused["grad_x"].stride() == tensors[0].stride()
    if dtype in RELATIVE_TOLERANCE:
        for name, value in fused.items():
            err = scaled_error(value, expected[name])
            assert err <= RELATIVE_TOLERANCE[dtype], f"{name}: scaled error {err:.2e}"
        return
    baseline = composite(mode, tensors, grad, stride, act_name)
    for name, value in baseline.items():
        kind = "forward" if name == "out" else "backward"
        err, base_err = scaled_error(fused[name], expected[name]), scaled_error(value, expected[name])
        assert err <= LOW_PRECISION_FACTOR[kind] * base_err + 1e-6, (
            f"{name}: error {err:.2e} vs PyTorch composite's {base_err:.2e} in {dtype}")


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("k,stride", list(itertools.product((3, 5, 7), (1, 2))))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("act_name", list(ACT_CODES))
def test_matches_reference(device, dtype, k, stride, layout, mode, act_name):
    seed = case_seed(k, stride, layout, mode, act_name, dtype)
    # 12 channels and 17 columns: the NHWC kernels' register tiles (8 channels x 8 output pixels) and both tails
    tensors = make_inputs((3, 12, 13, 17), k, device, dtype, LAYOUTS[layout], seed)
    check_against_oracle(mode, tensors, stride, act_name, dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", [(1, 5, 7, 7), (4, 1, 13, 17), (1, 1, 2, 3), (2, 3, 1, 9), (5, 33, 8, 8),
                                   (2, 19, 11, 21)])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_odd_shapes(device, dtype, shape, mode, layout):
    for k, stride in ((3, 2), (7, 1), (5, 2)):
        tensors = make_inputs(shape, k, device, dtype, LAYOUTS[layout], seed=sum(shape) + k)
        check_against_oracle(mode, tensors, stride, "relu6", dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_batch_statistics_returned(device, dtype):
    x, weight, gamma, beta = make_inputs((4, 8, 9, 9), 5, device, dtype, torch.contiguous_format, seed=3)
    _, mean, var = OPS.dw_bn_act_train(x, weight, gamma, beta, 2, 1, EPS)
    z = F.conv2d(x.double(), weight.double(), stride=2, padding=2, groups=8)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), z.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(var.double(), z.var((0, 2, 3), unbiased=False), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("act_name", ["silu", "none"])  # smooth: finite differences are valid everywhere
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradcheck_float64(k, stride, act_name, layout):
    x, weight, gamma, beta = make_inputs((2, 3, 6, 5), k, "cpu", torch.float64, LAYOUTS[layout],
                                         seed=k * 10 + stride, requires_grad=True)
    assert x.is_contiguous(memory_format=LAYOUTS[layout])
    act = ACT_CODES[act_name]
    assert torch.autograd.gradcheck(
        lambda *t: OPS.dw_bn_act_train(*t, stride, act, EPS)[0], (x, weight, gamma, beta))
    assert torch.autograd.gradcheck(lambda *t: OPS.dw_bn_act_eval(*t, stride, act), (x, weight, gamma, beta))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("stride", [1, 2])
def test_backward_without_weight_grad(layout, dtype, stride):
    """weight_grad=False (Phase 2's frozen weights): grad_x, grad_bn_weight and grad_bn_bias bit for bit as with
    it, grad_weight zeros; autograd asks for it exactly when the weight needs no gradient."""
    x, weight, gamma, beta = make_inputs((3, 12, 13, 17), 5, "cpu", dtype, LAYOUTS[layout], seed=21 + stride)
    out, mean, var = OPS.dw_bn_act_train(x, weight, gamma, beta, stride, 1, EPS)
    grad = torch.randn_like(out)
    full = OPS.dw_bn_act_train_backward(grad, x, weight, gamma, beta, mean, var, stride, 1, EPS)
    part = OPS.dw_bn_act_train_backward(grad, x, weight, gamma, beta, mean, var, stride, 1, EPS, False)
    for i in (0, 2, 3):
        assert torch.equal(part[i], full[i]), i
    assert full[1].abs().sum() > 0 and torch.equal(part[1], torch.zeros_like(full[1]))
    torch.library.opcheck(OPS.dw_bn_act_train_backward.default,
                          (grad, x, weight, gamma, beta, mean, var, stride, 1, EPS, False))
    ref = reference.dw_bn_act_train_backward(grad, x, weight, gamma, beta, mean, var, stride, 1, EPS, False)
    assert torch.equal(ref[1], torch.zeros_like(full[1]))
    # autograd with the weight frozen: no weight gradient, the same input and BN gradients
    xg, gg, bg = (t.detach().requires_grad_() for t in (x, gamma, beta))
    y = betanas_fast.ops.dw_bn_act_train(xg, weight.detach(), gg, bg, stride, "relu6", EPS)[0]
    dx, dgamma, dbeta = torch.autograd.grad(y, (xg, gg, bg), grad)
    assert torch.equal(dx, full[0]) and torch.equal(dgamma, full[2]) and torch.equal(dbeta, full[3])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(layout, requires_grad):
    x, weight, gamma, beta = make_inputs((2, 4, 7, 9), 5, "cpu", torch.float32, LAYOUTS[layout], seed=11,
                                         requires_grad=requires_grad)
    torch.library.opcheck(OPS.dw_bn_act_train.default, (x, weight, gamma, beta, 2, 1, EPS))
    torch.library.opcheck(OPS.dw_bn_act_eval.default, (x, weight, gamma, beta, 1, 2))
    if not requires_grad:
        out, mean, var = OPS.dw_bn_act_train(x, weight, gamma, beta, 2, 1, EPS)
        grad = torch.randn_like(out)
        torch.library.opcheck(OPS.dw_bn_act_train_backward.default,
                              (grad, x, weight, gamma, beta, mean, var, 2, 1, EPS))
        grad = torch.randn_like(OPS.dw_bn_act_eval(x, weight, gamma, beta, 1, 2))
        torch.library.opcheck(OPS.dw_bn_act_eval_backward.default, (grad, x, weight, gamma, beta, 1, 2))


def test_torch_compile_fullgraph():
    layer = betanas_fast.nn.DWConvBNAct(8, 5, 2, "relu6")
    x = torch.randn(4, 8, 11, 11, requires_grad=True)
    eager_out = layer(x)
    eager_out.sum().backward()
    eager_grad = x.grad.clone()
    x.grad = None
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(x.grad, eager_grad)


def test_torch_compile_traces_the_kernel_or_reference_choice():
    """The choice is plain Python that dynamo traces and guards: the compiled graph holds the fused op, and
    within ops.reference_ops() the reference's convolution instead."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    layer = betanas_fast.nn.DWConvBNAct(8, 3, 1, "relu6")
    compiled = torch.compile(layer, backend=capture, fullgraph=True)
    x = torch.randn(2, 8, 7, 7)
    expected = layer(x)
    torch.testing.assert_close(compiled(x), expected)
    with betanas_fast.ops.reference_ops():
        torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)
    assert len(graphs) == 2
    assert "betanas.dw_bn_act_train" in graphs[0] and "conv2d" not in graphs[0]
    assert "betanas" not in graphs[1] and "conv2d" in graphs[1]


class TestBadInput:
    """The C++ entry points reject bad input with a message that names the argument."""

    def args(self, **overrides):
        x, weight, gamma, beta = make_inputs((2, 4, 8, 8), 3, "cpu", torch.float32, torch.contiguous_format, 5)
        args = dict(x=x, weight=weight, bn_weight=gamma, bn_bias=beta, stride=1, act=1, eps=EPS)
        args.update(overrides)
        return args

    @pytest.mark.parametrize("overrides,message", [
        (dict(x=torch.randn(4, 8, 8)), "x must be a 4-D tensor"),
        (dict(x=torch.randn(2, 4, 8, 8, dtype=torch.float16)), "float16 on CUDA only"),
        (dict(x=torch.ones(2, 4, 8, 8, dtype=torch.int32)), "unsupported dtype"),
        (dict(weight=torch.randn(4, 1, 4, 4)), "kernel size (weight.size(-1)) must be 3, 5 or 7, got 4"),
        (dict(weight=torch.randn(5, 1, 3, 3)), "weight must have shape [C, 1, k, k] = [4, 1, 3, 3]"),
        (dict(weight=torch.randn(4, 3, 3)), "weight must be a 4-D depthwise kernel"),
        (dict(bn_weight=torch.rand(3)), "bn_weight must have shape [C] = [4]"),
        (dict(bn_bias=torch.rand(4, dtype=torch.float64)), "bn_bias has dtype Double"),
        (dict(stride=3), "stride must be 1 or 2, got 3"),
        (dict(act=7), "act must be 0 (none), 1 (relu6) or 2 (silu), got 7"),
        (dict(x=torch.randn(1, 4, 1, 1)), "need more than 1 value per channel"),
    ])
    def test_message(self, overrides, message):
        with pytest.raises(RuntimeError) as info:
            OPS.dw_bn_act_train(**self.args(**overrides))
        assert message in str(info.value)

    @requires_cuda
    def test_device_mix(self):
        args = self.args()
        args["x"] = args["x"].cuda()
        with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
            OPS.dw_bn_act_train(**args)

    def test_unknown_activation_name(self):
        with pytest.raises(ValueError, match="unknown activation 'gelu'"):
            betanas_fast.ops.dw_bn_act_train(*list(self.args().values())[:4], 1, "gelu")


def test_activation_codes_match_schema_comment():
    assert ACTIVATIONS == {"none": 0, "relu6": 1, "silu": 2, "swish": 2}
