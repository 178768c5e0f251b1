"""The studies: their statistics against scipy and known answers, the MACs-matched sampler, the command lines
passed to sub-runs, and a tiny end-to-end run of each study (deterministic, continued without redoing
finished sub-runs, the same numbers with --jobs 2)."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from scipy import stats as sps

from betanas_fast import cost as cost_model
from betanas_fast.search import SearchConfig
from betanas_fast.search.config import parse_config as parse_search
from betanas_fast.space import sample_within_budget
from betanas_fast.space import build_space
from betanas_fast import stats
from betanas_fast.study import common, main
from betanas_fast.study.seeds import sample_matched
from betanas_fast.train import TrainConfig
from betanas_fast.train import parse_config as parse_train


# --- statistics ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, levels", [(2, 2), (4, 3), (7, 3), (12, 4), (30, 6), (30, 1000)])
def test_kendall_tau_b_matches_scipy_with_ties(n, levels):
    rng = np.random.default_rng(n * levels)
    for _ in range(20):
        x, y = rng.integers(0, levels, n), rng.integers(0, levels, n)
        expected = sps.kendalltau(x, y, variant="b").statistic
        got = stats.kendall_tau_b(x, y)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_kendall_tau_b_extremes():
    assert stats.kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert stats.kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert math.isnan(stats.kendall_tau_b([1, 1, 1], [1, 2, 3]))  # one ranking all ties: undefined, as scipy
    with pytest.raises(ValueError):
        stats.kendall_tau_b([1, 2], [1, 2, 3])


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    data = np.random.default_rng(0).normal(5.0, 1.0, 200)
    iv = stats.bootstrap_interval(lambda idx: data[idx].mean(), len(data), resamples=4000, seed=3)
    assert iv == stats.bootstrap_interval(lambda idx: data[idx].mean(), len(data), resamples=4000, seed=3)
    se = data.std(ddof=1) / math.sqrt(len(data))
    assert iv.low < data.mean() < iv.high
    assert (iv.high - iv.low) == pytest.approx(2 * 1.96 * se, rel=0.15)
    const = stats.bootstrap_interval(lambda idx: 0.5, 3, resamples=100)
    assert (const.low, const.high, const.undefined) == (0.5, 0.5, 0)
    nan = stats.bootstrap_interval(lambda idx: float("nan"), 3, resamples=10)
    assert nan.undefined == 10 and math.isnan(nan.low)


def test_two_sample_tests_known_answers():
    hi, lo = [5, 6, 7, 8], [1, 2, 3, 4]
    # complete separation: only 1 of the C(8, 4) = 70 labellings is as extreme
    for test in (stats.mann_whitney_greater, stats.permutation_greater):
        assert test(hi, lo).p_value == pytest.approx(1 / 70)
        assert test(lo, hi).p_value == 1.0
        assert test(hi, lo).method == "exact"
    assert stats.mann_whitney_greater(hi, lo).statistic == 16
    assert stats.permutation_greater(hi, lo).statistic == 4.0
    # identical samples: every labelling is as extreme as the observed one
    assert stats.mann_whitney_greater([1, 1, 1], [1, 1, 1]).p_value == 1.0


@pytest.mark.parametrize("n, m", [(3, 3), (4, 6), (8, 8), (5, 9)])
def test_mann_whitney_matches_scipy_exact(n, m):
    rng = np.random.default_rng(n * 100 + m)
    for shift in (0.0, 0.7, 2.0):
        a, b = rng.normal(shift, 1, n), rng.normal(0, 1, m)
        expected = sps.mannwhitneyu(a, b, alternative="greater", method="exact")
        got = stats.mann_whitney_greater(a, b)
        assert got.statistic == expected.statistic
        assert got.p_value == pytest.approx(expected.pvalue, abs=1e-12)


def test_tests_with_ties_match_scipy_permutation_test():
    """With ties, both tests are exact permutation tests conditional on the pooled values: scipy's
    permutation_test over every relabelling is the oracle."""
    rng = np.random.default_rng(7)
    for _ in range(5):
        a, b = rng.integers(0, 4, 6).astype(float), rng.integers(0, 4, 7).astype(float)

        def u(x, y):  # Mann–Whitney U, ties counted half
            d = np.subtract.outer(x, y)
            return (d > 0).sum() + 0.5 * (d == 0).sum()

        for ours, statistic in ((stats.mann_whitney_greater, u), (stats.permutation_greater,
                                                                 lambda x, y: np.mean(x) - np.mean(y))):
            ref = sps.permutation_test((a, b), statistic, permutation_type="independent", alternative="greater",
                                       n_resamples=np.inf, vectorized=False)
            assert ours(a, b).p_value == pytest.approx(ref.pvalue, abs=1e-9)


def test_monte_carlo_beyond_the_exact_limit_is_seeded_and_sound():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.5, 1, 16), rng.normal(0, 1, 16)  # C(32, 16) labellings: Monte Carlo
    r = stats.permutation_greater(a, b, seed=4)
    assert r.method.startswith("monte carlo") and r == stats.permutation_greater(a, b, seed=4)
    assert r.p_value < 1e-3
    null = [stats.mann_whitney_greater(rng.normal(0, 1, 16), rng.normal(0, 1, 16)).p_value for _ in range(3)]
    assert all(0.0 < p <= 1.0 for p in null)
    asymptotic = sps.mannwhitneyu(a, b, alternative="greater", method="asymptotic").pvalue
    assert stats.mann_whitney_greater(a, b).p_value == pytest.approx(asymptotic, abs=2e-3)


def test_mean_std():
    assert stats.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert stats.mean_std([4.0]) == (4.0, 0.0)


# --- the MACs-matched sampler -------------------------------------------------------------------------------------
def test_sampler_meets_its_tolerance_distinct_and_seeded():
    space = build_space("demo")
    median = cost_model.arch_cost(space, [1, 0, 3, 6, 2, 5, 0, 1]).mflops
    archs = sample_matched(space, 8, median, 0.02, seed=11)
    assert archs == sample_matched(space, 8, median, 0.02, seed=11)
    assert len({tuple(a) for a in archs}) == 8
    for a in archs:
        space.check_arch(a)
        assert abs(cost_model.arch_cost(space, a).mflops / median - 1) <= 0.02
    tight = sample_matched(space, 3, median, 0.002, seed=11)
    assert all(abs(cost_model.arch_cost(space, a).mflops / median - 1) <= 0.002 for a in tight)
    allowed = torch.tensor(space.allowed_mask())
    with pytest.raises(RuntimeError, match="no architecture of cost in"):  # no net is that large
        sample_within_budget(allowed, torch.Generator().manual_seed(0), lambda a: 1.0, 3.0, tries=50, floor=2.0)


# --- command lines --------------------------------------------------------------------------------------------------
def test_sub_run_command_lines_round_trip():
    s = SearchConfig(strategy="spos", stage_depths=[1, 1, 0, 0], candidates=["mb_k3_e1", "mb_k7_e6"], lr=0.05,
                     label_smoothing=0.1, augment=False, deterministic=True, out="runs/x", threads=1, epochs=7)
    assert parse_search(common.to_argv(s)) == s
    t = TrainConfig(arch=["runs/x/arch.json"], epochs=3, dropout=0.0, nesterov=False, lr=0.025, out="runs/y", seed=2)
    assert parse_train(common.to_argv(t)) == t


def test_flags_the_study_sets_are_refused():
    with pytest.raises(ValueError, match="--seed in the search flags"):
        common.search_config("--epochs 3 --seed 4", ("seed", "out"))
    with pytest.raises(ValueError, match="--out in the train flags"):
        common.train_config("--out=somewhere", ("arch", "out"))
    assert common.search_config("--epochs 3", ("seed",)).epochs == 3


# --- tiny end-to-end runs -------------------------------------------------------------------------------------------
TINY_SEARCH = ("--stage-depths 1 2 1 1 --heldout 64 --val 64 --batch-size 32 --heldout-batch-size 32 --epochs 2 "
               "--warmup-epochs 1 --no-tensorboard --no-plots --bn-recalib-batches 1")
TINY_TRAIN = "--epochs 1 --no-tensorboard"


@pytest.fixture(autouse=True)
def process_settings_restored():
    """The in-process sub-runs set torch's threads and determinism for the process (as a search does): put them
    back for the tests that follow."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def study_json(out):
    with open(os.path.join(out, "study.json")) as f:
        return json.load(f)


def numbers(result: dict) -> dict:
    """study.json without what may differ between two runs of the same command: nothing but the output path."""
    return {k: v for k, v in result.items() if k != "config"} | {"config": dict(result["config"], out=None)}


def forbid_sub_runs(monkeypatch):
    def fail(self):
        raise AssertionError(f"finished sub-run {self.name} was run again")
    monkeypatch.setattr(common.SubRun, "run_here", fail)


@pytest.mark.slow
def test_balance_study_end_to_end(tmp_path, monkeypatch, capsys):
    argv = ["balance", "--threads", "1", "--no-progress", f"--search-flags={TINY_SEARCH}"]
    main(argv + ["--out", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert "claim: betanas trains every remaining path" in out and "claim: proxyless" in out
    r = study_json(tmp_path / "a")
    assert set(r["strategies"]) == {"betanas", "proxyless"} and r["versions"]["torch"] == torch.__version__
    for name, s in r["strategies"].items():
        for window in ("whole_run", "after_warmup"):
            summary, blocks = s[window]["summary"], s[window]["per_block"]
            assert summary["mean_max_over_mean"] == pytest.approx(np.mean([b["max_over_mean"] for b in blocks]))
            assert summary["blocks"] == 5
        # one path per block per Phase-1 step: each block's counts over all its paths (the run's last record) sum
        # to the Phase-1 steps; the study reports those of the remaining paths, so they sum to the steps in a
        # block that dropped nothing and to the steps less the dropped paths' (warm-up-trained, > 0) counts in one
        # that did
        run_dir = tmp_path / "a" / r["runs"][name]
        full = np.array(common.read_history(str(run_dir))[-1]["phase1_counts"])
        searched = json.load(open(run_dir / "arch.json"))
        names = searched["candidates"]
        assert s["paths_dropped"] == sum(len(b["dropped"]) for b in searched["blocks"])
        for l, b in enumerate(s["whole_run"]["per_block"]):
            remaining = [names.index(n) for n in s["remaining"][l]]
            dropped = [names.index(d["op"]) for d in searched["blocks"][l]["dropped"]]
            assert full[l].sum() == s["phase1_steps"] and b["counts"] == full[l, remaining].tolist()
            assert not set(dropped) & set(remaining) and all(full[l, d] > 0 for d in dropped)
            assert sum(b["counts"]) == s["phase1_steps"] - sum(full[l, d] for d in dropped)
            if name == "betanas":  # its cycles train every remaining path
                assert min(b["counts"]) > 0
    # betanas's shuffled cycles: remaining paths differ by at most one step per block
    assert all(max(b["counts"]) - min(b["counts"]) <= 1 for b in r["strategies"]["betanas"]["whole_run"]["per_block"])
    for png in ("balance.png", "balance_counts.png"):
        assert os.path.getsize(tmp_path / "a" / png) > 10_000
    # the same command again: nothing is recomputed, the numbers are the same
    forbid_sub_runs(monkeypatch)
    main(argv + ["--out", str(tmp_path / "a")])
    assert study_json(tmp_path / "a") == r
    # ... and options of the analysis only may change: the figures and the claims are recomputed
    main(argv + ["--out", str(tmp_path / "a"), "--blocks", "2", "4", "--fair-share-factor", "1.01"])
    again = study_json(tmp_path / "a")
    assert again["config"]["blocks"] == [2, 4] and again["fair_share_factor"] == 1.01
    assert again["strategies"]["proxyless"]["whole_run"]["per_block"] == \
        r["strategies"]["proxyless"]["whole_run"]["per_block"]
    monkeypatch.undo()
    # as two processes (--jobs 2, one thread each): the same numbers
    main(argv + ["--out", str(tmp_path / "b"), "--jobs", "2"])
    assert numbers(study_json(tmp_path / "b")) == numbers(dict(r, config=dict(r["config"], jobs=2)))
    assert os.path.exists(tmp_path / "b" / "betanas" / common.SUBRUN_LOG)
    # a continued study with other settings is refused
    with pytest.raises(SystemExit, match="other settings"):
        main(argv[:-1] + ["--search-flags=--epochs 3", "--out", str(tmp_path / "a")])


@pytest.mark.slow
def test_seeds_study_end_to_end_deterministic_and_continued(tmp_path, monkeypatch, capsys):
    argv = ["seeds", "--seeds", "2", "--threads", "1", "--no-progress", f"--search-flags={TINY_SEARCH}",
            f"--train-flags={TINY_TRAIN}"]
    main(argv + ["--out", str(tmp_path / "a")])
    r = study_json(tmp_path / "a")
    m = r["matching"]
    assert m["reached"] <= m["tolerance"] == 0.02
    assert all(abs(x["mflops"] / m["median_mflops"] - 1) <= 0.02 for x in r["random"])
    assert m["median_mflops"] == pytest.approx(np.median([x["mflops"] for x in r["searched"]]))
    assert len(r["searched"]) == len(r["random"]) == 2
    a, b = [x["top1"] for x in r["searched"]], [x["top1"] for x in r["random"]]
    assert r["tests"]["mann_whitney"]["p_value"] == stats.mann_whitney_greater(a, b).p_value
    assert r["summary"]["searched"]["top1_mean"] == pytest.approx(np.mean(a))
    assert os.path.getsize(tmp_path / "a" / "seeds.png") > 10_000
    # every retraining is scored on the digits' fixed test split, which none of the searches loaded
    from betanas_fast.data.digits import load_digits_data, load_digits_test
    from betanas_fast.train import load_data
    test = set(load_digits_test().indices.tolist())
    assert r["scoring"] == {"split": "test", "images": 300} and "test split" in capsys.readouterr().out
    for x in r["searched"] + r["random"]:
        run = tmp_path / "a" / x["run"]
        cfg, res = (json.load(open(run / name)) for name in ("config.json", "result.json"))
        assert (cfg["score_split"], res["score_split"], res["scored_images"]) == ("test", "test", 300)
        assert res["last"]["test_top1"] == x["top1"]
        d = load_data(TrainConfig(**cfg), build_space("demo"))
        train, scored = d.train, d.scored
        assert set(scored.indices.tolist()) == test and not test & set(train.indices.tolist())
    for seed in r["search_seeds"]:
        cfg = json.load(open(tmp_path / "a" / f"search-{seed}" / "config.json"))
        d = load_digits_data(seed=cfg["seed"], heldout=cfg["heldout"], val=cfg["val"])
        assert not test & set(torch.cat([d.train.indices, d.heldout.indices, d.val.indices]).tolist())
    # the same command in another directory: identical numbers
    main(argv + ["--out", str(tmp_path / "b")])
    assert numbers(study_json(tmp_path / "b")) == numbers(r)
    # a retraining killed before its result: only it runs again, to the same numbers
    os.remove(tmp_path / "b" / "train-random-1" / "result.json")
    ran = []
    run_here = common.SubRun.run_here
    monkeypatch.setattr(common.SubRun, "run_here", lambda self: (ran.append(self.name), run_here(self)))
    main(argv + ["--out", str(tmp_path / "b")])
    assert ran == ["train-random-1"]
    assert numbers(study_json(tmp_path / "b")) == numbers(r)


@pytest.mark.slow
def test_sharing_study_end_to_end(tmp_path, capsys):
    main(["sharing", "--seeds", "2", "--epochs", "1", "--threads", "1", "--no-progress", "--bootstrap", "500",
          "--out", str(tmp_path / "s"), "--search-flags=--lr 0.05 --no-tensorboard --no-plots --bn-recalib-batches 1",
          "--train-flags=--no-tensorboard --dropout 0 --warmup-epochs 0"])
    out = capsys.readouterr().out
    r = study_json(tmp_path / "s")
    assert r["groups"] == ["NS", "B2", "B4"] and r["epochs"] == {"NS": 1, "B2": 2, "B4": 4}
    assert r["labels"] == ["k3e1-k3e1", "k3e1-k3e6", "k3e6-k3e1", "k3e6-k3e6"]
    assert r["candidates"]["B4"] == ["mb_k3_e1", "mb_k3_e6", "mb_k5_e3", "mb_k7_e6"]
    acc = {g: np.array(r["accuracy"][g]["per_seed"]) for g in r["groups"]}
    assert all(a.shape == (2, 4) and ((0 <= a) & (a <= 1)).all() for a in acc.values())
    for g in ("B2", "B4"):
        t = r["tau"][g]
        expected = stats.kendall_tau_b(acc[g].mean(0), acc["NS"].mean(0))
        assert t["tau"] == pytest.approx(expected) or (t["tau"] is None and math.isnan(expected))
        assert f"Kendall τ-b({g}, NS)" in out
    # the supernets score exactly the study's architectures, on the images NS is scored on: the digits' test split
    # (300), which neither trains on; a supernet holds back one held-out image and no validation images
    with open(tmp_path / "s" / "B2-seed0" / "config.json") as f:
        cfg = json.load(f)
    assert (cfg["strategy"], cfg["heldout"], cfg["val"], cfg["epochs"]) == ("spos", 1, 0, 2)
    assert r["scoring"] == {"split": "test", "images": 300}
    with open(tmp_path / "s" / "NS-k3e1-k3e6-seed1" / "config.json") as f:
        assert json.load(f)["score_split"] == "test"
    # cached in the study's directory: a search's run directory is written by the search alone
    assert set(json.load(open(tmp_path / "s" / "scores" / "B4-seed1_test.json"))) == set(r["labels"])
    assert not any(f.startswith("study_scores") for f in os.listdir(tmp_path / "s" / "B4-seed1"))
    assert os.path.getsize(tmp_path / "s" / "sharing.png") > 10_000


def test_holm_adjustment_known_answers():
    from betanas_fast.study.compare import holm
    # sorted 0.01, 0.02, 0.04 -> 3x0.01 = 0.03, 2x0.02 = 0.04, 1x0.04 = 0.04 (monotone), in the input's order
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([0.001]) == [0.001]


def test_a_study_made_before_an_option_existed_continues_at_its_default(tmp_path):
    """A study directory written before an option was added lacks its key: continued when the option is given its
    default (the setting the study ran with), refused when it is given another value."""
    from betanas_fast.study import common
    from betanas_fast.study.compare import CompareConfig
    resolved = {"search": {"data": None, "dataset": "digits"}, "train": {"data": None}}
    common.StudyRun("compare", CompareConfig(out=str(tmp_path / "c"))).start(resolved)
    path = tmp_path / "c" / common.STUDY_CONFIG
    saved = json.load(open(path))
    del saved["strategy_flags"]
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="strategy_flags: saved None, given \\['darts=--epochs 1'\\]"):
        common.StudyRun("compare", CompareConfig(out=str(tmp_path / "c"),
                                                 strategy_flags=["darts=--epochs 1"])).start(resolved)
    common.StudyRun("compare", CompareConfig(out=str(tmp_path / "c"))).start(resolved)


def test_a_stopped_sub_runs_time_is_kept_and_a_continued_one_without_it_is_flagged(tmp_path, monkeypatch):
    """A sub-run stopped because another failed keeps the time it ran, added when it finishes; a sub-run continued
    from a checkpoint that no stop recorded (the study was killed) is listed as continued, its time partial."""
    from betanas_fast.runs import files
    from betanas_fast.study.compare import CompareConfig
    study = common.StudyRun("compare", CompareConfig(out=str(tmp_path / "c"), jobs=2))
    slow, failing, killed = (common.SubRun(n, "search", SearchConfig(out=str(tmp_path / "c" / n)))
                             for n in ("slow", "failing", "killed"))
    commands = {"slow": "import time; time.sleep(60)", "failing": "import time, sys; time.sleep(1); sys.exit(3)",
                "killed": "pass"}
    monkeypatch.setattr(common.SubRun, "argv", lambda self: [sys.executable, "-c", commands[self.name]])
    with pytest.raises(RuntimeError, match="sub-run failing failed \\(exit status 3\\)"):
        study.run([slow, failing])
    ran = study.timing["stopped"]["slow"]
    assert 0.5 < ran < 30 and "slow" not in study.timing
    for s in (slow, killed):  # each leaves a checkpoint behind; only "slow"'s stop was recorded
        os.makedirs(files.checkpoint_dir(s.out), exist_ok=True)
        open(os.path.join(files.checkpoint_dir(s.out), "ckpt_00000001.pt"), "w").close()
    commands["slow"] = "pass"
    monkeypatch.setattr(common.SubRun, "finished", lambda self: self.name in study.timing)
    study.run([slow, killed])
    assert study.timing["slow"] > ran and "stopped" not in study.timing
    assert study.timing["continued"] == ["killed"]
    assert json.load(open(tmp_path / "c" / common.TIMING))["continued"] == ["killed"]


@pytest.mark.parametrize("n,m", [(2, 2), (3, 3), (3, 7)])
def test_smallest_p_is_the_exact_tests_floor(n, m):
    """The floor the compare study reports is what the exact tests give for fully separated samples, and a
    sample that is not fully separated gives more."""
    rng = np.random.default_rng(n * 10 + m)
    low = rng.random(m)
    high = 1 + rng.random(n)
    floor = stats.smallest_p(n, m)
    assert stats.mann_whitney_greater(high, low).p_value == pytest.approx(floor)
    assert stats.permutation_greater(high, low).p_value == pytest.approx(floor)
    high[0] = low.min() - 1  # one of the first sample now below every value of the second
    assert stats.mann_whitney_greater(high, low).p_value > floor


@pytest.mark.slow
def test_compare_study_end_to_end_and_continued(tmp_path, monkeypatch, capsys):
    """Four policies (balanced single path, a mixture, GDAS, ENAS) x 2 seeds on one budget: every net retrained and
    scored on the digits' test split, path-epochs telling the mixture's work apart, betanas tested against each
    other strategy with Holm's adjustment; the same command again redoes nothing."""
    argv = ["compare", "--strategies", "betanas", "darts", "gdas", "enas", "--seeds", "2", "--threads", "1",
            "--no-progress", f"--search-flags={TINY_SEARCH} --enas-derive-samples 2", f"--train-flags={TINY_TRAIN}",
            "--strategy-flags", "darts=--epochs 1 --warmup-epochs 0", "--out", str(tmp_path / "c")]
    main(argv)
    r = study_json(tmp_path / "c")
    assert [(n["strategy"], n["search_seed"]) for n in r["nets"]] == [
        (s, seed) for s in ("betanas", "darts", "gdas", "enas") for seed in (0, 1)]
    assert r["scoring"] == {"split": "test", "images": 300}
    per = {n["strategy"]: n for n in r["nets"]}
    assert per["betanas"]["paths_per_step"] == 1.0 and per["gdas"]["paths_per_step"] == 1.0
    assert per["darts"]["paths_per_step"] > 5  # every remaining candidate of every block, each step
    # darts's own flags (one epoch instead of two): its path-epochs are one epoch's
    assert per["darts"]["epochs"] == 1 and per["darts"]["path_epochs"] == per["darts"]["paths_per_step"]
    assert per["betanas"]["epochs"] == 2 and per["betanas"]["path_epochs"] == 2.0
    assert all(n["search_seconds"] > 0 for n in r["nets"])
    for n in r["nets"]:
        res = json.load(open(tmp_path / "c" / n["run"] / "result.json"))
        assert res["last"]["test_top1"] == n["top1"]
    against = r["tests"]["against"]
    assert set(against) == {"darts", "gdas", "enas"}
    b = [n["top1"] for n in r["nets"] if n["strategy"] == "betanas"]
    for s, t in against.items():
        other = [n["top1"] for n in r["nets"] if n["strategy"] == s]
        assert t["mann_whitney"]["p_value"] == stats.mann_whitney_greater(b, other).p_value
    from betanas_fast.study.compare import holm
    assert [against[s]["holm_p"] for s in ("darts", "gdas", "enas")] == holm(
        [against[s]["mann_whitney"]["p_value"] for s in ("darts", "gdas", "enas")])
    # 2 against 2 nets: no exact one-sided test can go below 1 / C(4, 2); Holm over 3 comparisons triples that
    assert r["tests"]["smallest_p"] == pytest.approx(1 / 6) and r["tests"]["smallest_holm_p"] == pytest.approx(0.5)
    pool = [n["top1"] for n in r["nets"] if n["strategy"] != "betanas"]
    assert r["tests"]["pooled"]["nets"] == 6 and r["tests"]["pooled"]["smallest_p"] == pytest.approx(1 / 28)
    assert r["tests"]["pooled"]["mann_whitney"]["p_value"] == stats.mann_whitney_greater(b, pool).p_value
    assert os.path.getsize(tmp_path / "c" / "compare.png") > 10_000
    out = capsys.readouterr().out
    assert "p(betanas > it)" in out and "cannot give p below 1/C(4, 2)" in out
    forbid_sub_runs(monkeypatch)
    main(argv)
    assert numbers(study_json(tmp_path / "c")) == numbers(r)
    with pytest.raises(SystemExit, match="must hold betanas"):
        main(["compare", "--strategies", "darts", "gdas", "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="--strategy-flags darts: heldout must be the same for every strategy"):
        main(["compare", "--strategies", "betanas", "darts", "--strategy-flags", "darts=--heldout 32",
              "--out", str(tmp_path / "e")])
    # a strategy's own checks run before any sub-run: P-DARTS's three stages need three epochs
    with pytest.raises(SystemExit, match="--strategies pdarts: pdarts needs at least one epoch per stage.*"
                                         "--strategy-flags"):
        main(["compare", "--strategies", "betanas", "pdarts", f"--search-flags={TINY_SEARCH} --warmup-epochs 1",
              "--out", str(tmp_path / "g")])
    assert not os.path.exists(tmp_path / "g" / "search-betanas-0")
    with pytest.raises(SystemExit, match="expected STRATEGY=FLAGS"):
        main(["compare", "--strategies", "betanas", "darts", "--strategy-flags", "gdas=--epochs 1",
              "--out", str(tmp_path / "f")])
