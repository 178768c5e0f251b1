"""The Python face of the betanas ops: fake kernels, autograd, and the fallback to the references."""
from .depthwise import ACTIVATIONS, OP_NAMES as _DW_OPS, dw_bn_act, dw_bn_act_eval, dw_bn_act_train
from .gate import OP_NAMES as _GATE_OPS, gate_grad
from .grouped import OP_NAMES as _GROUPED_OPS, block_gate_grads, dw_bn_act_grouped_train

OP_NAMES = tuple(_DW_OPS) + tuple(_GATE_OPS) + tuple(_GROUPED_OPS)

__all__ = ["ACTIVATIONS", "OP_NAMES", "dw_bn_act", "dw_bn_act_train", "dw_bn_act_eval", "gate_grad",
           "dw_bn_act_grouped_train", "block_gate_grads"]
