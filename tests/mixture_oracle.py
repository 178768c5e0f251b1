"""The DARTS family's α gradients computed again on the float64 oracle (float64_supernet.GatedSupernet: the supernet
from plain torch functional ops, no op of this package), and the measurement shared by tests/test_mixture.py and
benchmarks/mixture_demo.py: the engine's gradient against the oracle's, as the largest difference relative to the
oracle's largest entry over the remaining paths."""
from __future__ import annotations

import math
from typing import Dict

import torch

from betanas_fast.search import Search

from common import tiny
from float64_supernet import GatedSupernet


def prepared(out, dtype=torch.float64, keep=None, **kw):
    """A tiny search of a DARTS-family strategy after three weight steps, with random α (and random HM-NAS mask
    scores about its threshold), each block then keeping its `keep` best paths (P-DARTS's stage end) where given,
    and a held-out batch; the network then in `dtype`. In float64 the engine's own code (mixture, loss, unrolled
    step, autograd) meets the oracle free of float32 rounding, which the α gradient's cancellations amplify to
    about 1e-3 of its largest entry."""
    s = Search(tiny(out, **kw))
    s._build()
    for _ in range(3):
        s.phase1_step()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        s.state.alpha.copy_(torch.randn(s.state.alpha.shape, generator=g))
        if s.state.mask_scores is not None:
            s.state.mask_scores.copy_(s.cfg.hmnas_mask_threshold * (1 + torch.randn(s.state.alpha.shape, generator=g)))
    if keep is not None:
        s.state.keep_top(keep, step=0, reason="test")
    s.model.to(dtype)
    if s.strategy.mixture:  # (DARTS's second order takes its training batch)
        s._last_train_batch = (s._last_train_batch[0].to(dtype), s._last_train_batch[1])
    x, y = s.heldout_stream.next()
    return s, s._on_device(x).to(dtype), y


def softmax64(logits: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(~remaining, float("-inf")), dim=1)


def relative_error(got: torch.Tensor, want: torch.Tensor, remaining: torch.Tensor) -> float:
    got, want = got.double()[remaining], want.double()[remaining]
    return float((got - want).abs().max() / want.abs().max())


def _cost_term(s, p):
    return s.beta * (p * s.cost.table.double()).sum()


def darts_first_order(s, x, y) -> torch.Tensor:
    """d/dα of the held-out loss at softmax(α) plus β·Σ p·cost."""
    rem = s.state.remaining
    oracle = GatedSupernet.from_engine(s.model)
    a = s.state.alpha.detach().double().requires_grad_()
    p = softmax64(a, rem)
    return torch.autograd.grad(oracle.loss(x, y, p, rem) + _cost_term(s, p), a)[0]


def darts_second_order(s, x, y) -> torch.Tensor:
    """DARTS's second-order gradient: the unrolled step w' = w − ξ(∇_w L_train + the optimiser's weight decay on the
    convolution and linear weights; no momentum), ∇_α L_val(w', α) and ∇_{w'} L_val by autograd, and the paper's
    finite difference at w ± ε∇_{w'} L_val. (Not the exact second derivative: ReLU6's kinks make ∇_α L_train jump
    as w moves, so the finite difference and the exact Hessian term differ on any ReLU network, the paper's
    included; the oracle follows the paper.)"""
    rem, xi, wd = s.state.remaining, s.sgd.param_groups[0]["lr"], s.cfg.weight_decay
    assert s.cfg.momentum == 0, "the oracle's unrolled step has no momentum"
    x_tr, y_tr = s._last_train_batch
    oracle = GatedSupernet.from_engine(s.model)
    a = s.state.alpha.detach().double().requires_grad_()
    p = softmax64(a, rem)

    def loss_at(tensors, xb, yb, probs):
        return oracle.with_tensors(tensors).loss(xb, yb, probs, rem)

    w = [t.requires_grad_() for t in oracle.tensors()]
    g = torch.autograd.grad(loss_at(w, x_tr, y_tr, p.detach()), w)
    unrolled = [(t - xi * (d + (wd * t if t.dim() > 1 else 0))).detach().requires_grad_() for t, d in zip(w, g)]
    dalpha, *dw = torch.autograd.grad(loss_at(unrolled, x, y, p) + _cost_term(s, p), [a] + unrolled)
    eps = 0.01 / torch.cat([d.flatten() for d in dw]).norm()
    h = [torch.autograd.grad(loss_at([(t + sign * eps * d).detach() for t, d in zip(w, dw)], x_tr, y_tr,
                                     softmax64(a, rem)), a)[0] for sign in (1.0, -1.0)]
    return dalpha - xi * (h[0] - h[1]) / (2 * eps)


def fbnet(s, x, y, noise: torch.Generator) -> torch.Tensor:
    """FBNet's loss CE·a·log(cost/unit)^b at the Gumbel-softmax weights the step draws from `noise` (a copy of the
    search's path generator, taken before the step), differentiated in α."""
    rem, cfg = s.state.remaining, s.cfg
    u = torch.rand(s.state.alpha.shape, generator=noise).clamp(1e-10, 1 - 1e-10).double()
    tau = cfg.fbnet_temperature * math.exp(-cfg.fbnet_temperature_decay * s.epoch())
    a = s.state.alpha.detach().double().requires_grad_()
    w = softmax64((a - torch.log(-torch.log(u))) / tau, rem)
    oracle = GatedSupernet.from_engine(s.model)
    unit = min(1.0, s.cost.floor() / 10)
    cost = (s.cost.fixed + (w * s.cost.table.double()).sum()) / unit
    return torch.autograd.grad(oracle.loss(x, y, w, rem) * cfg.fbnet_a * torch.log(cost) ** cfg.fbnet_b, a)[0]


def hmnas(s, x, y) -> torch.Tensor:
    """d/d(α, mask scores) of the held-out loss at w = softmax(α) ⊙ b, b = 1[score ≥ θ] (and each block's
    top-scored remaining path on), through b by the straight-through estimator written out: b's gradient is the
    scores'. Stacked as the engine stacks them."""
    rem, theta = s.state.remaining, s.cfg.hmnas_mask_threshold
    scores = s.state.mask_scores.detach().double()
    on = (scores >= theta) & rem
    on[torch.arange(on.shape[0]), scores.masked_fill(~rem, float("-inf")).argmax(1)] = True
    a = s.state.alpha.detach().double().requires_grad_()
    b = on.double().requires_grad_()
    w = softmax64(a, rem) * b
    loss = GatedSupernet.from_engine(s.model).loss(x, y, w, rem) + _cost_term(s, w)
    da, db = torch.autograd.grad(loss, [a, b])
    return torch.cat([da, db])


def gdas(s, x, y, noise: torch.Generator) -> torch.Tensor:
    """GDAS's estimator at the Gumbel sample the step draws from `noise`: soft = softmax((α + g)/τ), k its argmax;
    the held-out loss's gradient in the straight-through weights h written out from the oracle: for the chosen
    candidate its gate gradient at the one-hot gates of k, for every other remaining one the sum of the block
    output's gradient (a scalar shift's), plus β·cost; then through soft to α."""
    rem, cfg = s.state.remaining, s.cfg
    u = torch.rand(s.state.alpha.shape, generator=noise).clamp(1e-10, 1 - 1e-10).double()
    tau = cfg.gdas_tau_max - (cfg.gdas_tau_max - cfg.gdas_tau_min) * s.epoch() / max(cfg.epochs - 1, 1)
    a = s.state.alpha.detach().double().requires_grad_()
    soft = softmax64((a - torch.log(-torch.log(u))) / tau, rem)
    arch = soft.detach().argmax(1).tolist()
    oracle = GatedSupernet.from_engine(s.model)
    gates = oracle.one_hot_gates(arch).requires_grad_()
    shifts = torch.zeros(len(arch), dtype=torch.float64, requires_grad=True)
    dgates, dshifts = torch.autograd.grad(oracle.loss(x, y, gates, rem, shifts), [gates, shifts])
    dh = torch.where(gates.detach().bool(), dgates, dshifts[:, None].expand_as(dgates)) * rem
    dh = dh + s.beta * s.cost.table.double() * rem
    return torch.autograd.grad((dh * soft).sum(), a)[0]


CHECKS: Dict[str, tuple] = {
    # name: (search settings, oracle)
    "darts first order": (dict(strategy="darts", beta=0.05), darts_first_order),
    "darts second order": (dict(strategy="darts", darts_order=2, momentum=0.0, weight_decay=1e-3, beta=0.05),
                           darts_second_order),
    "fbnet": (dict(strategy="fbnet"), fbnet),
    # P-DARTS after a stage's end (4 paths kept per block), in its first stage's last epoch (skip dropout 0 there)
    "pdarts": (dict(strategy="pdarts", epochs=3, warmup_epochs=0, beta=0.05, keep=4), darts_first_order),
    "dartsplus": (dict(strategy="dartsplus", beta=0.05), darts_first_order),
    "hmnas": (dict(strategy="hmnas", beta=0.05), hmnas),
    "gdas": (dict(strategy="gdas", beta=0.05, gdas_tau_max=2.0, gdas_tau_min=0.5), gdas),
}


def rem_rows(s) -> int:
    return s.state.remaining.shape[0]


def check(name: str, out, dtype=torch.float64) -> dict:
    """The engine's α gradient of check `name` against the oracle's: {"error": relative error, "scale": the
    oracle's largest entry}."""
    settings, oracle = CHECKS[name]
    s, x, y = prepared(out, dtype=dtype, **settings)
    noise = torch.Generator()
    noise.set_state(s.path_gen.get_state())
    got, _, _ = s.arch_grad(x, y)
    want = oracle(s, x, y, noise) if oracle in (fbnet, gdas) else oracle(s, x, y)
    rem = s.state.remaining.repeat(got.shape[0] // rem_rows(s), 1)
    return {"error": relative_error(got, want, rem), "scale": float(want.abs().max()),
            "engine": got, "oracle": want, "search": s}


__all__ = ["CHECKS", "check", "prepared", "relative_error", "softmax64"]
