"""The DARTS family on the supernet: the mixture of every remaining candidate, its memory check, and the α
gradients of darts (first and second order) and fbnet against the float64 oracle (the supernet written again from
plain torch functional ops, tests/float64_supernet.py: no op of this package), plus resume and recompute."""
import json
import os

import pytest
import torch

from betanas_fast import ops
from betanas_fast.search import Search

from common import resumed_equals_uninterrupted, tiny
from mixture_oracle import CHECKS, check, prepared, relative_error


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_alpha_gradient_matches_the_float64_oracle(tmp_path, name):
    """In float64 the engine's α gradient (mixture, loss, unrolled step, autograd) equals the oracle's to the
    float32 softmax of α; darts' second order also differs visibly from its first order at the same state, so the
    comparison could fail."""
    r = check(name, tmp_path)
    print(f"{name}: α gradient error {r['error']:.2e} of the largest entry {r['scale']:.3g}")
    assert r["error"] < 1e-5
    if name == "darts second order":
        first = check("darts first order", tmp_path / "first")
        rem = r["search"].state.remaining
        assert relative_error(first["oracle"], r["oracle"], rem) > 1e-2


def test_alpha_gradient_in_float32_is_close(tmp_path):
    """As the run computes it (float32): the same gradient within the rounding its cancellations allow."""
    r = check("darts first order", tmp_path, dtype=torch.float32)
    rem = r["search"].state.remaining
    print(f"darts first order, float32: α gradient error {r['error']:.2e}")
    assert r["error"] < 2e-2 and (r["engine"][rem].sign() == r["oracle"][rem].sign()).float().mean() > 0.9


def test_second_order_restores_the_weights_exactly(tmp_path):
    s, x, y = prepared(tmp_path, **CHECKS["darts second order"][0])
    before = [p.detach().clone() for p in s.model.parameters()]
    buffers = [b.detach().clone() for b in s.model.buffers()]
    grads = [p.grad.clone() for p in s.model.parameters() if p.grad is not None]
    s.mixture_alpha_grad(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, s.model.parameters()))
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, [p for p in s.model.parameters() if p.grad is not None]))
    assert all(torch.equal(a, b) for a, b in zip(buffers, s.model.buffers()))  # BatchNorm's statistics too


@pytest.mark.parametrize("strategy, extra", [
    ("darts", {"darts_order": 2}), ("fbnet", {}), ("hmnas", {}),
    # stopped in its second stage (epochs of 2 with dropout on the identity), after the first stage's drops and α's restart
    ("pdarts", {"epochs": 6, "stop_after": 35})])
def test_resume_equals_uninterrupted(tmp_path, strategy, extra):
    kw = dict(dict(strategy=strategy, epochs=1, warmup_epochs=0, checkpoint_every=5), **extra)
    full = resumed_equals_uninterrupted(tmp_path, kw.pop("stop_after", 12), **kw)
    history = [json.loads(ln) for ln in open(os.path.join(full.out, "history.jsonl"))]
    assert any(r["phase2_loss"] is not None for r in history)
    assert {"phase1_weight_share", "argmax_skips", "argmax_stable_epochs", "ranking_stable_epochs"} <= set(history[-1])


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


def test_gdas_estimator_is_its_codes_not_the_full_straight_through(tmp_path):
    """GDAS's unchosen weights get the sum of the block output's gradient (its code's scalar terms), not their
    candidates' gate gradients (which would need every candidate to run): the two differ, so the oracle check
    above could fail on either."""
    from float64_supernet import GatedSupernet
    r = check("gdas", tmp_path)
    s = r["search"]
    x, y = s.heldout_stream.next()  # (another batch: the difference does not hinge on one)
    x = s._on_device(x).double()
    noise = torch.Generator()
    noise.set_state(s.path_gen.get_state())
    got, _, _ = s.arch_grad(x, y)
    rem, cfg = s.state.remaining, s.cfg
    u = torch.rand(s.state.alpha.shape, generator=noise).clamp(1e-10, 1 - 1e-10).double()
    tau = cfg.gdas_tau_max - (cfg.gdas_tau_max - cfg.gdas_tau_min) * s.epoch() / max(cfg.epochs - 1, 1)
    a = s.state.alpha.detach().double().requires_grad_()
    soft = torch.softmax(((a - torch.log(-torch.log(u))) / tau).masked_fill(~rem, float("-inf")), 1)
    oracle = GatedSupernet.from_engine(s.model)
    gates = oracle.one_hot_gates(soft.detach().argmax(1).tolist()).requires_grad_()
    (dgates,) = torch.autograd.grad(oracle.loss(x, y, gates, rem), gates)
    full = torch.autograd.grad(((dgates * rem + s.beta * s.cost.table.double() * rem) * soft).sum(), a)[0]
    assert r["error"] < 1e-5 and relative_error(got, full, rem) > 1e-2
