"""DWConvBNAct: a drop-in for nn.Sequential(nn.Conv2d(C, C, k, s, k // 2, groups=C, bias=False),
nn.BatchNorm2d(C), activation) that runs the fused op.

It holds exactly those two modules, so its state_dict has their keys (`conv.weight`, `bn.weight`,
`bn.running_mean`, ...) and a checkpoint of the composite loads into it and back.
"""
import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .. import ops


def update_bn_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """What nn.BatchNorm2d does to its running statistics after a training step that normalised with the
    batch statistics `mean` and biased `var`, each over `count` values per channel: count the batch, then
    an exponential (momentum) or cumulative (momentum None) average (ops.update_running_stats)."""
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    ops.update_running_stats(bn.running_mean, bn.running_var, mean, var, count, momentum)


class DWConvBNAct(nn.Module):
    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 1, act: str = "relu6",
                 eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if kernel_size not in (3, 5, 7):
            raise ValueError(f"kernel_size must be 3, 5 or 7, got {kernel_size}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if act not in ops.ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ops.ACTIVATIONS)}")
        self.conv = nn.Conv2d(channels, channels, kernel_size, stride, kernel_size // 2, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
        self.act = act

    @property
    def stride(self) -> int:
        return self.conv.stride[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if not bn.training and bn.track_running_stats:
            return ops.dw_bn_act(x, self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                 stride=self.stride, act=self.act, training=False, eps=bn.eps)
        out, mean, var = ops.dw_bn_act_train(x, self.conv.weight, bn.weight, bn.bias, self.stride, self.act, bn.eps)
        if bn.training and bn.track_running_stats:
            update_bn_running_stats(bn, mean, var, out.shape[0] * out.shape[2] * out.shape[3])
        return out

    def extra_repr(self) -> str:
        return f"act={self.act}"


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An inference copy of `module` in eval mode, as a deployed net runs it: every Conv2d directly followed by
    a BatchNorm2d inside an nn.Sequential becomes one Conv2d with a bias (torch's fuse_conv_bn_eval) and the
    BatchNorm an nn.Identity; DWConvBNAct folds its BatchNorm into the fused op already in eval mode. The
    original is untouched; the copy computes the same function (to rounding)."""
    module = copy.deepcopy(module).eval()
    for seq in list(module.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return module
