"""Drops must come from the data, not from noise.

With Adam at β1 = 0 every α step moves α by about ±lr whatever the gradient's size, so under pure noise
α random-walks by about lr·sqrt(α steps). These null tests feed searches that have nothing to learn
through the engine's own α pipeline (Eq. 4 -> Adam -> re-centre -> drop) with the demo's defaults and
count the drops. The old demo defaults serve as the positive control: the same harness must catch them.
"""
import warnings

import pytest
import torch

from betanas_fast.search import ArchState, Search, SearchConfig, make_strategy
from betanas_fast.search.config import alpha_walk, check_noise_floor


def demo_search(tmp_path, **kw):
    return Search(SearchConfig(out=str(tmp_path / "run"), progress=False, plots=False, tensorboard=False, **kw))


def drops_under_noise(cfg: SearchConfig, alpha_steps: int, allowed, seed: int) -> int:
    """Zero-mean gate gradients of a random scale each step through ArchState.step and the strategy's drop."""
    st = ArchState(allowed, lr=cfg.arch_lr, betas=(cfg.arch_beta1, cfg.arch_beta2), eps=cfg.arch_eps)
    strategy = make_strategy(cfg)
    g = torch.Generator().manual_seed(seed)
    shape = st.alpha.shape
    for step in range(1, alpha_steps + 1):
        scale = float(torch.empty(()).log_normal_(0, 1, generator=g))
        gate = torch.randn(shape, generator=g) * scale
        st.step(gate, torch.zeros(shape), 0.0)
        strategy.after_alpha_step(st, step)
    return len(st.drops)


def test_demo_defaults_keep_noise_below_the_threshold(tmp_path):
    s = demo_search(tmp_path)
    cfg = s.cfg
    assert alpha_walk(cfg, s.alpha_steps) <= abs(cfg.drop_threshold) / 2
    allowed = s.space.allowed_mask()
    drops = [drops_under_noise(cfg, s.alpha_steps, allowed, seed) for seed in range(5)]
    assert max(drops) <= 2, drops
    # Positive control: the previous demo defaults (lr 1e-2, threshold -0.25, 750 α steps) drop many.
    old = SearchConfig(arch_lr=1e-2, drop_threshold=-0.25)
    old_drops = [drops_under_noise(old, 750, allowed, seed) for seed in range(3)]
    assert min(old_drops) >= 10, old_drops


def test_config_check_warns_when_noise_reaches_the_threshold():
    with pytest.warns(UserWarning, match=r"lr·sqrt\(steps\) = 0\.274"):
        check_noise_floor(SearchConfig(arch_lr=1e-2, drop_threshold=-0.25), 750)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_noise_floor(SearchConfig(arch_lr=1e-3, drop_threshold=-0.5), 19_000)   # the ImageNet preset
        check_noise_floor(SearchConfig(strategy="proxyless", arch_lr=1e-2), 750)  # nothing is dropped


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_on_random_labels_drops_almost_nothing(tmp_path, seed):
    """A whole search with the demo's α schedule on digits whose labels are permuted: nothing is
    learnable, the cost term is off, so (almost) nothing may be dropped."""
    s = demo_search(tmp_path, seed=seed, beta=0.0, threads=2)
    g = torch.Generator().manual_seed(100 + seed)
    for split in (s.data.train, s.data.heldout, s.data.val):
        split.labels = split.labels[torch.randperm(len(split.labels), generator=g)]
    res = s.run()
    drops = sum(len(b["dropped"]) for b in res["blocks"])
    assert drops <= 2, [(b["block"], b["dropped"]) for b in res["blocks"] if b["dropped"]]
    assert res["val_acc"] < 0.3   # the labels really carried nothing (chance is 0.1)
