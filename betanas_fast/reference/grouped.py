"""References of the two ops that run many candidates of one choice block at once.

Grouped depthwise stage (Phase 1, per-sample paths): G groups, group g holds n_g samples of C_g channels
with a k_g x k_g depthwise kernel, all H x W at the input and with the same stride. Every tensor is a
flat concatenation over the groups, group-major:
    x      sum_g n_g * C_g * H * W       (each group's part is an [n_g, C_g, H, W] contiguous block)
    weight sum_g C_g * k_g * k_g         (each group's [C_g, 1, k_g, k_g])
    bn_weight, bn_bias, mean, var  sum_g C_g
    out    sum_g n_g * C_g * Ho * Wo
Batch statistics are per group and channel (over that group's samples only). An empty group (n_g = 0)
has mean 0 and var 0, and its parameters get zero gradient.

Block gate gradients (Phase 2): for one choice block, sum(o_j(x) * grad_out) for every MBConv candidate j
given as parameter lists, BatchNorm with batch statistics, without autograd; plus sum(x * grad_out),
the identity path's value (0 when the shapes differ).
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F

from .._rules import conv_out_size, stats_dtype
from ._common import activation
from .depthwise import dw_bn_act_train


def group_layout(samples, channels, kernel_sizes, height, width, stride):
    """Per group: (input offset, input numel, output offset, output numel, channel offset, weight offset)."""
    offs = []
    xi = yi = ci = wi = 0
    for n, c, k in zip(samples, channels, kernel_sizes):
        xn = n * c * height * width
        yn = n * c * conv_out_size(height, stride) * conv_out_size(width, stride)
        offs.append((xi, xn, yi, yn, ci, wi))
        xi, yi, ci, wi = xi + xn, yi + yn, ci + c, wi + c * k * k
    return offs


def dw_bn_act_grouped_train(x, weight, bn_weight, bn_bias, samples, channels, kernel_sizes, height, width, stride,
                            act, eps):
    """Returns (out, mean, var), flat and group-major; var is the biased batch variance."""
    outs, means, vars_ = [], [], []
    layout = group_layout(samples, channels, kernel_sizes, height, width, stride)
    for (xo, xn, _, _, co, wo), n, c, k in zip(layout, samples, channels, kernel_sizes):
        ho, wo_ = conv_out_size(height, stride), conv_out_size(width, stride)
        if n == 0:
            outs.append(x.new_empty(0))
            zero = torch.zeros(c, dtype=stats_dtype(x), device=x.device)
            means.append(zero)
            vars_.append(zero)
            continue
        xg = x[xo:xo + xn].view(n, c, height, width)
        wg = weight[wo:wo + c * k * k].view(c, 1, k, k)
        out, mean, var = dw_bn_act_train(xg, wg, bn_weight[co:co + c], bn_bias[co:co + c], stride, act, eps)
        assert out.shape == (n, c, ho, wo_)
        outs.append(out.reshape(-1))
        means.append(mean)
        vars_.append(var)
    return torch.cat(outs), torch.cat(means), torch.cat(vars_)


def dw_bn_act_grouped_train_backward(grad_out, x, weight, bn_weight, bn_bias, mean, var, samples, channels,
                                     kernel_sizes, height, width, stride, act, eps):
    """(grad_x, grad_weight, grad_bn_weight, grad_bn_bias), flat like the inputs."""
    del mean, var
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (x, weight, bn_weight, bn_bias)]
        out = dw_bn_act_grouped_train(*leaves, samples, channels, kernel_sizes, height, width, stride, act, eps)[0]
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))


def _bn_batch(z, gamma, beta, eps):
    """Batch norm with batch statistics in float32 (float64 for float64), result in z's dtype."""
    zs = z.to(stats_dtype(z))
    mean = zs.mean(dim=(0, 2, 3), keepdim=True)
    var = zs.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    out = (zs - mean) * torch.rsqrt(var + eps) * gamma.to(zs.dtype).view(1, -1, 1, 1) \
        + beta.to(zs.dtype).view(1, -1, 1, 1)
    return out.to(z.dtype)


def mbconv_batch_stats(x, expand_weight, expand_bn_weight, expand_bn_bias, dw_weight, dw_bn_weight, dw_bn_bias,
                       project_weight, project_bn_weight, project_bn_bias, stride, residual, act, eps):
    """One MBConv forward with batch-statistics BatchNorm, in x's dtype (statistics in float32)."""
    dt = x.dtype
    h = activation(_bn_batch(F.conv2d(x, expand_weight.to(dt).view(-1, x.shape[1], 1, 1)), expand_bn_weight,
                             expand_bn_bias, eps), act)
    h = dw_bn_act_train(h, dw_weight.to(dt), dw_bn_weight, dw_bn_bias, stride, act, eps)[0]
    o = _bn_batch(F.conv2d(h, project_weight.to(dt).view(-1, h.shape[1], 1, 1)), project_bn_weight,
                  project_bn_bias, eps)
    return o + x if residual else o


def block_gate_grads(x, grad_out, expand_weight: Sequence[torch.Tensor], expand_bn_weight, expand_bn_bias,
                     dw_weight, dw_bn_weight, dw_bn_bias, project_weight, project_bn_weight, project_bn_bias,
                     stride: int, residual: bool, act: int, eps: float) -> torch.Tensor:
    """float32 [K + 1]: sum(o_j(x) * grad_out) for the K candidates, then sum(x * grad_out) (0 if the
    shapes differ). Each candidate's output is reduced as soon as it exists."""
    vals: List[torch.Tensor] = []
    g = grad_out.float()
    with torch.no_grad():
        for j in range(len(expand_weight)):
            o = mbconv_batch_stats(x, expand_weight[j], expand_bn_weight[j], expand_bn_bias[j], dw_weight[j],
                                   dw_bn_weight[j], dw_bn_bias[j], project_weight[j], project_bn_weight[j],
                                   project_bn_bias[j], stride, residual, act, eps)
            vals.append((o.float() * g).sum())
        ident = (x.float() * g).sum() if x.shape == grad_out.shape else g.new_zeros(())
    return torch.stack(vals + [ident]).float()
