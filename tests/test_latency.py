"""Latency tables: BatchNorm folding, the timing statistics and stopping rule (scripted clocks, no timed
assertions), the table's checks and prediction, the expected-latency term of Eq. 6, and the search with
--cost latency. How well tables predict is measured in benchmarks/test_bench_latency.py, not here."""
import copy
import json
import os

import numpy as np
import pytest
import torch

from betanas_fast import latency as latency_cli
from betanas_fast.cost import LatencyTable, LatencyTableError, flops_cost, latency_beta, latency_cost
from betanas_fast.cost.latency import entry_key, fixed_keys, machine_mismatches, space_keys
from betanas_fast.cost.measure import Item, Protocol, converged, measure, quantile_ci, summarize
from betanas_fast.nn import MBConv, Net, fold_batchnorm
from betanas_fast.search import Search, SearchConfig
from betanas_fast.search.arch_state import ArchState
from betanas_fast.space import build_space

FAST = Protocol(warmup_runs=2, warmup_s=0.0, round_s=0.0005, min_passes=2, max_passes=3)


# --- BatchNorm folding ---------------------------------------------------------------------------------------------
def _randomise_bn(module):
    g = torch.Generator().manual_seed(3)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return module


@pytest.mark.parametrize("kernel,stride,expand,cin,cout", [(3, 1, 3, 16, 16), (5, 2, 6, 8, 24), (7, 1, 6, 12, 20)])
def test_fold_batchnorm_computes_the_same_function(kernel, stride, expand, cin, cout):
    block = _randomise_bn(MBConv(cin, cout, kernel, stride, expand)).eval()
    folded = fold_batchnorm(block)
    x = torch.randn(3, cin, 11, 11)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), block(x), rtol=1e-4, atol=1e-5)
    bns = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 1  # only the depthwise stage's, which the fused op folds itself in eval mode
    assert block.training is False and any(isinstance(m, torch.nn.BatchNorm2d) for m in block.expand)  # untouched


def test_fold_batchnorm_whole_net():
    space = build_space("demo")
    net = _randomise_bn(Net(space, [0] * space.num_blocks)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fold_batchnorm(net)(x), net(x), rtol=1e-4, atol=1e-4)


# --- statistics and the stopping rule --------------------------------------------------------------------------
def test_summary_is_robust_to_outliers():
    rng = np.random.default_rng(0)
    clean = 1.0 + 0.01 * rng.standard_normal(200)
    dirty = clean.copy()
    dirty[rng.choice(200, 12, replace=False)] = 50.0  # 6 % of the samples hit by an interrupt
    a, b = summarize(clean), summarize(dirty)
    assert abs(b["median"] - a["median"]) < 0.005  # the median barely moves ...
    assert np.mean(dirty) > 3.5  # ... where the mean is ruined
    assert b["count"] == 200 and b["mad"] < 0.02


def test_quantile_interval_covers_and_narrows():
    rng = np.random.default_rng(1)
    small, large = rng.normal(1.0, 0.05, 30), rng.normal(1.0, 0.05, 3000)
    lo_s, hi_s = quantile_ci(small)
    lo_l, hi_l = quantile_ci(large)
    assert lo_s <= np.median(small) <= hi_s and lo_l <= 1.0 <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4
    assert converged(large, 0.01) and not converged(small, 0.001)
    p10 = 1.0 + 0.05 * -1.2816  # the normal's 10th percentile
    lo, hi = quantile_ci(large, 0.1)
    assert lo < p10 < hi and hi - lo < 0.02
    assert converged(large, 0.01, q=0.1)


class ScriptedClock:
    """Each item's round returns values from its own generator: steady, noisy, or with outliers."""

    def __init__(self, behaviours):
        self.behaviours, self.rng = behaviours, np.random.default_rng(2)
        self.calls = {}

    def round(self, fn, n):
        key = fn()
        self.calls[key] = self.calls.get(key, 0) + 1
        kind, value = self.behaviours[key]
        if kind == "steady":
            return value * (1 + 0.001 * self.rng.standard_normal())
        if kind == "outliers":  # one round in ten hit by something 20x slower
            return value * (20 if self.rng.random() < 0.1 else 1 + 0.001 * self.rng.standard_normal())
        return value * (1 + 0.5 * self.rng.standard_normal() ** 2)  # noisy: never within ±1 %

    def sync(self):
        pass


def test_measure_stops_when_stable_and_ignores_outliers():
    behaviours = {"steady": ("steady", 2.0), "outliers": ("outliers", 3.0), "noisy": ("noisy", 1.0)}
    clock = ScriptedClock(behaviours)
    items = [Item(k, lambda k=k: k) for k in behaviours]
    proto = Protocol(warmup_runs=1, warmup_s=0.0, min_passes=5, max_passes=80)
    stats = measure(items, torch.device("cpu"), proto, clock=clock)
    assert stats["steady"]["converged"] and stats["steady"]["passes"] == 5  # stops at the first check
    assert stats["outliers"]["converged"] and stats["outliers"]["median"] == pytest.approx(3.0, rel=0.005)
    assert stats["outliers"]["p90"] >= stats["outliers"]["median"]
    assert not stats["noisy"]["converged"] and stats["noisy"]["passes"] == 80  # gives up at max_passes


def test_measure_rejects_duplicate_keys():
    with pytest.raises(ValueError, match="unique"):
        measure([Item("a", lambda: 0), Item("a", lambda: 0)], torch.device("cpu"), FAST)


# --- tables ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_table(tmp_path_factory):
    """A real (quickly timed) table of the demo space on this CPU."""
    space = build_space("demo")
    target = latency_cli._Target("cpu", "float32", 1, None, 1)
    table = latency_cli.build_table(space, "demo", target, FAST, calibration_archs=2, progress=False)
    path = str(tmp_path_factory.mktemp("latency") / "demo.json")
    table.save(path)
    return path


def test_table_covers_the_space_and_round_trips(demo_table):
    table = LatencyTable.load(demo_table)
    space = build_space("demo")
    assert set(table.entries) == set(space_keys(space))
    assert set(table.fixed) == set(fixed_keys(space).values())
    for stats in list(table.entries.values()) + list(table.fixed.values()):
        assert 0 < stats["p10"] <= stats["median"] <= stats["p90"] and stats["count"] >= 2
    meta = table.meta
    for k in ("device", "device_name", "torch", "kernels", "threads", "dtype", "batch", "resolution",
              "memory_format", "date", "space"):
        assert k in meta, k
    assert meta["batch"] == 1 and meta["threads"] == 1 and meta["memory_format"] == "channels_last"
    assert machine_mismatches(meta) == []
    arch = [max(i for i, ok in enumerate(b.allowed) if ok) for b in space.blocks]
    assert table.statistic == "p10"  # the default: interference only adds time (cost.latency.STATISTICS)
    want = (sum(table.fixed[k]["p10"] for k in fixed_keys(space).values())
            + sum(table.entries[entry_key(space, b, m)]["p10"] for b, m in zip(space.blocks, arch)))
    assert table.sum_ms(space, arch) == pytest.approx(want)
    assert table.predict_ms(space, arch) == pytest.approx(want + table.overhead_ms)
    assert len(table.network["calibration_archs"]) == 2


def test_table_errors_name_the_problem(demo_table, tmp_path):
    table = LatencyTable.load(demo_table)
    with pytest.raises(LatencyTableError, match=r"lacks \d+ of the \d+ entries.*mb_k\d_e\d 16>24 s2 r112"):
        table.check_space(build_space("mobile"))
    with pytest.raises(LatencyTableError, match="lacks 1 of"):
        data = json.load(open(demo_table))
        del data["entries"]["mb_k7_e6 32>40 s1 r2"]
        (tmp_path / "holed.json").write_text(json.dumps(data))
        LatencyTable.load(str(tmp_path / "holed.json")).check_space(build_space("demo"))
    for meta_change, match in [({"device_name": "Some Other CPU"}, "CPU: table 'Some Other CPU'"),
                               ({"torch": "0.0.1"}, "torch: table 0.0.1"),
                               ({"device": "cuda", "device_name": "NVIDIA H200"}, "GPU")]:
        other = copy.deepcopy(table)
        other.meta.update(meta_change)
        if meta_change.get("device") == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(LatencyTableError, match=match + ".*--latency-table-any-machine"):
            other.check_machine()
    for text, match in [("{", "not readable JSON"), ('{"format": "x"}', "not a table of this format"),
                        (json.dumps({"format": "betanas_fast.latency_table/1", "meta": {}, "entries": {"a": {}},
                                     "fixed": {}}), "no valid median")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(LatencyTableError, match=match):
            LatencyTable.load(str(tmp_path / "bad.json"))
    with pytest.raises(LatencyTableError, match="no such file"):
        LatencyTable.load(str(tmp_path / "missing.json"))


def test_cli_rejects_an_unknown_space_and_bad_settings(capsys):
    with pytest.raises(SystemExit):
        latency_cli.main(["build", "--space", "nosuchspace"])
    assert "invalid choice: 'nosuchspace'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--batch must be >= 1"):
        latency_cli.main(["build", "--batch", "0"])
    with pytest.raises(SystemExit, match="no such file"):
        latency_cli.main(["validate", "--table", "/nonexistent/table.json"])


# --- the expected-latency term of Eq. 6 -------------------------------------------------------------------------
def test_expected_latency_gradient(demo_table):
    space = build_space("demo")
    cost = latency_cost(space, LatencyTable.load(demo_table))
    st = ArchState(space.allowed_mask(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        st.alpha.copy_(torch.randn(st.alpha.shape, generator=g).masked_fill(~st.remaining, 0))
    beta = 0.7
    got = st.alpha_grad(torch.zeros_like(st.alpha), cost.table, beta)  # the cost term alone

    def expected(a):
        p = torch.softmax(a.masked_fill(~st.remaining, float("-inf")), 1)
        return beta * (p * cost.table.double()).sum()

    a0, eps = st.alpha.detach().double(), 1e-6
    fd = torch.zeros_like(a0)
    for l, m in st.remaining.nonzero().tolist():
        d = torch.zeros_like(a0)
        d[l, m] = eps
        fd[l, m] = (expected(a0 + d) - expected(a0 - d)) / (2 * eps)
    torch.testing.assert_close(got.double(), fd, rtol=1e-4, atol=1e-7)
    assert cost.expected(st.probs()) == pytest.approx(float(expected(a0)) / beta + cost.fixed, rel=1e-5)


def test_expected_latency_of_a_one_hot_alpha_is_the_table_prediction(demo_table):
    space = build_space("demo")
    table = LatencyTable.load(demo_table)
    cost = latency_cost(space, table)
    st = ArchState(space.allowed_mask(), lr=1e-3)
    arch = [max(i for i, ok in enumerate(b.allowed) if ok) for b in space.blocks]
    for l, m in enumerate(arch):  # every other path dropped: p is exactly one-hot
        for k in st.remaining_paths(l):
            if k != m:
                st.remaining[l, k] = False
    assert torch.equal(st.probs().argmax(1), torch.tensor(arch))
    assert cost.expected(st.probs()) == pytest.approx(table.predict_ms(space, arch), rel=1e-6)
    assert cost.of_arch(arch) == pytest.approx(table.predict_ms(space, arch), rel=1e-6)
    # the latency β presses as hard as the FLOPs β: the same product of β and the span
    beta = latency_beta(0.05, space, cost)
    assert beta * cost.span() == pytest.approx(0.05 * flops_cost(space).span())


# --- the search with --cost latency -----------------------------------------------------------------------------
def _cfg(tmp_path, **kw):
    base = dict(epochs=2, warmup_epochs=0, batch_size=64, heldout_batch_size=64, phase_ratio=4, progress=False,
                plots=True, tensorboard=False, out=str(tmp_path / "run"))
    base.update(kw)
    return SearchConfig(**base)


def test_search_with_latency_cost_end_to_end(demo_table, tmp_path):
    table = LatencyTable.load(demo_table)
    space = build_space("demo")
    target = table.predict_ms(space, [min(i for i, ok in enumerate(b.allowed) if ok) for b in space.blocks]) * 1.2
    summary = Search(_cfg(tmp_path, cost="latency", latency_table=demo_table, latency_target=target)).run()
    arch = space.arch_from_strings(summary["arch"])
    assert summary["cost"] == "latency"
    assert summary["latency_ms"] == pytest.approx(table.predict_ms(space, arch), rel=1e-6)
    assert summary["meets_latency_target"] == (summary["latency_ms"] <= target)
    assert sum(b["latency_ms"] for b in summary["blocks"]) == pytest.approx(
        table.predict_ms(space, arch) - table.fixed_ms(space) - table.overhead_ms, rel=1e-5)
    run = tmp_path / "run"
    assert LatencyTable.load(str(run / "latency_table.json")).entries == table.entries  # the run keeps its table
    history = [json.loads(ln) for ln in open(run / "history.jsonl") if ln.strip()]
    assert all("expected_latency_ms" in r and "expected_mflops" in r for r in history)
    betas = [r["beta"] for r in history if r["phase2_loss"] is not None]
    assert len(set(betas)) > 1  # β adapts toward the latency target
    assert os.path.isfile(run / "architecture.png")


def test_latency_search_errors_before_compute(demo_table, tmp_path):
    """All raised by the constructor, which checks and loads but computes nothing (the model is built by run)."""
    with pytest.raises(ValueError, match="needs --latency-table"):
        Search(_cfg(tmp_path, cost="latency"))
    with pytest.raises(ValueError, match="needs --cost latency"):
        Search(_cfg(tmp_path, latency_target=1.0))
    with pytest.raises(ValueError, match="give --latency-target"):
        Search(_cfg(tmp_path, cost="latency", latency_table=demo_table, flops_target=1.0))
    with pytest.raises(ValueError, match="below the smallest net"):
        Search(_cfg(tmp_path, cost="latency", latency_table=demo_table, latency_target=1e-6))
    with pytest.raises(LatencyTableError, match="lacks"):  # a demo table for another resolution
        Search(_cfg(tmp_path, cost="latency", latency_table=demo_table, resolution=24))
    data = json.load(open(demo_table))
    data["meta"]["device_name"] = "Another CPU"
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(data))
    with pytest.raises(LatencyTableError, match="another machine"):
        Search(_cfg(tmp_path, cost="latency", latency_table=str(foreign)))
    s = Search(_cfg(tmp_path, cost="latency", latency_table=str(foreign), latency_table_any_machine=True))
    assert s.cost.kind == "latency" and s.cost.unit == "ms" and not hasattr(s, "model")


def test_validate_measures_random_and_searched_archs(demo_table, tmp_path):
    run = tmp_path / "run"
    Search(_cfg(tmp_path, epochs=1, cost="latency", latency_table=demo_table, plots=False)).run()
    table = LatencyTable.load(demo_table)
    space = build_space("demo")
    threads = torch.get_num_threads()
    result = latency_cli.validate(table, 4, seed=3, extra=[("searched", latency_cli._read_arch(str(run), space))],
                                  progress=False, protocol=FAST)
    assert torch.get_num_threads() == threads  # the timing settings are put back
    assert result["archs"] == 4 and len(result["rows"]) == 5
    for r in result["rows"]:
        assert r["measured_ms"] > 0 and r["predicted_ms"] == pytest.approx(r["sum_ms"] + table.overhead_ms)
    assert -1 <= result["table_tau"] <= 1 and -1 <= result["mflops_tau"] <= 1 and result["table_mape"] >= 0
    assert "within_table_mape" in result["rows"][-1]
    calibration = {tuple(a) for a in table.network["calibration_archs"]}
    assert not any(tuple(r["arch"]) in calibration for r in result["rows"][:4])  # validation is out of sample
    latency_cli.plot_validation(result, str(tmp_path / "v.png"))
    assert os.path.getsize(tmp_path / "v.png") > 0
    assert "table (sum + network overhead)" in latency_cli.format_validation(result)


def test_mape():
    assert latency_cli.mape([1.1, 0.9], [1.0, 1.0]) == pytest.approx(10.0)  # τ-b is tested in test_study.py
