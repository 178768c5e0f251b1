"""Reference of betanas::alpha_grad, dL/dα from the binary-gate gradients: Eq. 4 of the paper written out
with the softmax Jacobian.

For block l: p = softmax(alpha over the remaining paths), 0 on dropped ones, and
    grad_alpha_m = sum_j (gate_grad_j + beta * cost_j) * p_j * (delta_mj - p_m)   over remaining j,
which is the binary-gate estimator of ProxylessNAS for the cross-entropy part and the exact gradient of
beta * sum_m p_m * cost_m for the cost part. Dropped paths get 0.
"""
import torch


def alpha_grad(alpha, remaining, gate_grad, cost, beta):
    masked = alpha.masked_fill(~remaining, float("-inf"))
    p = torch.softmax(masked, dim=1).nan_to_num(0.0)  # a row with nothing remaining: all 0
    p = torch.where(remaining, p, torch.zeros_like(p))
    # jacobian[l, j, m] = p_j (delta_jm - p_m) = d p_j / d alpha_m
    jacobian = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    h = torch.where(remaining, gate_grad + beta * cost, torch.zeros_like(gate_grad))
    grad_alpha = torch.einsum("lj,ljm->lm", h, jacobian)
    return p, torch.where(remaining, grad_alpha, torch.zeros_like(grad_alpha))
