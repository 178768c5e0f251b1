"""Fused depthwise MBConv stage y = act(BN(depthwise_conv(x))), k in {3, 5, 7}, stride 1 or 2.

`torch.ops.betanas.dw_bn_act_*` are the compiled ops (schemas in csrc/ops.cpp); this module registers
their fake kernels and autograd, and offers `dw_bn_act`, the functional form that also updates the
running statistics. Wherever no kernel exists for the tensor's device (no compiled library, a CPU-only
build on a GPU, another backend), the reference in betanas_fast.reference runs instead.
"""
from typing import Optional

import torch

from .. import reference
from .._ext import KERNELS_LOADED, use_kernel
from .._rules import conv_out_size
from ._common import act_code, empty_like_layout, empty_stats


def _out_shape(x, stride):
    n, c, h, w = x.shape
    return (n, c, conv_out_size(h, stride), conv_out_size(w, stride))


def _check_shapes(x, weight):
    torch._check(x.dim() == 4, lambda: f"x must be a 4-D tensor [N, C, H, W], got shape {tuple(x.shape)}")
    torch._check(weight.dim() == 4 and weight.shape[-1] in (3, 5, 7),
                 lambda: f"weight must be [C, 1, k, k] with k in (3, 5, 7), got shape {tuple(weight.shape)}")


if KERNELS_LOADED:

    @torch.library.register_fake("betanas::dw_bn_act_train")
    def _train_fake(x, weight, bn_weight, bn_bias, stride, act, eps):
        _check_shapes(x, weight)
        c = x.shape[1]
        return empty_like_layout(x, _out_shape(x, stride)), empty_stats(x, c), empty_stats(x, c)

    @torch.library.register_fake("betanas::dw_bn_act_train_backward")
    def _train_backward_fake(grad_out, x, weight, bn_weight, bn_bias, mean, var, stride, act, eps, weight_grad=True):
        _check_shapes(x, weight)
        return (empty_like_layout(x, x.shape), torch.empty_like(weight),
                torch.empty_like(bn_weight), torch.empty_like(bn_bias))

    @torch.library.register_fake("betanas::dw_bn_act_eval")
    def _eval_fake(x, weight, scale, shift, stride, act):
        _check_shapes(x, weight)
        return empty_like_layout(x, _out_shape(x, stride))

    @torch.library.register_fake("betanas::dw_bn_act_eval_backward")
    def _eval_backward_fake(grad_out, x, weight, scale, shift, stride, act):
        _check_shapes(x, weight)
        return (empty_like_layout(x, x.shape), torch.empty_like(weight),
                torch.empty_like(scale), torch.empty_like(shift))

    def _train_setup_context(ctx, inputs, output):
        x, weight, bn_weight, bn_bias, stride, act, eps = inputs
        _, mean, var = output
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, var)
        ctx.stride, ctx.act, ctx.eps = stride, act, eps
        ctx.mark_non_differentiable(mean, var)

    def _train_backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, bn_weight, bn_bias, mean, var = ctx.saved_tensors
        # frozen weights (Phase 2): the kernel may skip the weight gradient's pass
        weight_grad = ctx.needs_input_grad[1]
        gx, gw, gg, gb = torch.ops.betanas.dw_bn_act_train_backward(
            grad_out, x, weight, bn_weight, bn_bias, mean, var, ctx.stride, ctx.act, ctx.eps, weight_grad)
        return gx, gw if weight_grad else None, gg, gb, None, None, None

    def _eval_setup_context(ctx, inputs, output):
        x, weight, scale, shift, stride, act = inputs
        ctx.save_for_backward(x, weight, scale, shift)
        ctx.stride, ctx.act = stride, act

    def _eval_backward(ctx, grad_out):
        x, weight, scale, shift = ctx.saved_tensors
        grads = torch.ops.betanas.dw_bn_act_eval_backward(grad_out, x, weight, scale, shift, ctx.stride, ctx.act)
        return (*grads, None, None)

    torch.library.register_autograd("betanas::dw_bn_act_train", _train_backward, setup_context=_train_setup_context)
    torch.library.register_autograd("betanas::dw_bn_act_eval", _eval_backward, setup_context=_eval_setup_context)


def dw_bn_act_train(x, weight, bn_weight, bn_bias, stride: int = 1, act="relu6", eps: float = 1e-5):
    """Training mode with batch statistics: returns (out, mean, biased var); mean and var carry no gradient."""
    act = act_code(act)
    if use_kernel("dw_bn_act_train", x.device.type):
        return torch.ops.betanas.dw_bn_act_train(x, weight, bn_weight, bn_bias, stride, act, eps)
    out, mean, var = reference.dw_bn_act_train(x, weight, bn_weight, bn_bias, stride, act, eps)
    return out, mean.detach(), var.detach()


def dw_bn_act_eval(x, weight, scale, shift, stride: int = 1, act="relu6"):
    """Evaluation mode with batch norm folded into y = act(scale * conv(x) + shift)."""
    act = act_code(act)
    if use_kernel("dw_bn_act_eval", x.device.type):
        return torch.ops.betanas.dw_bn_act_eval(x, weight, scale, shift, stride, act)
    return reference.dw_bn_act_eval(x, weight, scale, shift, stride, act)


def dw_bn_act(x, weight, bn_weight, bn_bias, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
              *, stride: int = 1, act="relu6", training: bool = True, momentum: float = 0.1, eps: float = 1e-5):
    """act(batch_norm(depthwise_conv2d(x, weight))), with the semantics of nn.Conv2d(groups=C, bias=False) +
    nn.BatchNorm2d + activation: training normalises with batch statistics and, if running statistics
    are given, updates them in place (momentum, unbiased variance); evaluation uses the running ones."""
    if training or running_mean is None:
        out, mean, var = dw_bn_act_train(x, weight, bn_weight, bn_bias, stride, act, eps)
        if training and running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, out.shape[0] * out.shape[2] * out.shape[3],
                                 momentum)
        return out
    scale = bn_weight * torch.rsqrt(running_var + eps)
    shift = bn_bias - running_mean * scale
    return dw_bn_act_eval(x, weight, scale, shift, stride, act)


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                         var: torch.Tensor, count: int, momentum: float) -> None:
    """What BatchNorm does to its running statistics, in place, after normalising with the batch statistics
    `mean` and biased `var`, each over `count` values per channel: an exponential average with weight
    `momentum` of the mean and of the unbiased variance."""
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)
