"""Modules built on the fused ops: the depthwise conv+BN+act layer and the MBConv block."""
from .layers import DWConvBNAct
from .mbconv import MBConv
from .supernet import ChoiceBlock, Net, Supernet, gate_grad_bytes, set_bn_batch_stats_frozen

__all__ = ["DWConvBNAct", "MBConv", "ChoiceBlock", "Supernet", "Net", "gate_grad_bytes",
           "set_bn_batch_stats_frozen"]
