"""Reference of the fused depthwise stage y = act(BN(depthwise_conv(x))), with the ops' signatures.

`act` is the integer code of the op schemas: 0 none, 1 relu6, 2 silu. Batch statistics and the
normalisation are computed in float32 (float64 for float64 inputs), like the kernels; the convolution
runs in x's dtype, like torch's own composite.
"""
import torch
import torch.nn.functional as F

from .._rules import stats_dtype
from ._common import activation


def _per_channel(t, like):
    return t.to(stats_dtype(like)).view(1, -1, 1, 1)


def depthwise_conv(x, weight, stride):
    k = weight.shape[-1]
    return F.conv2d(x, weight.to(x.dtype), stride=stride, padding=k // 2, groups=x.shape[1])


def dw_bn_act_train(x, weight, bn_weight, bn_bias, stride, act, eps):
    """Returns (out, mean, var): var is the biased batch variance."""
    z = depthwise_conv(x, weight, stride).to(stats_dtype(x))
    mean = z.mean(dim=(0, 2, 3))
    var = z.var(dim=(0, 2, 3), unbiased=False)
    xhat = (z - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + eps)
    out = activation(xhat * _per_channel(bn_weight, x) + _per_channel(bn_bias, x), act)
    return out.to(x.dtype), mean, var


def dw_bn_act_eval(x, weight, scale, shift, stride, act):
    z = depthwise_conv(x, weight, stride).to(stats_dtype(x))
    return activation(z * _per_channel(scale, x) + _per_channel(shift, x), act).to(x.dtype)


def _vjp(fn, grad_out, tensors):
    """Gradients of fn(*tensors) (its first output) against grad_out, through autograd."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in tensors]
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out, leaves, grad_out)


def dw_bn_act_train_backward(grad_out, x, weight, bn_weight, bn_bias, mean, var, stride, act, eps,
                             weight_grad=True):
    """(grad_x, grad_weight, grad_bn_weight, grad_bn_bias); grad_weight is zeros with weight_grad=False. mean
    and var are those the forward returned: autograd recomputes them from x, which gives the same values."""
    del mean, var
    gx, gw, gg, gb = _vjp(lambda x_, w_, g_, b_: dw_bn_act_train(x_, w_, g_, b_, stride, act, eps), grad_out,
                          (x, weight, bn_weight, bn_bias))
    return gx, gw if weight_grad else torch.zeros_like(gw), gg, gb


def dw_bn_act_eval_backward(grad_out, x, weight, scale, shift, stride, act):
    """(grad_x, grad_weight, grad_scale, grad_shift)."""
    return _vjp(lambda x_, w_, a_, b_: dw_bn_act_eval(x_, w_, a_, b_, stride, act), grad_out,
                (x, weight, scale, shift))
