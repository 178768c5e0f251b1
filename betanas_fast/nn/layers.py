"""DWConvBNAct: a drop-in for nn.Sequential(nn.Conv2d(C, C, k, s, k // 2, groups=C, bias=False),
nn.BatchNorm2d(C), activation) that runs the fused op.

It holds exactly those two modules, so its state_dict has their keys (`conv.weight`, `bn.weight`,
`bn.running_mean`, ...) and a checkpoint of the composite loads into it and back.
"""
import torch
from torch import nn

from .. import ops


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
        use_batch_stats = bn.training or not bn.track_running_stats
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
                momentum = 1.0 / float(bn.num_batches_tracked)
        return ops.dw_bn_act(
            x, self.conv.weight, bn.weight, bn.bias,
            bn.running_mean if bn.track_running_stats else None,
            bn.running_var if bn.track_running_stats else None,
            stride=self.stride, act=self.act, training=use_batch_stats, momentum=momentum, eps=bn.eps)

    def extra_repr(self) -> str:
        return f"act={self.act}"
