"""betanas::alpha_grad (dL/dα from the binary-gate gradients): Eq. 4 over the remaining paths in float64,
the cost term against a finite difference, masking, one-path rows, extreme alphas, opcheck, and kernel vs
reference."""
import pytest
import torch

import betanas_fast
from betanas_fast import ops, reference

from common import DEVICES

pytestmark = pytest.mark.skipif(not betanas_fast.KERNELS_LOADED, reason="kernel library not built")


def random_state(L, M, seed, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    alpha = torch.randn(L, M, generator=g) * scale
    remaining = torch.rand(L, M, generator=g) < 0.7
    remaining[torch.arange(L), torch.randint(0, M, (L,), generator=g)] = True  # never an empty block
    remaining[0] = False
    remaining[0, 2 % M] = True  # a block with a single remaining path
    gate = torch.randn(L, M, generator=g)
    cost = torch.rand(L, M, generator=g) * 50
    return [t.to(device) for t in (alpha, remaining, gate, cost)]


def eq4_by_hand(alpha, remaining, gate, cost, beta):
    """Eq. 4 in float64, loop by loop, dropped paths excluded; plus d/d alpha of beta * sum p * cost."""
    L, M = alpha.shape
    p = torch.zeros(L, M, dtype=torch.float64)
    grad = torch.zeros(L, M, dtype=torch.float64)
    for l in range(L):
        idx = [m for m in range(M) if remaining[l, m]]
        e = torch.exp(alpha[l, idx].double() - alpha[l, idx].double().max())
        p[l, idx] = e / e.sum()
        for m in idx:
            for j in idx:
                delta = 1.0 if m == j else 0.0
                grad[l, m] += (gate[l, j].double() + beta * cost[l, j].double()) * p[l, j] * (delta - p[l, m])
    return p, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L,M", [(21, 7), (1, 1), (5, 3), (3, 40)])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_equals_eq4_in_float64(device, L, M, beta):
    alpha, remaining, gate, cost = random_state(L, M, seed=L * 100 + M, device=device)
    p, grad = torch.ops.betanas.alpha_grad(alpha, remaining, gate, cost, beta)
    p_ref, grad_ref = eq4_by_hand(alpha.cpu(), remaining.cpu(), gate.cpu(), cost.cpu(), beta)
    torch.testing.assert_close(p.cpu().double(), p_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), grad_ref, atol=1e-5, rtol=1e-4)
    assert (p[~remaining] == 0).all() and (grad[~remaining] == 0).all()
    assert torch.allclose(p.sum(1).cpu(), torch.ones(L))
    assert p[0, 2 % M] == 1 and grad[0, 2 % M] == 0  # one remaining path: certain, nothing to learn


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device):
    alpha, remaining, gate, cost = random_state(21, 7, seed=5, device=device)
    got = torch.ops.betanas.alpha_grad(alpha, remaining, gate, cost, 0.2)
    expected = reference.alpha_grad(alpha, remaining, gate, cost, 0.2)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_cost_term_is_the_derivative_of_expected_cost():
    alpha, remaining, _, cost = random_state(6, 7, seed=9)
    alpha, cost = alpha.double(), cost.double()
    beta, h = 0.7, 1e-6

    def expected_cost(a):
        p = torch.softmax(a.masked_fill(~remaining, float("-inf")), dim=1)
        return beta * (p * cost).sum()

    _, grad = torch.ops.betanas.alpha_grad(alpha.float(), remaining, torch.zeros_like(alpha).float(),
                                           cost.float(), beta)
    for l, m in remaining.nonzero().tolist():
        bump = torch.zeros_like(alpha)
        bump[l, m] = h
        fd = (expected_cost(alpha + bump) - expected_cost(alpha - bump)) / (2 * h)
        assert abs(grad[l, m].item() - fd.item()) <= 1e-4 * max(1.0, abs(fd.item())), (l, m)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_alphas_stay_finite(device):
    alpha, remaining, gate, cost = random_state(4, 7, seed=2, device=device)
    alpha = alpha * 1e4
    alpha[1] = -3e38
    p, grad = torch.ops.betanas.alpha_grad(alpha, remaining, gate, cost, 0.1)
    assert torch.isfinite(p).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(p.sum(1), torch.ones(4, device=device))


def test_no_remaining_path_gives_zeros():
    alpha, remaining, gate, cost = random_state(3, 4, seed=1)
    remaining[1] = False
    p, grad = torch.ops.betanas.alpha_grad(alpha, remaining, gate, cost, 0.1)
    assert (p[1] == 0).all() and (grad[1] == 0).all()


def test_opcheck():
    torch.library.opcheck(torch.ops.betanas.alpha_grad.default, (*random_state(21, 7, seed=3), 0.25))


def test_python_entry_falls_back_to_reference():
    state = random_state(8, 7, seed=4)
    with_kernel = ops.alpha_grad(*state, 0.5)
    with ops.reference_ops():
        fallback = ops.alpha_grad(*state, 0.5)
    for a, b in zip(with_kernel, fallback):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (dict(alpha=torch.zeros(7)), "alpha must be 2-D"),
    (dict(remaining=torch.ones(3, 7)), "remaining must be a bool mask"),
    (dict(cost=torch.zeros(3, 6)), "cost must have alpha's shape"),
    (dict(gate_grad=torch.zeros(3, 7, dtype=torch.float64)), "gate_grad must be float32"),
])
def test_bad_input(overrides, message):
    args = dict(alpha=torch.zeros(3, 7), remaining=torch.ones(3, 7, dtype=torch.bool),
                gate_grad=torch.zeros(3, 7), cost=torch.zeros(3, 7), beta=0.1)
    args.update(overrides)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.betanas.alpha_grad(**args)
