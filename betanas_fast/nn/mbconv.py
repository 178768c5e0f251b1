"""MBConv, the MobileNetV2 inverted-residual block of the search space:
1x1 expand (BN, ReLU6) -> k x k depthwise, stride s (BN, ReLU6; the fused op) -> 1x1 project (BN),
plus the residual when the stride is 1 and the channels are unchanged."""
import torch
from torch import nn

from ..space import expanded_channels
from .layers import DWConvBNAct


class MBConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 expand_ratio: float = 6, act: str = "relu6"):
        super().__init__()
        mid = expanded_channels(in_channels, expand_ratio)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.expand_ratio = kernel_size, stride, expand_ratio
        self.has_skip = stride == 1 and in_channels == out_channels
        if expand_ratio != 1:
            self.expand = nn.Sequential(
                nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True)
                if act == "relu6" else nn.SiLU(inplace=True))
        else:
            self.expand = nn.Identity()
        self.depthwise = DWConvBNAct(mid, kernel_size, stride, act)
        self.project = nn.Sequential(nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.has_skip else out

    @property
    def has_expand(self) -> bool:
        return not isinstance(self.expand, nn.Identity)

    def gate_grad_params(self):
        """The nine parameter tensors of betanas::block_gate_grads for this block (it needs an expand stage):
        expand weight / BN weight / BN bias, depthwise ..., project ..."""
        conv_e, bn_e = self.expand[0], self.expand[1]
        conv_p, bn_p = self.project[0], self.project[1]
        dw = self.depthwise
        return (conv_e.weight, bn_e.weight, bn_e.bias, dw.conv.weight, dw.bn.weight, dw.bn.bias,
                conv_p.weight, bn_p.weight, bn_p.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}->{self.out_channels}, k={self.kernel_size}, s={self.stride}, "
                f"e={self.expand_ratio}, skip={self.has_skip}")
