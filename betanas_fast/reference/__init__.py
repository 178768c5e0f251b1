"""Pure-PyTorch oracles of every betanas op: readable, slow, obviously right.

The kernels are tested against these, and the ops run them wherever no kernel is available.
"""
from .depthwise import (
    dw_bn_act_eval,
    dw_bn_act_eval_backward,
    dw_bn_act_train,
    dw_bn_act_train_backward,
)
from .alpha import alpha_grad
from ._common import scaled_error

__all__ = ["dw_bn_act_train", "dw_bn_act_train_backward", "dw_bn_act_eval", "dw_bn_act_eval_backward", "alpha_grad",
           "scaled_error"]
