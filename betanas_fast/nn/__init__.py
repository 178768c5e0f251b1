"""Modules built on the fused ops: the depthwise conv+BN+act layer and the MBConv block."""
from .layers import DWConvBNAct
from .mbconv import MBConv

__all__ = ["DWConvBNAct", "MBConv"]
