"""MBConv, the MobileNetV2 inverted-residual block of the search space:
1x1 expand (BN, act) -> k x k depthwise, stride s (BN, act; the fused op) -> [squeeze-excitation] ->
1x1 project (BN), plus the residual when the stride is 1 and the channels are unchanged.

`act` is the activation of every stage that has one: "relu6" (the search space's) or "silu" (alias "swish").
The squeeze-excitation is off by default (the supernet and its candidates never have one); with `se_ratio`
> 0 it sits where timm's InvertedResidual puts it, after the depthwise stage's activation and before the
projection, so that a block is exactly timm's `ir_..._se<se_ratio>` (see `se_channels` for the ratio).
"""
from typing import Optional

import torch
from torch import nn

from ..space import expanded_channels
from .layers import DWConvBNAct

# Activation names the blocks accept, and the name each one stands for.
BLOCK_ACTIVATIONS = {"relu6": "relu6", "silu": "silu", "swish": "silu"}


def canonical_act(act: str) -> str:
    """"relu6" or "silu" for an accepted activation name ("swish" is SiLU); ValueError otherwise."""
    if act not in BLOCK_ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(BLOCK_ACTIVATIONS)}")
    return BLOCK_ACTIVATIONS[act]


def make_act(act: str) -> nn.Module:
    """The activation module of `act` ("relu6" -> nn.ReLU6, "silu"/"swish" -> nn.SiLU), in place."""
    return nn.ReLU6(inplace=True) if canonical_act(act) == "relu6" else nn.SiLU(inplace=True)


def se_channels(in_channels: int, expand_ratio: float, se_ratio: float) -> int:
    """The reduced width of an MBConv's squeeze-excitation.

    `se_ratio` is relative to the block's INPUT channels, as the `se` of a timm block string
    (`ir_r1_k5_s2_e6_c40_se0.25`) is for timm's EfficientNet builder (EfficientNetBuilder with its
    default se_from_exp=False divides the ratio by the expansion ratio, and SqueezeExcite applied to the
    expanded channels then keeps round(expanded * se_ratio / expand_ratio) of them, Python's round). The
    same float arithmetic is done here, so that the exported block string rebuilds the same widths:
    round(expanded_channels(in, e) * (se_ratio / e)), i.e. about round(in_channels * se_ratio).
    Example: in 40, e 6, se_ratio 0.25 -> 240 expanded channels squeezed to 10."""
    return round(expanded_channels(in_channels, expand_ratio) * (se_ratio / expand_ratio))


class SqueezeExcite(nn.Module):
    """x * sigmoid(conv_expand(act(conv_reduce(mean_hw(x))))), 1x1 convolutions with bias; the module and
    parameter names are timm's SqueezeExcite's (conv_reduce, conv_expand)."""

    def __init__(self, channels: int, reduced: int, act: str = "relu6"):
        super().__init__()
        if reduced < 1:
            raise ValueError(f"squeeze-excitation of {channels} channels reduced to {reduced}: needs at least 1")
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = make_act(act)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class MBConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 expand_ratio: float = 6, act: str = "relu6", se_ratio: float = 0.0):
        """`se_ratio` > 0 adds a squeeze-excitation of se_channels(in_channels, expand_ratio, se_ratio)
        reduced channels (relative to the block's input channels, timm's convention) after the depthwise
        stage. Without it (the default) the block's modules and state_dict keys are unchanged."""
        super().__init__()
        act = canonical_act(act)
        if se_ratio < 0:
            raise ValueError(f"se_ratio must be >= 0, got {se_ratio}")
        mid = expanded_channels(in_channels, expand_ratio)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.expand_ratio = kernel_size, stride, expand_ratio
        self.act, self.se_ratio = act, float(se_ratio)
        self.has_skip = stride == 1 and in_channels == out_channels
        if expand_ratio != 1:
            self.expand = nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), make_act(act))
        else:
            self.expand = nn.Identity()
        self.depthwise = DWConvBNAct(mid, kernel_size, stride, act)
        self.se: Optional[SqueezeExcite] = (
            SqueezeExcite(mid, se_channels(in_channels, expand_ratio, se_ratio), act) if se_ratio > 0 else None)
        self.project = nn.Sequential(nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(self.expand(x))
        if self.se is not None:
            h = self.se(h)
        out = self.project(h)
        return out + x if self.has_skip else out

    @property
    def has_expand(self) -> bool:
        return not isinstance(self.expand, nn.Identity)

    def gate_grad_params(self):
        """The nine parameter tensors of betanas::block_gate_grads for this block (it needs an expand stage):
        expand weight / BN weight / BN bias, depthwise ..., project ..."""
        if self.se is not None:
            raise ValueError("betanas::block_gate_grads has no squeeze-excitation; this block has one")
        conv_e, bn_e = self.expand[0], self.expand[1]
        conv_p, bn_p = self.project[0], self.project[1]
        dw = self.depthwise
        return (conv_e.weight, bn_e.weight, bn_e.bias, dw.conv.weight, dw.bn.weight, dw.bn.bias,
                conv_p.weight, bn_p.weight, bn_p.bias)

    def extra_repr(self) -> str:
        se = f", se={self.se_ratio:g}" if self.se is not None else ""
        return (f"{self.in_channels}->{self.out_channels}, k={self.kernel_size}, s={self.stride}, "
                f"e={self.expand_ratio}, skip={self.has_skip}{se}")
