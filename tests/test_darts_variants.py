"""P-DARTS, DARTS+ and HM-NAS as the engine runs them: P-DARTS's stages (the top-k kept, α started again, the
identity path's dropout, the cap on identity blocks), DARTS+'s two stopping rules and a run that stops, HM-NAS's
binarised masks and their straight-through gradient, and the stability counters every strategy logs. The α
gradients themselves are checked against the float64 oracle in tests/test_mixture.py."""
import json
import os

import pytest
import torch

from betanas_fast.nn.supernet import ChoiceBlock
from betanas_fast.search import ArchState, Search, SearchConfig
from betanas_fast.search.strategies import DARTSPlus, PDARTS, Selection, binary_masks, stage_bounds
from betanas_fast.space import build_space

from common import read_history, tiny


def test_pdarts_stages_keep_the_top_k_and_restart_alpha(tmp_path):
    s = Search(tiny(tmp_path, strategy="pdarts", epochs=3, warmup_epochs=0, pdarts_keep=[4, 2],
                    pdarts_arch_lr=0.01))
    s.run()
    history = read_history(s.out)
    allowed = torch.tensor(s.space.allowed_mask())
    # exactly the drops the schedule forces, at the two stage ends, and nothing else
    ends = [r for r in history if r["drops"]]
    assert [r["epoch"] for r in ends] == [0, 1] and [r["stage"] for r in ends] == [0, 1]
    first = {(d["block"], d["path"]) for d in ends[0]["drops"]}
    assert len(first) == int((allowed.sum(1) - 4).clamp_min(0).sum())
    assert len(ends[1]["drops"]) == 2 * s.space.num_blocks
    assert all(d["reason"] == f"end of stage {r['stage']}" for r in ends for d in r["drops"])
    assert [len(rem) for rem in history[-1]["remaining"]] == [2] * s.space.num_blocks
    # α starts again at each stage: 0 on the kept paths right after the end
    for r in ends:
        assert all(v == 0 for row in r["alpha"] for v in row if v is not None)
    # and moves again within the next stage
    assert any(v != 0 for row in history[-1]["alpha"] for v in row if v is not None)
    # the identity path's dropout: P-DARTS's rate per stage, decaying to 0 within it (stages of one epoch here)
    assert {r["stage"]: r["skip_dropout"] for r in history} == {0: 0.0, 1: 0.0, 2: 0.0}
    assert [r["stage"] for r in history] == sorted(r["stage"] for r in history)


def test_keep_top_keeps_the_largest_alpha():
    state = ArchState([[True] * 4, [True, True, False, True]])
    with torch.no_grad():
        state.alpha.copy_(torch.tensor([[0.3, -1.0, 0.3, 2.0], [-0.5, 0.1, 9.0, 0.2]]))
    made = state.keep_top(2, step=7, reason="r")
    assert state.remaining.tolist() == [[True, False, False, True], [False, True, False, True]]
    assert sorted((d["block"], d["path"]) for d in made) == [(0, 1), (0, 2), (1, 0)]  # a tie keeps the lower index
    assert all(d["step"] == 7 and d["reason"] == "r" for d in made)
    state.keep_top(0, step=8, reason="r")
    assert state.remaining.sum(1).tolist() == [1, 1]  # never a block's last path


def test_pdarts_dropout_schedule():
    cfg = SearchConfig(strategy="pdarts", epochs=30, warmup_epochs=5)
    p = PDARTS(cfg)
    assert stage_bounds(30, 3) == [0, 10, 20, 30] and [p.stage_of(e) for e in (0, 9, 10, 19, 20, 29)] == [0, 0, 1, 1, 2, 2]
    assert p.skip_dropout(0) == pytest.approx(0.1 * 0.9) and p.skip_dropout(10) == pytest.approx(0.4 * 0.9)
    assert p.skip_dropout(20) == pytest.approx(0.7 * 0.9) and p.skip_dropout(29) == 0
    # the warm-up applies to the first stage only: the weights carry over between stages
    assert [p.trains_alpha_in(e) for e in (4, 5, 10)] == [False, True, True]


@pytest.mark.parametrize("settings, message", [
    (dict(pdarts_keep=[2, 4]), "positive and decreasing"),
    (dict(pdarts_skip_dropout=[0.1, 0.4]), "one rate per stage"),
    (dict(pdarts_skip_dropout=[0.1, 0.4, 1.0]), r"in \[0, 1\)"),
    (dict(epochs=2, warmup_epochs=0), "at least one epoch per stage"),
    (dict(epochs=9, warmup_epochs=3), "must end before the first stage does"),
    (dict(strategy="fbnet", darts_order=2), "is first order"),
])
def test_pdarts_settings_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        Search(SearchConfig(**dict(dict(strategy="pdarts", epochs=9, warmup_epochs=2), **settings)))


def test_identity_dropout_in_the_mixture():
    space = build_space("demo", stage_depths=[1, 2, 1, 1], num_classes=10)
    block = ChoiceBlock(space, 2)
    skip = space.index_of("skip")
    weights = torch.zeros(space.num_candidates)
    weights[skip] = 1.0
    x = torch.rand(4, space.blocks[2].in_channels, 8, 8) + 0.5
    block.train()
    torch.manual_seed(0)
    y = block.forward_mixture(x, weights, [skip], skip_dropout=0.4)
    zeros = (y == 0).float().mean().item()
    assert 0.35 < zeros < 0.45 and torch.allclose(y[y != 0], (x / 0.6)[y != 0])
    assert torch.equal(block.forward_mixture(x, weights, [skip], skip_dropout=0.0), x)
    block.eval()
    assert torch.equal(block.forward_mixture(x, weights, [skip], skip_dropout=0.4), x)


def _state(space, alpha_rows):
    state = ArchState(space.allowed_mask())
    with torch.no_grad():
        state.alpha.copy_(torch.tensor(alpha_rows, dtype=torch.float32))
    return state


def test_pdarts_caps_identity_blocks_at_the_end():
    """Every skip-legal block's α favours the identity; with a cap of 1 all but the block whose identity is most
    likely take their best other path, the weakest first; with -1 nothing changes."""
    space = build_space("demo", stage_depths=[1, 4, 1, 1], num_classes=10)
    skip = space.index_of("skip")
    legal = [l for l, row in enumerate(space.allowed_mask()) if row[skip]]
    assert len(legal) == 3
    rows = []
    for l in range(space.num_blocks):
        row = [0.0] * space.num_candidates
        row[1] = 0.5
        if l in legal:
            row[skip] = 1.0 + legal.index(l)  # the last legal block's identity is the most likely
        rows.append(row)
    state = _state(space, rows)
    selection = Selection(score=None, cost=None, budget=None, generator=torch.Generator(), space=space)
    arch, extra = PDARTS(SearchConfig(strategy="pdarts", pdarts_max_skips=1)).select(state, selection)
    assert [l for l, m in enumerate(arch) if m == skip] == [legal[-1]]
    assert extra["skip_cap_replaced"] == legal[:-1] and all(arch[l] == 1 for l in legal[:-1])
    arch, extra = PDARTS(SearchConfig(strategy="pdarts", pdarts_max_skips=-1)).select(state, selection)
    assert [l for l, m in enumerate(arch) if m == skip] == legal and extra["skip_cap_replaced"] == []


def test_dartsplus_stopping_rules():
    space = build_space("demo", stage_depths=[1, 4, 1, 1], num_classes=10)
    skip = space.index_of("skip")
    legal = [l for l, row in enumerate(space.allowed_mask()) if row[skip]]
    strategy = DARTSPlus(SearchConfig(strategy="dartsplus", dartsplus_max_skips=2, dartsplus_stable_epochs=3))
    rows = [[0.0] * space.num_candidates for _ in range(space.num_blocks)]
    rows[legal[0]][skip] = 1.0
    state = _state(space, rows)
    assert strategy.stop_reason(state, 5, space) is None  # one identity block, nothing stable yet
    rows[legal[1]][skip] = 1.0
    state = _state(space, rows)
    assert strategy.stop_reason(state, 5, space).startswith("stage 1 of the space holds 2 identity blocks")
    rows[legal[1]][skip] = 0.0
    state = _state(space, rows)
    for moved in (True, True, True):
        state.end_epoch(alpha_moved=moved)
    assert state.argmax_stable_epochs.tolist() == [2] * space.num_blocks
    assert strategy.stop_reason(state, 5, space) is None
    state.end_epoch(alpha_moved=True)
    assert strategy.stop_reason(state, 5, space).startswith("every block's argmax unchanged for 3 epochs")
    # an epoch without α steps counts for nothing, a changed argmax starts its block again
    state.end_epoch(alpha_moved=False)
    assert state.argmax_stable_epochs.sum() == 0
    state.end_epoch(alpha_moved=True)
    with torch.no_grad():
        state.alpha[0, 3] = 5.0
    state.end_epoch(alpha_moved=True)
    assert state.argmax_stable_epochs[0] == 0 and state.argmax_stable_epochs[1] == 2
    assert state.ranking_stable_epochs[0] == 0


def _dartsplus(tmp_path, **kw):
    return tiny(tmp_path, strategy="dartsplus", epochs=6, warmup_epochs=0, darts_arch_lr=0.05,
                dartsplus_stable_epochs=1, checkpoint_every=5, **kw)


def test_dartsplus_stops_early_and_resumes_to_the_same_end(tmp_path):
    full = Search(_dartsplus(tmp_path / "full"))
    summary = full.run()
    history = read_history(full.out)
    stop = summary["stopped"]
    assert stop["epoch"] < 5 and history[-1]["step"] == stop["step"] < full.iterations
    assert history[-1]["stopped"].startswith("every block's argmax unchanged for 1 epochs")
    assert min(history[-1]["argmax_stable_epochs"]) >= 1
    assert summary["choices"] == [max(range(len(row)), key=lambda m: -1e9 if row[m] is None else row[m])
                                  for row in history[-1]["alpha"]]
    part = Search(_dartsplus(tmp_path / "part", stop_after=stop["step"] - 3))
    assert part.run() is None
    Search(SearchConfig(resume=part.out, progress=False)).run()
    for name in ("history.jsonl", "arch.json"):
        with open(os.path.join(full.out, name)) as a, open(os.path.join(part.out, name)) as b:
            assert a.read() == b.read(), name


def test_hmnas_masks_binarise_with_a_straight_through_gradient():
    state = ArchState([[True, True, True], [True, True, False]], mask_init=1e-2)
    with torch.no_grad():
        state.mask_scores.copy_(torch.tensor([[1e-2, 1e-3, 6e-3], [1e-3, 2e-3, 9.0]]))
    b = binary_masks(state, 5e-3)
    # on at or above the threshold; a block with none on keeps its top-scored remaining path (not the dropped one)
    assert b.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    (b * torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])).sum().backward()
    assert state.mask_scores.grad.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]


def test_hmnas_run_moves_masks_and_chooses_among_the_kept(tmp_path):
    s = Search(tiny(tmp_path, strategy="hmnas", epochs=2, warmup_epochs=0))
    summary = s.run()
    history = read_history(s.out)
    scores = s.state.mask_scores.detach()
    assert not torch.allclose(scores[s.state.remaining], torch.full_like(scores[s.state.remaining], 1e-2))
    masks = history[-1]["masks_on"]
    assert all(any(v for v in row if v) for row in masks)
    names = s.space.candidate_names
    for l, m in enumerate(summary["choices"]):
        assert masks[l][m] and names[m] in summary["masks_on"][l]
        kept = [k for k, v in enumerate(masks[l]) if v]
        assert m == max(kept, key=lambda k: (history[-1]["alpha"][l][k], -k))


def test_every_strategy_logs_its_choice_per_block(tmp_path):
    """Fig. 5's measure, the identity count and the stability counters, in every strategy's history."""
    for strategy in ("betanas", "spos", "darts"):
        s = Search(tiny(tmp_path / strategy, strategy=strategy, epochs=2, warmup_epochs=0, spos_population=4,
                        spos_parents=2, spos_generations=2))
        s.run()
        last = read_history(s.out)[-1]
        share = [v for row in last["phase1_weight_share"] for v in row if v is not None]
        assert sum(share) == pytest.approx(s.space.num_blocks, abs=1e-4)
        assert len(last["argmax_stable_epochs"]) == s.space.num_blocks and isinstance(last["argmax_skips"], int)
        with open(os.path.join(s.out, "arch.json")) as f:
            assert json.load(f)["skips"] == sum(s.space.candidates[m].is_skip for m in json.load(
                open(os.path.join(s.out, "arch.json")))["choices"])


@pytest.mark.parametrize("strategy", ["darts", "fbnet", "pdarts", "dartsplus", "hmnas", "gdas", "enas"])
def test_the_demo_defaults_take_every_strategy(tmp_path, strategy):
    """`python -m betanas_fast.search --strategy S` as typed: the demo's settings pass every check of S (P-DARTS's
    first stage ends after the warm-up; the mixture fits in memory)."""
    s = Search(SearchConfig(strategy=strategy, out=str(tmp_path / "run"), progress=False))
    assert s.alpha_steps > 0
    assert s.mixture_memory is None if strategy in ("gdas", "enas") else s.mixture_memory["ratio_to_one_path"] > 3
    if strategy == "pdarts":
        assert stage_bounds(s.cfg.epochs, 3)[1] > s.cfg.warmup_epochs
