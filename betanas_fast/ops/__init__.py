"""The Python face of the betanas ops: fake kernels, autograd, and the fallback to the references.

Whether an op runs its kernel or its reference is decided in one place, betanas_fast._ext.use_kernel;
`reference_ops()` makes every op run its reference within a block.
"""
from .._ext import OP_NAMES, reference_ops
from ._common import ACTIVATIONS
from .alpha import alpha_grad
from .depthwise import dw_bn_act, dw_bn_act_eval, dw_bn_act_train, update_running_stats
from .grouped import block_gate_grads, block_gate_grads_layout, dw_bn_act_grouped_train
from .memory import cache_cpu_allocations, default_phase2_budget
from .precision import ieee_fp32

__all__ = ["ACTIVATIONS", "OP_NAMES", "reference_ops", "dw_bn_act", "dw_bn_act_train", "dw_bn_act_eval",
           "update_running_stats", "alpha_grad", "dw_bn_act_grouped_train", "block_gate_grads",
           "block_gate_grads_layout", "cache_cpu_allocations", "default_phase2_budget", "ieee_fp32"]
