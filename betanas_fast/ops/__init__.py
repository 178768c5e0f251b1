"""The Python face of the betanas ops: fake kernels, autograd, and the fallback to the references."""
from .depthwise import ACTIVATIONS, OP_NAMES as _DW_OPS, dw_bn_act, dw_bn_act_eval, dw_bn_act_train

OP_NAMES = tuple(_DW_OPS)

__all__ = ["ACTIVATIONS", "OP_NAMES", "dw_bn_act", "dw_bn_act_train", "dw_bn_act_eval"]
