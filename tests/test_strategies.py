"""The strategy classes as the engine's seams, and SPOS's evolution as ALGORITHM.md fixes it."""
import itertools
import json
import os

import pytest
import torch

from betanas_fast.search import STRATEGIES, ArchState, Search, Strategy
from betanas_fast.search.evolution import evolution_search

from common import built, read_history, resumed_equals_uninterrupted, tiny


def test_strategy_table():
    assert set(STRATEGIES) == {"betanas", "proxyless", "spos", "random", "darts", "fbnet", "pdarts", "dartsplus",
                               "hmnas", "gdas", "enas"}
    traits = {n: (c.trains_weights, c.trains_alpha, c.drops_paths, c.mixture) for n, c in STRATEGIES.items()}
    assert traits == {"betanas": (True, True, True, False), "proxyless": (True, True, False, False),
                      "spos": (True, False, False, False), "random": (False, False, False, False),
                      "darts": (True, True, False, True), "fbnet": (True, True, False, True),
                      "pdarts": (True, True, False, True), "dartsplus": (True, True, False, True),
                      "hmnas": (True, True, False, True), "gdas": (True, True, False, False),
                      "enas": (True, True, False, False)}


def test_engine_runs_a_strategy_it_does_not_know(tmp_path, monkeypatch):
    """A new strategy is one subclass overriding one hook; the loop picks it up by name."""

    class FirstPathOnly(Strategy):
        name = "first-path"
        trains_alpha = True

        def sample_phase1(self, state, generator, batch_size, per_sample):
            return [int(state.remaining[l].nonzero()[0]) for l in range(state.num_blocks)]

    monkeypatch.setitem(STRATEGIES, "first-path", FirstPathOnly)
    res = Search(tiny(tmp_path, strategy="first-path", epochs=1, warmup_epochs=0)).run()
    hist = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert res is not None and len(hist) > 0
    s = built(tmp_path / "again", strategy="first-path", epochs=1, warmup_epochs=0)
    for _ in range(3):
        s._iteration()
    counts = s.state.phase1_counts
    assert (counts[:, 0] == 6).all() and counts[:, 1:].sum() == 0   # 3 iterations x 2 Phase-1 steps
    assert s.state.phase2_counts.sum() == 3 * s.space.num_blocks       # α steps ran (trains_alpha)
    assert s.state.remaining.equal(s.state.allowed)                    # and nothing dropped (no drop hook)


def test_betanas_drops_and_proxyless_does_not(tmp_path):
    for name, drops in (("betanas", True), ("proxyless", False)):
        s = built(tmp_path / name, strategy=name)
        with torch.no_grad():
            s.state.alpha[0, 1] = -5.0
        made = s.strategy.after_alpha_step(s.state, step=3)
        assert bool(made) == drops and bool(s.state.remaining[0, 1]) != drops


# --- SPOS's evolution ------------------------------------------------------------------------------------------
def _space(blocks=6, paths=5):
    return torch.ones(blocks, paths, dtype=torch.bool)


def test_evolution_follows_spos():
    allowed = _space()
    cost = lambda a: float(sum(a))  # noqa: E731
    target = [4, 0, 3, 1, 4, 2]
    score = lambda a: -float(sum(x != t for x, t in zip(a, target)))  # noqa: E731
    scored = []

    def counting_score(a):
        scored.append(tuple(a))
        return score(a)

    best, best_score, trace = evolution_search(allowed, counting_score, cost, 14.0, torch.Generator().manual_seed(0),
                                               population=50, generations=20, parents=10, mutation_prob=0.1)
    assert len(scored) == len(set(scored))                      # no duplicate children, nothing re-scored
    assert all(cost(a) <= 14.0 for a in scored)                   # every candidate under the budget
    assert len(scored) == 50 * 20 and [t[0] for t in trace] == list(range(20))
    assert cost(best) <= 14 and best_score == max(score(a) for a in scored)
    assert [t[1] for t in trace] == sorted(t[1] for t in trace)   # the best never gets worse
    # evolution beats the random initial population by a margin a random search of the same size rarely has
    assert trace[-1][1] > trace[0][1]


def test_evolution_stops_when_the_space_is_exhausted():
    allowed = _space(blocks=2, paths=3)   # 9 architectures in all
    scored = []
    best, _, trace = evolution_search(allowed, lambda a: scored.append(tuple(a)) or float(a[0]), lambda a: 0.0, None,
                                      torch.Generator().manual_seed(0), population=4, generations=10, parents=2)
    assert sorted(scored) == sorted(itertools.product(range(3), repeat=2)) and best[0] == 2
    assert len(trace) < 10


def test_spos_strategy_uses_the_config(tmp_path):
    res = Search(tiny(tmp_path, strategy="spos", epochs=1, warmup_epochs=0, spos_population=6, spos_generations=3,
                      spos_parents=2, flops_target=0.6)).run()
    assert res["mflops"] <= 0.6 and [t[0] for t in res["evolution_trace"]] == [0, 1, 2]
    assert res["evolution_trace"][-1][2] == 18


def test_spos_parents_checked():
    with pytest.raises(ValueError, match="spos_parents"):
        Search(tiny(strategy="spos", spos_population=4, spos_parents=5))


def test_arch_state_step_freezes_dropped_and_recentres():
    st = ArchState([[True] * 4, [True] * 4], lr=0.1)
    st.remaining[0, 3] = False
    with torch.no_grad():
        st.alpha[0, 3] = -2.0
    gate = torch.randn(2, 4)
    st.step(gate, torch.zeros(2, 4), 0.0)
    assert st.alpha[0, 3] == -2.0
    a = st.alpha.detach()
    assert abs(float(a[0, :3].mean())) < 1e-6 and abs(float(a[1].mean())) < 1e-6
    assert (a[0, :3] != 0).all()
    restored = ArchState([[True] * 4, [True] * 4], lr=0.1)
    restored.load_state_dict(st.state_dict())   # Adam's state travels with α
    for s_ in (st, restored):
        s_.step(gate, torch.zeros(2, 4), 0.0)
    assert torch.equal(st.alpha.detach(), restored.alpha.detach())


def test_gdas_samples_one_path_and_resumes_exactly(tmp_path):
    """GDAS: Phase 1 trains one Gumbel-max path per block per step, α moves by its straight-through gradient, the
    temperature falls linearly from --gdas-tau-max to --gdas-tau-min, and a resumed run is the uninterrupted one."""
    kw = dict(strategy="gdas", epochs=2, warmup_epochs=0, checkpoint_every=5, gdas_arch_lr=0.01)
    full = resumed_equals_uninterrupted(tmp_path, 12, **kw)
    history = read_history(full.out)
    assert (full.state.phase1_counts.sum(1) == full.phase1_steps).all()  # one path per block per step
    assert (full.state.phase2_counts.sum(1) == full.alpha_steps).all()   # and one sampled sub-net per α step
    assert [history[0]["temperature"], history[-1]["temperature"]] == pytest.approx([10.0, 0.1])
    assert full.state.alpha.detach().abs().max() > 1e-3
    with pytest.raises(ValueError, match="samples one sub-net per step"):
        Search(tiny(tmp_path / "bad", strategy="gdas", path_sampling="per-sample"))


def test_enas_reinforce_finds_a_known_optimum_and_its_sign_is_right():
    """The controller and its REINFORCE update on a toy reward with a known optimum, the fraction of blocks that
    choose a planted path: the controller's most likely architecture becomes the planted one. With the reward
    negated the planted paths become the least likely: the sign convention is the reference's (a reward above the
    baseline makes the sample more likely)."""
    from betanas_fast.search.controller import Controller, Reinforce
    remaining = torch.ones(5, 7, dtype=torch.bool)
    remaining[0, 6] = remaining[3, 6] = False
    planted = [2, 5, 0, 3, 6]
    for sign in (1.0, -1.0):
        torch.manual_seed(0)
        # (3x the reference's learning rate and a faster baseline, so that 1000 steps suffice)
        policy = Reinforce(Controller(5, 7), lr=3e-3, entropy_weight=1e-4, baseline_decay=0.9)
        g = torch.Generator().manual_seed(1)
        for _ in range(1000):
            arch, log_prob, entropy, _ = policy.controller(remaining, g)
            policy.step(log_prob, entropy, sign * sum(a == b for a, b in zip(arch, planted)) / 5)
        with torch.no_grad():
            greedy, _, entropy, logits = policy.controller(remaining, greedy=True)
        if sign > 0:
            assert greedy == planted and float(entropy) < 5 * 1.5
        else:
            probs = torch.softmax(logits, 1)
            assert all(probs[l, m] < 0.05 for l, m in enumerate(planted))


def test_enas_runs_derives_and_resumes_exactly(tmp_path):
    kw = dict(strategy="enas", epochs=2, warmup_epochs=0, checkpoint_every=5, enas_derive_samples=4)
    full = resumed_equals_uninterrupted(tmp_path, 12, **kw)
    history = read_history(full.out)
    summary = json.load(open(os.path.join(full.out, "arch.json")))
    assert history[-1]["controller"]["baseline"] != 0
    assert 1 <= len(summary["derived_from"]) <= 4
    assert summary["heldout_acc"] == max(d["heldout_acc"] for d in summary["derived_from"])
    assert summary["choices"] in [d["arch"] for d in summary["derived_from"]]
    assert (full.state.phase2_counts.sum(1) == full.alpha_steps).all()
