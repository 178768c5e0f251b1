"""The agreement measure of benchmarks/strategy_null.py on choices whose answer is known: seeds that all agree,
seeds that never do, and the identity path's share against its chance."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from strategy_null import spread  # noqa: E402


def run(seed, choices, forced=None, drops=0):
    return {"seed": seed, "choices": choices, "candidates_per_block": [6, 7, 7], "skip_column": 6,
            "skip_legal": [False, True, True], "val_acc": 0.5, "mflops": 1.0, "forced_drops": forced, "drops": drops,
            "stopped": None}


def test_agreement_is_one_when_every_seed_chooses_alike_and_zero_when_none_do():
    same = spread([run(s, [1, 6, 2]) for s in range(4)])
    assert same["pair_agreement"] == 1.0 and same["modal_share_per_block"] == [1.0, 1.0, 1.0]
    assert same["identity_share_of_skip_legal"] == 0.5  # one of the two skip-legal blocks chose the identity
    apart = spread([run(s, [s, s, s]) for s in range(4)])
    assert apart["pair_agreement"] == 0.0 and apart["modal_share_per_block"] == [0.25] * 3
    assert apart["chance"] == pytest.approx((1 / 6 + 2 / 7) / 3, abs=1e-4)
    assert apart["identity_chance"] == pytest.approx(1 / 7, abs=1e-4)


def test_half_agreement_and_the_drops_beyond_the_schedule():
    r = spread([run(0, [1, 2, 3], 10, 10), run(1, [1, 4, 4], 10, 11), run(2, [0, 5, 3], 10, 10)])
    # block 0: 1 of 3 pairs alike, block 1: 0 of 3, block 2: 1 of 3
    assert r["pair_agreement_per_block"] == pytest.approx([1 / 3, 0, 1 / 3])
    assert r["drops_beyond_schedule"] == [0, 1, 0]
