"""dL/dα of a Phase-2 step for every block in one call, from the binary-gate gradients dL/dg and the cost
(`torch.ops.betanas.alpha_grad`, reference: betanas_fast.reference.alpha_grad)."""
import torch

from .. import reference
from .._ext import KERNELS_LOADED, use_kernel

if KERNELS_LOADED:

    @torch.library.register_fake("betanas::alpha_grad")
    def _alpha_grad_fake(alpha, remaining, gate_grad, cost, beta):
        torch._check(alpha.dim() == 2, lambda: f"alpha must be 2-D [blocks, paths], got {tuple(alpha.shape)}")
        return torch.empty_like(alpha), torch.empty_like(alpha)


def alpha_grad(alpha: torch.Tensor, remaining: torch.Tensor, gate_grad: torch.Tensor, cost: torch.Tensor,
               beta: float):
    """(p, grad_alpha), both [L, M] float32: p = softmax(alpha over remaining paths), 0 on dropped ones;
    grad_alpha = sum_j (gate_grad_j + beta cost_j) p_j (delta_mj - p_m) over remaining j, 0 on dropped
    paths (Eq. 4 plus the exact gradient of the cost term of Eq. 6). No autograd: it is a gradient."""
    if use_kernel("alpha_grad", alpha.device.type):
        return torch.ops.betanas.alpha_grad(alpha, remaining, gate_grad, cost, float(beta))
    return reference.alpha_grad(alpha, remaining, gate_grad, cost, float(beta))
