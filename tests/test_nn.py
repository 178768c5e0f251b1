"""betanas_fast.nn against the torch modules it replaces: outputs, gradients, running statistics; on the CPU
and on CUDA (the fused kernels of each device against ATen's / cuDNN's modules there)."""
import pytest
import torch
from torch import nn

from betanas_fast import ops
from betanas_fast.nn import DWConvBNAct, MBConv
from betanas_fast.ops import ieee_fp32

from common import DEVICES

ACT_MODULES = {"relu6": nn.ReLU6, "silu": nn.SiLU, "none": nn.Identity}
# Outputs and input gradients: two float32 computations of the same function. On the CPU the kernels keep the
# BatchNorm sums in double; on CUDA the kernels and cuDNN (TF32 off: ops.ieee_fp32) both add in float32, in
# different orders, so their results may differ by several times more.
TOLERANCE = {"cpu": dict(atol=1e-5, rtol=1e-5), "cuda": dict(atol=1e-4, rtol=1e-4)}
# Sums over the batch and steps (weight gradients, running statistics): absolute part relative to the largest
# entry, and rtol
SUM_TOLERANCE = {"cpu": (1e-5, 1e-4), "cuda": (1e-4, 1e-3)}


def composite_of(layer: DWConvBNAct) -> nn.Sequential:
    """nn.Conv2d(groups=C) + nn.BatchNorm2d + activation holding a copy of the layer's state."""
    c, k, s = layer.conv.in_channels, layer.conv.kernel_size[0], layer.stride
    ref = nn.Sequential(nn.Conv2d(c, c, k, s, k // 2, groups=c, bias=False),
                        nn.BatchNorm2d(c, eps=layer.bn.eps, momentum=layer.bn.momentum), ACT_MODULES[layer.act]())
    ref[0].load_state_dict(layer.conv.state_dict())
    ref[1].load_state_dict(layer.bn.state_dict())
    return ref


def randomise_bn(layer: DWConvBNAct, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.bn.weight.copy_(torch.rand(layer.bn.weight.shape, generator=g) + 0.5)
        layer.bn.bias.copy_(torch.randn(layer.bn.bias.shape, generator=g))
        layer.bn.running_mean.copy_(torch.randn(layer.bn.running_mean.shape, generator=g))
        layer.bn.running_var.copy_(torch.rand(layer.bn.running_var.shape, generator=g) + 0.5)


def forward_backward(module, x, grad):
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(grad)
    return out, x.grad


@pytest.mark.parametrize("k,stride", [(3, 1), (5, 2), (7, 1), (7, 2)])
@pytest.mark.parametrize("act", ["relu6", "silu", "none"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_dwconvbnact_matches_torch_modules(k, stride, act, momentum, channels_last, device):
    torch.manual_seed(k * 100 + stride)
    layer = DWConvBNAct(12, k, stride, act, momentum=momentum)
    randomise_bn(layer, seed=k)
    ref = composite_of(layer).to(device)
    layer.to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out_shape = (4, 12, (15 - 1) // stride + 1, (11 - 1) // stride + 1)
    for _ in range(3):  # several steps: running statistics accumulate (cumulatively when momentum is None)
        x = (torch.randn(4, 12, 15, 11) * 2 + 1).to(device).contiguous(memory_format=fmt)
        grad = torch.randn(out_shape).to(device)
        out, grad_x = forward_backward(layer, x, grad)
        with ieee_fp32():
            ref_out, ref_grad_x = forward_backward(ref, x, grad)
        assert out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out, ref_out, **TOLERANCE[device])
        torch.testing.assert_close(grad_x, ref_grad_x, **TOLERANCE[device])
    scaled, rtol = SUM_TOLERANCE[device]
    for mine, theirs in ((layer.conv.weight.grad, ref[0].weight.grad), (layer.bn.weight.grad, ref[1].weight.grad),
                         (layer.bn.bias.grad, ref[1].bias.grad), (layer.bn.running_mean, ref[1].running_mean),
                         (layer.bn.running_var, ref[1].running_var)):
        # sums of thousands of float32 terms over three steps, which ATen adds in float32 (the CPU kernels in
        # double): their rounding scales with the largest entry (measured on the CPU: at most 9e-7 of it), not with
        # each element
        torch.testing.assert_close(mine, theirs, atol=scaled * float(theirs.abs().max()), rtol=rtol)
    assert layer.bn.num_batches_tracked.item() == ref[1].num_batches_tracked.item() == 3


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("device", DEVICES)
def test_running_statistics_match(momentum, device):
    torch.manual_seed(0)
    layer = DWConvBNAct(6, 5, 2, "relu6", momentum=momentum)
    randomise_bn(layer, seed=1)
    ref = composite_of(layer).to(device)
    layer.to(device)
    stats_tol = {"cpu": dict(atol=1e-6, rtol=1e-5), "cuda": dict(atol=1e-5, rtol=1e-4)}[device]
    param_grad_tol = {"cpu": dict(atol=1e-4, rtol=1e-5), "cuda": dict(atol=1e-3, rtol=1e-4)}[device]
    with ieee_fp32():
        for _ in range(4):
            x = (torch.randn(3, 6, 9, 13) * 3 + 2).to(device)
            layer(x)
            ref(x)
        torch.testing.assert_close(layer.bn.running_mean, ref[1].running_mean, **stats_tol)
        torch.testing.assert_close(layer.bn.running_var, ref[1].running_var, **stats_tol)
        assert layer.bn.num_batches_tracked.item() == ref[1].num_batches_tracked.item() == 4
        layer.eval()
        ref.eval()
        x = torch.randn(2, 6, 9, 13).to(device)
        out, grad_x = forward_backward(layer, x, grad := torch.randn(2, 6, 5, 7).to(device))
        ref_out, ref_grad_x = forward_backward(ref, x, grad)
    torch.testing.assert_close(out, ref_out, **TOLERANCE[device])
    torch.testing.assert_close(grad_x, ref_grad_x, **TOLERANCE[device])
    torch.testing.assert_close(layer.bn.weight.grad, ref[1].weight.grad, **param_grad_tol)
    torch.testing.assert_close(layer.conv.weight.grad, ref[0].weight.grad, **param_grad_tol)


def test_state_dict_is_the_composites():
    layer = DWConvBNAct(8, 3, 1)
    ref = composite_of(layer)
    assert set(layer.state_dict()) == {f"{'conv' if k.startswith('0.') else 'bn'}.{k[2:]}" for k in ref.state_dict()}


@pytest.mark.parametrize("device", DEVICES)
def test_fallback_to_reference_matches_kernels(device):
    torch.manual_seed(3)
    layer = DWConvBNAct(10, 7, 2, "silu").to(device)
    x = torch.randn(3, 10, 12, 12).to(device)
    grad = torch.randn(3, 10, 6, 6).to(device)
    out, grad_x = forward_backward(layer, x, grad)
    with ops.reference_ops(), ieee_fp32():  # as if the library had no kernel for this device
        ref_out, ref_grad_x = forward_backward(layer, x, grad)
    torch.testing.assert_close(out, ref_out, **TOLERANCE[device])
    torch.testing.assert_close(grad_x, ref_grad_x, **TOLERANCE[device])


@pytest.mark.parametrize("cin,cout,k,stride,expand", [(16, 16, 3, 1, 6), (16, 24, 5, 2, 3), (24, 24, 7, 1, 3)])
@pytest.mark.parametrize("device", DEVICES)
def test_mbconv_matches_torch_blocks(cin, cout, k, stride, expand, device):
    torch.manual_seed(cin + k)
    block = MBConv(cin, cout, k, stride, expand)
    assert block.has_skip == (stride == 1 and cin == cout)
    ref = MBConv(cin, cout, k, stride, expand)
    ref.load_state_dict(block.state_dict())
    ref.depthwise = composite_of(block.depthwise)
    block.to(device)
    ref.to(device)
    x = torch.randn(2, cin, 9, 9).to(device)
    out_size = (9 - 1) // stride + 1
    grad = torch.randn(2, cout, out_size, out_size).to(device)
    with ieee_fp32():  # the 1x1 convolutions of both in IEEE float32 on CUDA
        out, grad_x = forward_backward(block, x, grad)
        ref_out, ref_grad_x = forward_backward(ref, x, grad)
    torch.testing.assert_close(out, ref_out, **TOLERANCE[device])
    torch.testing.assert_close(grad_x, ref_grad_x, **TOLERANCE[device])
