"""Ops that run many candidates of one choice block in one call (schemas in csrc/ops.cpp):

- `dw_bn_act_grouped_train`: the depthwise stage of every sampled path's group of samples at once
  (Phase 1 with per-sample paths); flat group-major tensors, see betanas_fast.reference.grouped.
- `block_gate_grads`: sum(o_j(x) * dL/dO) for every MBConv candidate of a block (Phase 2), without
  autograd graphs and without keeping the candidates' outputs alive.

Where no kernel exists for the tensor's device, the reference runs instead.
"""
from typing import List, Sequence

import torch

from .._ext import KERNELS_LOADED, use_kernel
from .._rules import conv_out_size
from ..reference import grouped as ref
from ._common import act_code, empty_stats


def _check_groups(x, samples, channels, kernel_sizes, height, width):
    torch._check(len(samples) == len(channels) == len(kernel_sizes),
                 lambda: f"samples, channels and kernel_sizes must have one entry per group, got "
                         f"{len(samples)}, {len(channels)}, {len(kernel_sizes)}")
    for k in kernel_sizes:
        torch._check(k in (3, 5, 7), lambda: f"kernel sizes must be 3, 5 or 7, got {list(kernel_sizes)}")
    numel = sum(n * c for n, c in zip(samples, channels)) * height * width
    torch._check(x.dim() == 1 and x.shape[0] == numel,
                 lambda: f"x must be flat with sum(samples * channels) * height * width = {numel} elements, "
                         f"got shape {tuple(x.shape)}")


def _out_numel(samples, channels, height, width, stride):
    plane = conv_out_size(height, stride) * conv_out_size(width, stride)  # the same for every odd kernel size
    return sum(n * c for n, c in zip(samples, channels)) * plane


if KERNELS_LOADED:

    @torch.library.register_fake("betanas::dw_bn_act_grouped_train")
    def _grouped_fake(x, weight, bn_weight, bn_bias, samples, channels, kernel_sizes, height, width, stride, act, eps):
        _check_groups(x, samples, channels, kernel_sizes, height, width)
        c = sum(channels)
        return (x.new_empty(_out_numel(samples, channels, height, width, stride)), empty_stats(x, c),
                empty_stats(x, c))

    @torch.library.register_fake("betanas::dw_bn_act_grouped_train_backward")
    def _grouped_backward_fake(grad_out, x, weight, bn_weight, bn_bias, mean, var, samples, channels, kernel_sizes,
                               height, width, stride, act, eps):
        _check_groups(x, samples, channels, kernel_sizes, height, width)
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bn_weight), torch.empty_like(bn_bias)

    @torch.library.register_fake("betanas::block_gate_grads")
    def _block_gate_fake(x, grad_out, expand_weight, expand_bn_weight, expand_bn_bias, dw_weight, dw_bn_weight,
                         dw_bn_bias, project_weight, project_bn_weight, project_bn_bias, stride, residual, act, eps):
        return x.new_empty((len(expand_weight) + 1,), dtype=torch.float32)

    def _grouped_setup_context(ctx, inputs, output):
        x, weight, bn_weight, bn_bias, *rest = inputs
        _, mean, var = output
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, var)
        ctx.rest = rest
        ctx.mark_non_differentiable(mean, var)

    def _grouped_backward(ctx, grad_out, _grad_mean, _grad_var):
        grads = torch.ops.betanas.dw_bn_act_grouped_train_backward(grad_out.contiguous(), *ctx.saved_tensors,
                                                                   *ctx.rest)
        return (*grads,) + (None,) * len(ctx.rest)

    torch.library.register_autograd("betanas::dw_bn_act_grouped_train", _grouped_backward,
                                    setup_context=_grouped_setup_context)


def dw_bn_act_grouped_train(x, weight, bn_weight, bn_bias, samples: Sequence[int], channels: Sequence[int],
                            kernel_sizes: Sequence[int], height: int, width: int, stride: int = 1, act="relu6",
                            eps: float = 1e-5):
    """The depthwise stage (training mode, batch statistics per group) of G groups in one call.
    Flat group-major tensors (see betanas_fast.reference.grouped); returns (out, mean, biased var),
    mean and var without gradient."""
    act = act_code(act)
    samples, channels, kernel_sizes = [int(v) for v in samples], [int(v) for v in channels], [int(v) for v in kernel_sizes]
    if use_kernel("dw_bn_act_grouped_train", x.device.type):
        return torch.ops.betanas.dw_bn_act_grouped_train(x, weight, bn_weight, bn_bias, samples, channels, kernel_sizes,
                                                         int(height), int(width), int(stride), act, float(eps))
    out, mean, var = ref.dw_bn_act_grouped_train(x, weight, bn_weight, bn_bias, samples, channels, kernel_sizes,
                                                 int(height), int(width), int(stride), act, float(eps))
    return out, mean.detach(), var.detach()


def block_gate_grads_layout(device: torch.device) -> torch.memory_format:
    """The layout block_gate_grads's kernel reads x and dL/dO in (another is copied into it on every call): the CPU
    kernel works channels_last, the CUDA one NCHW."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def block_gate_grads(x, grad_out, expand_weight: List[torch.Tensor], expand_bn_weight: List[torch.Tensor],
                     expand_bn_bias: List[torch.Tensor], dw_weight: List[torch.Tensor], dw_bn_weight: List[torch.Tensor],
                     dw_bn_bias: List[torch.Tensor], project_weight: List[torch.Tensor],
                     project_bn_weight: List[torch.Tensor], project_bn_bias: List[torch.Tensor], stride: int,
                     residual: bool, act="relu6", eps: float = 1e-5) -> torch.Tensor:
    """float32 [K + 1]: sum(o_j(x) * grad_out) for each of the K MBConv candidates given by their
    parameters (o_j includes x when `residual`), then sum(x * grad_out) (the identity path; 0 when the
    shapes differ). BatchNorm normalises with batch statistics; nothing is recorded for autograd."""
    act = act_code(act)
    args = (x, grad_out, list(expand_weight), list(expand_bn_weight), list(expand_bn_bias), list(dw_weight),
            list(dw_bn_weight), list(dw_bn_bias), list(project_weight), list(project_bn_weight),
            list(project_bn_bias), int(stride), bool(residual), act, float(eps))
    with torch.no_grad():
        if use_kernel("block_gate_grads", x.device.type):
            return torch.ops.betanas.block_gate_grads(*args)
        return ref.block_gate_grads(*args)
