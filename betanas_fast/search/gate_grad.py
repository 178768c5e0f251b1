"""dL/dα from the binary-gate gradients (Eq. 4) plus the cost term of Eq. 6, over the remaining paths:
one call of the gate-gradient op for all blocks (its pure-PyTorch reference where no kernel exists)."""
import torch

from .. import ops


def gate_grad_to_alpha_grad(alpha: torch.Tensor, remaining_mask: torch.Tensor, gate_grad: torch.Tensor,
                            cost: torch.Tensor, beta: float) -> torch.Tensor:
    """All arguments are L x M; `remaining_mask` is bool. Returns L x M fp32, zero on dropped paths.

    CE part:   dL/dα_m = Σ_{j∈R} g_j p_j (δ_mj − p_m)
    cost part: ∂/∂α_m β Σ_{j∈R} p_j c_j
    with p = softmax of α over the remaining paths (0 elsewhere).
    """
    as_f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
    _, grad_alpha = ops.gate_grad(as_f32(alpha), remaining_mask.to(torch.bool).contiguous(), as_f32(gate_grad),
                                  as_f32(cost), float(beta))
    return grad_alpha
