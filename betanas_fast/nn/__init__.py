"""Modules built on the fused ops: the depthwise conv+BN+act layer, the MBConv block (with optional
squeeze-excitation), the supernet and the searched net."""
from .layers import DWConvBNAct, fold_batchnorm
from .mbconv import MBConv, SqueezeExcite, se_channels
from .supernet import ChoiceBlock, Net, Supernet, gate_grad_bytes, set_bn_batch_stats_frozen

__all__ = ["DWConvBNAct", "fold_batchnorm", "MBConv", "SqueezeExcite", "se_channels", "ChoiceBlock", "Supernet",
           "Net", "gate_grad_bytes", "set_bn_batch_stats_frozen"]
