"""The Python face of the betanas ops: fake kernels, autograd, and the fallback to the references."""
import contextlib

from . import depthwise as _depthwise, gate as _gate, grouped as _grouped
from .depthwise import ACTIVATIONS, dw_bn_act, dw_bn_act_eval, dw_bn_act_train
from .gate import gate_grad
from .grouped import block_gate_grads, dw_bn_act_grouped_train

OP_NAMES = tuple(_depthwise.OP_NAMES) + tuple(_gate.OP_NAMES) + tuple(_grouped.OP_NAMES)


@contextlib.contextmanager
def reference_ops():
    """Within this block every betanas op runs its pure-PyTorch reference, as if no kernel were built
    (to compare or benchmark the kernels against the references in one process)."""
    modules = (_depthwise, _gate, _grouped)
    saved = [m._HAS_KERNEL for m in modules]
    try:
        for m in modules:
            m._HAS_KERNEL = {}
        yield
    finally:
        for m, kernels in zip(modules, saved):
            m._HAS_KERNEL = kernels


__all__ = ["ACTIVATIONS", "OP_NAMES", "reference_ops", "dw_bn_act", "dw_bn_act_train", "dw_bn_act_eval",
           "gate_grad", "dw_bn_act_grouped_train", "block_gate_grads"]
