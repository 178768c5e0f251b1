"""The DARTS family on the supernet: the mixture of every remaining candidate, its memory check, and the α
gradients of darts (first and second order) and fbnet against the float64 oracle (the supernet written again from
plain torch functional ops, tests/float64_supernet.py: no op of this package), plus resume and recompute."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from betanas_fast import ops
from betanas_fast.search import Search, SearchConfig

from common import tiny
from float64_supernet import GatedSupernet


def _prepared(tmp_path, dtype=torch.float64, **kw):
    """A tiny search of a DARTS-family strategy after three weight steps, with random α, and a held-out batch;
    the network then in `dtype`. In float64 the engine's own code (mixture, loss, unrolled step, autograd) is
    compared with the oracle free of float32 rounding, which the α gradient's cancellations amplify to about
    1e-3 of its largest entry."""
    s = Search(tiny(tmp_path, **kw))
    s._build()
    for _ in range(3):
        s.phase1_step()
    with torch.no_grad():
        s.state.alpha.copy_(torch.randn(s.state.alpha.shape, generator=torch.Generator().manual_seed(0)))
    s.model.to(dtype)
    s._last_train_batch = (s._last_train_batch[0].to(dtype), s._last_train_batch[1])
    x, y = s.heldout_stream.next()
    return s, s._on_device(x).to(dtype), y


def _softmax64(logits: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(~remaining, float("-inf")), dim=1)


def _relative_error(got: torch.Tensor, want: torch.Tensor, remaining: torch.Tensor) -> float:
    got, want = got.double()[remaining], want.double()[remaining]
    return float((got - want).abs().max() / want.abs().max())


def test_darts_first_order_alpha_gradient_matches_float64(tmp_path):
    s, x, y = _prepared(tmp_path, strategy="darts", beta=0.05)
    rem = s.state.remaining
    grad, loss, _ = s.mixture_alpha_grad(x, y)
    oracle = GatedSupernet.from_engine(s.model)
    a = s.state.alpha.detach().double().requires_grad_()
    p = _softmax64(a, rem)
    want_loss = oracle.loss(x, y, p, rem) + s.beta * (p * s.cost.table.double()).sum()
    (want,) = torch.autograd.grad(want_loss, a)
    err = _relative_error(grad, want, rem)
    print(f"darts first order: loss {float(loss):.6f} vs {float(want_loss):.6f}, α gradient error {err:.2e}")
    assert abs(float(loss) - float(want_loss)) < 1e-6 and err < 1e-5


def test_darts_first_order_in_float32_is_close(tmp_path):
    """As the run computes it (float32): the same gradient within the rounding its cancellations allow."""
    s, x, y = _prepared(tmp_path, dtype=torch.float32, strategy="darts", beta=0.05)
    rem = s.state.remaining
    grad, _, _ = s.mixture_alpha_grad(x, y)
    a = s.state.alpha.detach().double().requires_grad_()
    p = _softmax64(a, rem)
    oracle = GatedSupernet.from_engine(s.model)
    (want,) = torch.autograd.grad(oracle.loss(x, y, p, rem) + s.beta * (p * s.cost.table.double()).sum(), a)
    err = _relative_error(grad, want, rem)
    print(f"darts first order, float32: α gradient error {err:.2e}")
    assert err < 2e-2 and (grad[rem].sign() == want[rem].sign()).float().mean() > 0.9


def test_darts_second_order_matches_the_float64_oracle(tmp_path):
    """DARTS's second-order gradient computed again on the oracle: the unrolled step w' = w − ξ(∇_w L_train + weight
    decay on the convolution and linear weights, as the optimiser applies it), ∇_α L_val(w', α) and ∇_{w'} L_val by
    autograd, and the paper's finite difference at w ± ε∇_{w'} L_val. (Not the exact second derivative: ReLU6's
    kinks make ∇_α L_train jump as w moves, so the finite difference and the exact Hessian term differ on any
    ReLU network, the paper's included; the oracle follows the paper.)"""
    wd = 1e-3
    s, x, y = _prepared(tmp_path, strategy="darts", darts_order=2, momentum=0.0, weight_decay=wd, beta=0.05)
    rem = s.state.remaining
    before = [p.detach().clone() for p in s.model.parameters()]
    grad, _, _ = s.mixture_alpha_grad(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, s.model.parameters())), "the weights are restored exactly"
    xi = s.sgd.param_groups[0]["lr"]
    x_tr, y_tr = s._last_train_batch
    oracle = GatedSupernet.from_engine(s.model)
    w = oracle.tensors()
    a = s.state.alpha.detach().double().requires_grad_()
    p = _softmax64(a, rem)

    def loss_at(tensors, x, y, probs, cost=False):
        out = oracle.with_tensors(tensors).loss(x, y, probs, rem)
        return out + s.beta * (probs * s.cost.table.double()).sum() if cost else out

    w_ = [t.requires_grad_() for t in w]
    g = torch.autograd.grad(loss_at(w_, x_tr, y_tr, p.detach()), w_)
    unrolled = [(t - xi * (d + (wd * t if t.dim() > 1 else 0))).detach().requires_grad_()
                for t, d in zip(w_, g)]
    dalpha, *dw = torch.autograd.grad(loss_at(unrolled, x, y, p, cost=True), [a] + unrolled)
    eps = 0.01 / torch.cat([d.flatten() for d in dw]).norm()
    plus, minus = ([(t + sign * eps * d).detach() for t, d in zip(w_, dw)] for sign in (1.0, -1.0))
    h_plus, h_minus = (torch.autograd.grad(loss_at(ws, x_tr, y_tr, _softmax64(a, rem)), a)[0] for ws in (plus, minus))
    want = dalpha - xi * (h_plus - h_minus) / (2 * eps)
    err = _relative_error(grad, want, rem)
    # the same state's first-order gradient: the second-order term must matter here, or the check could not fail
    s1, x1, y1 = _prepared(tmp_path / "first", strategy="darts", momentum=0.0, weight_decay=wd, beta=0.05)
    first_order, _, _ = s1.mixture_alpha_grad(x1, y1)
    gap = _relative_error(first_order, want, rem)
    print(f"darts second order: α gradient error {err:.2e} (first order's distance from it {gap:.2e})")
    assert err < 1e-5
    assert gap > 1e-2, "the second-order term is visible: the comparison could fail"


def test_fbnet_alpha_gradient_matches_float64(tmp_path):
    s, x, y = _prepared(tmp_path, strategy="fbnet")
    rem = s.state.remaining
    noise = torch.Generator()
    noise.set_state(s.path_gen.get_state())  # the Gumbel noise the step draws
    grad, loss, _ = s.mixture_alpha_grad(x, y)
    u = torch.rand(s.state.alpha.shape, generator=noise).clamp(1e-10, 1 - 1e-10).double()
    tau = 5.0 * math.exp(-0.045 * s.epoch())
    a = s.state.alpha.detach().double().requires_grad_()
    w = _softmax64((a - torch.log(-torch.log(u))) / tau, rem)
    oracle = GatedSupernet.from_engine(s.model)
    unit = min(1.0, s.cost.floor() / 10)
    cost = (s.cost.fixed + (w * s.cost.table.double()).sum()) / unit
    want_loss = oracle.loss(x, y, w, rem) * 0.2 * torch.log(cost) ** 0.6
    (want,) = torch.autograd.grad(want_loss, a)
    err = _relative_error(grad, want, rem)
    print(f"fbnet: loss {float(loss):.6f} vs {float(want_loss):.6f}, α gradient error {err:.2e}")
    assert abs(float(loss) - float(want_loss)) < 1e-6 and err < 1e-5


@pytest.mark.parametrize("strategy, extra", [("darts", {"darts_order": 2}), ("fbnet", {})])
def test_resume_equals_uninterrupted(tmp_path, strategy, extra):
    kw = dict(strategy=strategy, epochs=2, warmup_epochs=1, checkpoint_every=5, **extra)
    full = Search(tiny(tmp_path / "full", **kw))
    full.run()
    part = Search(tiny(tmp_path / "part", stop_after=12, **kw))
    assert part.run() is None
    Search(SearchConfig(resume=part.out, progress=False)).run()
    for name in ("history.jsonl", "arch.json"):
        with open(os.path.join(full.out, name)) as a, open(os.path.join(part.out, name)) as b:
            assert a.read() == b.read(), name
    history = [json.loads(ln) for ln in open(os.path.join(full.out, "history.jsonl"))]
    assert any(r["phase2_loss"] is not None for r in history)
    assert {"phase1_weight_share", "argmax_skips"} <= set(history[-1])


def test_recomputing_the_candidates_changes_nothing(tmp_path):
    """--mixture-recompute keeps a block's input instead of its candidates' activations (less memory, checked
    before the run) and gives the same run."""
    kw = dict(strategy="darts", epochs=1, warmup_epochs=0)
    kept = Search(tiny(tmp_path / "kept", **kw))
    kept.run()
    recomputed = Search(tiny(tmp_path / "recomputed", mixture_recompute=True, **kw))
    recomputed.run()
    assert recomputed.mixture_memory["per_image_bytes"] < kept.mixture_memory["per_image_bytes"] / 3
    # every remaining candidate's activations: several times one path's (the "about 6x" on this space)
    assert 3 < kept.mixture_memory["ratio_to_one_path"] < 10
    a = [json.loads(ln) for ln in open(os.path.join(kept.out, "history.jsonl"))]
    b = [json.loads(ln) for ln in open(os.path.join(recomputed.out, "history.jsonl"))]
    def numbers(records, key):
        return [v for r in records for row in r[key] for v in row if v is not None]
    assert numbers(a, "alpha") == pytest.approx(numbers(b, "alpha"), abs=1e-5)
    assert [r["phase1_loss"] for r in a] == pytest.approx([r["phase1_loss"] for r in b], rel=1e-5)


def test_the_mixture_that_does_not_fit_stops_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "default_phase2_budget", lambda device, fraction=0.5: 1 << 20)
    with pytest.raises(ValueError, match=r"the mixture of every remaining candidate keeps about .* MiB of activations "
                                         r"for a batch of 32 per process .*x one path.* more than the 1.0 MiB free"):
        Search(tiny(tmp_path, strategy="darts"))
    with pytest.raises(ValueError, match="--path-sampling per-sample does not apply"):
        Search(tiny(tmp_path, strategy="fbnet", path_sampling="per-sample"))
