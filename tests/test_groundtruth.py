"""The ground-truth table (`study groundtruth`), the supernets' ranking quality against it (`study ranking`) and
the seeds study's percentiles: their statistics against independent computations, and tiny end-to-end runs."""
import json
import os

import numpy as np
import pytest
import torch
from scipy import stats as sps

from betanas_fast import cost as cost_model
from betanas_fast import stats
from betanas_fast.space import build_space
from betanas_fast.study import main
from betanas_fast.study.groundtruth import calibration, load_table, percentile_at_flops, spread_sample
from betanas_fast.study.ranking import rank_quality


@pytest.mark.parametrize("n, levels", [(3, 2), (8, 3), (20, 5), (40, 1000)])
def test_spearman_matches_scipy_with_ties(n, levels):
    rng = np.random.default_rng(n)
    for _ in range(20):
        x, y = rng.integers(0, levels, n).astype(float), rng.integers(0, levels, n).astype(float)
        expected = sps.spearmanr(x, y).statistic
        got = stats.spearman_rho(x, y)
        assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)
    assert stats.spearman_rho([1, 2, 3], [3, 2, 1]) == -1.0 and np.isnan(stats.spearman_rho([1, 1], [1, 2]))


def test_spread_sample_covers_the_range_evenly_distinct_and_seeded():
    space = build_space("cluttered")
    archs = spread_sample(space, 12, seed=3)
    assert archs == spread_sample(space, 12, seed=3) and archs != spread_sample(space, 12, seed=4)
    assert len({tuple(a) for a in archs}) == 12
    for a in archs:
        space.check_arch(a)
    mflops = np.array([cost_model.arch_cost(space, a).mflops for a in archs])
    table = np.array(cost_model.mflops_table(space))
    allowed = np.array(space.allowed_mask())
    fixed = cost_model.arch_cost(space, archs[0]).mflops - table[np.arange(space.num_blocks), archs[0]].sum()
    low = fixed + np.where(allowed, table, np.inf).min(1).sum()
    high = fixed + np.where(allowed, table, -np.inf).max(1).sum()
    # spread over most of the space's range (the pool's extremes are rare architectures), in rising order, with
    # gaps no wider than 3x the even spacing
    assert mflops[0] < low + 0.15 * (high - low) and mflops[-1] > high - 0.15 * (high - low)
    gaps = np.diff(mflops)
    assert (gaps >= 0).all() and gaps.max() < 3 * (mflops[-1] - mflops[0]) / 11
    # positive control of the evenness check: uniform random architectures bunch in the middle
    gen = torch.Generator().manual_seed(0)
    from betanas_fast.space import sample_arch
    uniform = np.sort([cost_model.arch_cost(space, sample_arch(torch.tensor(space.allowed_mask()), gen)).mflops
                       for _ in range(12)])
    assert not (uniform[0] < low + 0.15 * (high - low) and uniform[-1] > high - 0.15 * (high - low))


def test_calibration_numbers_by_hand():
    per_seed = np.array([[0.90, 0.92], [0.80, 0.80], [0.70, 0.74], [0.60, 0.58], [0.95, 0.91]])
    c = calibration(per_seed.mean(1), per_seed, decile=0.2)
    assert c["decile_size"] == 1
    assert c["top_decile_mean"] == pytest.approx(0.93) and c["bottom_decile_mean"] == pytest.approx(0.59)
    assert c["decile_spread"] == pytest.approx(0.34) and c["best_single"] == pytest.approx(0.95)
    variances = [np.var(r, ddof=1) for r in per_seed]
    assert c["noise_std"] == pytest.approx(np.sqrt(np.mean(variances)))
    assert c["seed_abs_diff_mean"] == pytest.approx(np.mean(np.abs(per_seed[:, 0] - per_seed[:, 1])))
    assert c["seed_rank_agreement"]["kendall_tau_b"] == pytest.approx(sps.kendalltau(*per_seed.T).statistic)
    assert "noise_std" not in calibration(per_seed[:, 0], per_seed[:, :1], 0.2)


def test_percentile_at_flops():
    table = {"architectures": [{"source": "sample", "mflops": m, "top1_mean": a} for m, a in
                               [(1.0, 0.80), (1.05, 0.85), (0.95, 0.90), (2.0, 0.99), (1.1, 0.85)]]
             + [{"source": "searched", "mflops": 1.0, "top1_mean": 0.10}]}
    p = percentile_at_flops(table, 1.0, 0.85)  # neighbours 0.80, 0.85, 0.90, 0.85 (the searched one is not one)
    assert p["neighbours"] == 4 and p["percentile"] == pytest.approx(100 * (1 + 0.5 * 2) / 4)
    assert percentile_at_flops(table, 1.0, 0.95)["percentile"] == 100.0
    assert percentile_at_flops(table, 5.0, 0.95)["percentile"] is None


def test_rank_quality_intervals_contain_the_estimate_and_detect_a_ranking():
    rng = np.random.default_rng(0)
    truth = np.linspace(0.6, 0.9, 16)
    good = truth + rng.normal(0, 0.01, 16)
    r = rank_quality(good, truth, 2000, seed=0)
    assert r["kendall_tau_b"] > 0.7 and r["kendall_tau_b_interval"]["low"] > 0.4
    assert r["spearman_rho"] == pytest.approx(sps.spearmanr(good, truth).statistic)
    # a null control: an unrelated ranking's interval contains 0
    null = rank_quality(rng.permutation(good), truth, 2000, seed=0)
    assert null["kendall_tau_b_interval"]["low"] < 0 < null["kendall_tau_b_interval"]["high"]


FULL_SPACE_SEARCH = ("--heldout 64 --val 64 --batch-size 32 --heldout-batch-size 32 --epochs 2 --warmup-epochs 1 "
                     "--no-tensorboard --no-plots --bn-recalib-batches 1")
TINY_SEARCH = "--stage-depths 1 2 1 1 " + FULL_SPACE_SEARCH


@pytest.fixture(autouse=True)
def process_settings_restored():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.mark.slow
def test_groundtruth_ranking_and_seeds_percentiles_end_to_end(tmp_path, capsys):
    """On the digits (fast): a 3-architecture table of 2 seeds each, plus one searched architecture; the
    ranking of two supernets the study trains; the seeds study's percentiles against the table."""
    search = tmp_path / "one-search"
    from betanas_fast.search import Search
    from betanas_fast.search.config import parse_config
    Search(parse_config(TINY_SEARCH.split() + ["--no-progress", "--threads", "1", "--out", str(search)])).run()
    with pytest.raises(SystemExit, match="must name the data set"):
        main(["groundtruth", "--space", "demo", "--archs", "2", "--out", str(tmp_path / "x"),
              "--train-flags=--epochs 1"])
    gt = tmp_path / "gt"
    argv = ["groundtruth", "--space", "demo", "--archs", "3", "--train-seeds", "2", "--threads", "1", "--no-progress",
            "--out", str(gt), "--train-flags=--dataset digits --epochs 1 --no-tensorboard"]
    # the table's space is the demo preset; a searched net of another space (fewer blocks) is refused
    with pytest.raises(SystemExit, match="is not the demo space"):
        main(argv + ["--searched", str(search)])
    main(argv)
    table = load_table(str(gt))
    rows = table["architectures"]
    assert len(rows) == 3 and all(len(r["top1"]) == 2 for r in rows)
    for r in rows:
        for run, top1 in zip(r["runs"], r["top1"]):
            res = json.load(open(gt / run / "result.json"))
            assert res["score_split"] == "test" and res["scored_images"] == 300 and res["last"]["test_top1"] == top1
        assert r["top1_mean"] == pytest.approx(np.mean(r["top1"]))
        assert r["mflops"] == pytest.approx(cost_model.arch_cost(build_space("demo"), r["choices"]).mflops)
    assert [r["mflops"] for r in rows] == sorted(r["mflops"] for r in rows)
    c = table["calibration"]
    per_seed = np.array([r["top1"] for r in rows])
    assert c == calibration(per_seed.mean(1), per_seed, 0.1)
    assert "ground truth: 3 architectures" in capsys.readouterr().out
    assert os.path.getsize(gt / "groundtruth.png") > 5_000

    # ranking: two supernets trained by the study on the same schedule
    rk = tmp_path / "rk"
    main(["ranking", "--groundtruth", str(gt), "--strategies", "betanas", "spos", "--threads", "1", "--no-progress",
          "--bootstrap", "200", "--out", str(rk), f"--search-flags={FULL_SPACE_SEARCH} --spos-population 4 "
          "--spos-generations 1 --spos-parents 2"])
    r = json.load(open(rk / "study.json"))
    assert set(r["supernets"]) == {"betanas", "spos"}
    truth = np.array([a["top1_mean"] for a in rows])
    for name, s in r["supernets"].items():
        acc = np.array(s["inherited_top1"])
        assert len(acc) == 3 and ((0 <= acc) & (acc <= 1)).all()
        assert s["kendall_tau_b"] == stats.kendall_tau_b(acc, truth) or np.isnan(s["kendall_tau_b"])
    mflops = np.array([a["mflops"] for a in rows])
    assert r["baselines"]["mflops"]["kendall_tau_b"] == stats.kendall_tau_b(mflops, truth)
    # one inherited score by hand, with the evaluate command on the test split
    from betanas_fast.evaluate import main as evaluate
    e = evaluate([str(rk / "search-spos"), "--split", "test", "--arch", *rows[1]["arch"]])
    assert e.top1 == pytest.approx(r["supernets"]["spos"]["inherited_top1"][1]) and e.images == 300
    # a supernet of another data set is refused
    other = tmp_path / "other"
    cfg = json.load(open(search / "config.json"))
    os.makedirs(other)
    json.dump(dict(cfg, dataset="mnist-cluttered"), open(other / "config.json", "w"))
    with pytest.raises(SystemExit, match="trained on mnist-cluttered"):
        main(["ranking", "--groundtruth", str(gt), "--supernet", str(other), "--out", str(tmp_path / "rk2")])

    # the seeds study places each net in the table (of its space only)
    sd = tmp_path / "sd"
    argv = ["seeds", "--seeds", "2", "--threads", "1", "--no-progress", "--train-flags=--epochs 1 --no-tensorboard",
            "--groundtruth", str(gt)]
    with pytest.raises(SystemExit, match="the ground-truth table is of another space"):
        main(argv + ["--out", str(tmp_path / "sd-tiny"), f"--search-flags={TINY_SEARCH}"])
    main(argv + ["--out", str(sd), f"--search-flags={FULL_SPACE_SEARCH}"])
    s = json.load(open(sd / "study.json"))
    for x in s["searched"] + s["random"]:
        assert x["groundtruth_percentile"] == percentile_at_flops(table, x["mflops"], x["top1"])
    assert s["groundtruth"]["same_recipe"] is True
