import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from betanas_fast.nn import set_bn_batch_stats_frozen
from betanas_fast.search import ArchState, Search, SearchConfig, parse_config
from betanas_fast.runs import files as ckpt

from common import built, read_history, tiny


# --- sampling --------------------------------------------------------------------------------------------------
def test_phase1_sampling_uniform_over_remaining():
    allowed = [[True] * 7, [True] * 6 + [False]]
    st = ArchState(allowed)
    st.remaining[0, 2] = False  # a dropped path
    g = torch.Generator().manual_seed(0)
    n = 6 * 6 * 500
    at_step = torch.zeros(2, 7)
    for t in range(n):
        arch = st.sample_uniform_cycle(g)
        for l, m in enumerate(arch):
            st.phase1_counts[l, m] += 1
        if t % 7 == 3:  # a fixed phase within the cycle: marginal still uniform
            at_step[0, arch[0]] += 1
    c = st.phase1_counts.float()
    assert c[0, 2] == 0 and c[1, 6] == 0                       # never sampled where dropped / not allowed
    assert c[0][st.remaining[0]].max() - c[0][st.remaining[0]].min() <= 1  # exact balance by cycles
    assert c[1][:6].max() - c[1][:6].min() <= 1
    freq = at_step[0][st.remaining[0]] / at_step[0].sum()
    assert (freq - 1 / 6).abs().max() < 0.05                  # statistical: ~1/M' at an arbitrary step


def test_proxyless_trains_high_p_path_more(tmp_path):
    s = built(tmp_path, strategy="proxyless")
    with torch.no_grad():
        s.state.alpha[:, 1] = 1.5  # p ≈ 0.43 for path 1 in 7-way blocks
    for _ in range(30):
        s.phase1_step()
    c = s.state.phase1_counts
    for l in range(c.shape[0]):
        others = torch.cat([c[l, :1], c[l, 2:]])
        assert c[l, 1] > others.max(), c[l]


# --- drop ------------------------------------------------------------------------------------------------------
def test_no_block_loses_its_last_path():
    st = ArchState([[True] * 3, [True] * 3])
    with torch.no_grad():
        st.alpha.copy_(torch.tensor([[-1.0, -2.0, -3.0], [0.5, -1.0, -1.0]]))
    drops = st.drop_below(-0.1, step=7)
    assert st.remaining.tolist() == [[True, False, False], [True, False, False]]
    assert {(d["block"], d["path"], d["step"]) for d in drops} == {(0, 1, 7), (0, 2, 7), (1, 1, 7), (1, 2, 7)}
    st.drop_below(10.0, step=8)  # even an absurd threshold keeps one path
    assert st.remaining.sum(1).tolist() == [1, 1]


def test_argmax_ignores_dropped():
    st = ArchState([[True] * 3])
    with torch.no_grad():
        st.alpha.copy_(torch.tensor([[0.9, 0.2, 0.5]]))
    assert st.argmax_arch() == [0]
    st.remaining[0, 0] = False
    assert st.argmax_arch() == [2]
    p = st.probs()
    assert p[0, 0] == 0 and torch.allclose(p[0, 1:], torch.softmax(torch.tensor([0.2, 0.5]), 0))


def test_dropped_paths_never_sampled_or_trained(tmp_path):
    s = built(tmp_path)
    l, m = 2, 6  # block 2 holds skip; drop an MBConv in block 1 as well
    s.state.remaining[l, m] = False
    s.state.remaining[1, 3] = False
    frozen = {k: v.clone() for k, v in s.model.blocks[1].candidates["mb_k5_e6"].state_dict().items()}
    with torch.no_grad():
        s.state.alpha[1, 3] = -0.7
    for _ in range(40):
        s._iteration()
    assert s.state.phase1_counts[1, 3] == 0 and s.state.phase2_counts[1, 3] == 0
    assert s.state.phase1_counts[l, m] == 0 and s.state.phase2_counts[l, m] == 0
    for k, v in s.model.blocks[1].candidates["mb_k5_e6"].state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert s.state.alpha[1, 3] == -0.7 and s.state.probs()[1, 3] == 0
    assert s.state.phase2_counts.sum() > 0  # α steps did happen


# --- the α gradient --------------------------------------------------------------------------------------------
def _gates_by_autograd(s, x, y, arch):
    """Eq. 3 written out: O_l = Σ_m g_lm o_lm(x_l) over the remaining m with one-hot g; dL/dg by autograd."""
    model, rem = s.model, s.state.remaining
    model.train()
    set_bn_batch_stats_frozen(model, True)
    gates = torch.zeros(rem.shape)
    for l in range(rem.shape[0]):
        gates[l, arch[l]] = 1.0
    gates.requires_grad_(True)
    h = model.first(model.stem(x))
    for l, block in enumerate(model.blocks):
        h = sum(gates[l, m] * block(h, m) for m in rem[l].nonzero().flatten().tolist())
    loss = F.cross_entropy(model._head(h), y)
    loss.backward()
    set_bn_batch_stats_frozen(model, False)
    return gates.grad.masked_fill(~rem, 0.0)


def test_alpha_gradient_equals_eq4_plus_cost(tmp_path):
    torch.manual_seed(0)
    s = built(tmp_path)
    st = s.state
    st.remaining[1, 0] = st.remaining[1, 4] = st.remaining[3, 6 if st.allowed[3, 6] else 2] = False
    with torch.no_grad():
        st.alpha.copy_(torch.randn(st.alpha.shape) * 0.5)
    x, y = s.data.heldout.batch(torch.arange(16), train=False)
    arch = st.sample_from_p(torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    gate, _, _ = s.model.gate_grad_table(x, y, arch, st.remaining)
    for k, v in s.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # frozen weights, BN running stats untouched
    assert all(p.grad is None for p in s.model.parameters())
    expected_gate = _gates_by_autograd(s, x, y, arch)
    torch.testing.assert_close(gate, expected_gate, rtol=1e-4, atol=1e-6)

    beta, cost = 0.3, s.cost.table
    got = st.alpha_grad(gate, cost, beta)
    p = st.probs()
    want = torch.zeros_like(got)
    for l in range(p.shape[0]):
        R = st.remaining_paths(l)
        for m in R:
            ce = sum(gate[l, j] * p[l, j] * ((1.0 if j == m else 0.0) - p[l, m]) for j in R)
            want[l, m] = ce
    # cost term: autograd and a central finite difference of β Σ p c
    a = st.alpha.detach().clone().requires_grad_(True)
    expected_cost = lambda a: beta * (torch.softmax(a.masked_fill(~st.remaining, float("-inf")), 1)  # noqa: E731
                                      * cost).sum()
    (g_cost,) = torch.autograd.grad(expected_cost(a), a)
    torch.testing.assert_close(got, want + g_cost.masked_fill(~st.remaining, 0), rtol=1e-5, atol=1e-7)
    eps = 1e-3
    for l, m in [(0, 1), (1, 3), (2, 6)]:
        e = torch.zeros_like(a)
        e[l, m] = eps
        a64, e64 = a.detach().double(), e.double()
        cost64, rem = cost.double(), st.remaining
        f = lambda a: beta * (torch.softmax(a.masked_fill(~rem, float("-inf")), 1) * cost64).sum()  # noqa: E731
        fd = (f(a64 + e64) - f(a64 - e64)) / (2 * eps)
        assert abs(float(g_cost[l, m]) - float(fd)) < 1e-6
    assert (got[~st.remaining] == 0).all()


def test_recentre_keeps_p():
    st = ArchState([[True] * 4])
    st.remaining[0, 3] = False
    with torch.no_grad():
        st.alpha.copy_(torch.tensor([[0.3, 0.9, -0.1, 5.0]]))
    p = st.probs()
    st.recentre()
    torch.testing.assert_close(st.probs(), p)
    assert abs(float(st.alpha.detach()[0, :3].mean())) < 1e-7 and st.alpha[0, 3] == 5.0


# --- resume ----------------------------------------------------------------------------------------------------
def test_resume_equals_uninterrupted(tmp_path):
    kw = dict(epochs=1, warmup_epochs=0, batch_size=64, checkpoint_every=4, drop_threshold=-0.02, arch_lr=0.03)
    full = tiny(tmp_path, **kw)
    full.out = str(tmp_path / "full")
    Search(full).run()
    part = tiny(tmp_path, stop_after=10, **kw)
    part.out = str(tmp_path / "part")
    assert Search(part).run() is None
    assert not os.path.exists(os.path.join(part.out, "arch.json"))
    assert len(read_history(part.out)) == 10 and ckpt.latest_iteration(os.path.join(part.out, "checkpoints")) == 8
    Search(SearchConfig(resume=part.out, progress=False)).run()
    a, b = json.load(open(os.path.join(full.out, "arch.json"))), json.load(open(os.path.join(part.out, "arch.json")))
    assert a == b
    ha, hb = read_history(full.out), read_history(part.out)
    assert [r["alpha"] for r in ha] == [r["alpha"] for r in hb] and [r["step"] for r in hb] == list(range(1, len(ha) + 1))
    assert any(r["drops"] for r in ha)  # the run exercised drops


def test_corrupt_checkpoint_clear_error(tmp_path):
    out = tmp_path / "c"
    cfg = tiny(tmp_path, epochs=1, warmup_epochs=0, checkpoint_every=3, stop_after=7)
    cfg.out = str(out)
    Search(cfg).run()
    ckpts = ckpt.list_checkpoints(str(out / "checkpoints"))
    assert len(ckpts) == 2  # the last two kept
    data = open(ckpts[-1], "rb").read()
    open(ckpts[-1], "wb").write(data[: len(data) // 3])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt.*previous checkpoint .* is intact"):
        Search(SearchConfig(resume=str(out), progress=False)).run()
    assert os.path.exists(ckpts[0])
    torch.load(ckpts[0], weights_only=True)


# --- bad configuration -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(drop_threshold=0.0), "would drop every path"),
    (dict(candidates=["mb_k4_e6", "skip"]), "unknown candidate name 'mb_k4_e6'"),
    (dict(candidates=["skip"]), "'skip' needs stride 1 and equal channels"),
    (dict(flops_target=0.1), "below the smallest net"),
    (dict(heldout=1800), "held-out .* splits need"),
])
def test_bad_configuration_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        Search(tiny(**kw))


def test_bad_dataset_rejected():
    import numpy as np

    from betanas_fast.data import load_digits_data
    with pytest.raises(ValueError, match="empty"):
        load_digits_data(images=np.zeros((0, 8, 8)), labels=np.zeros(0))
    with pytest.raises(ValueError, match="single class"):
        load_digits_data(images=np.zeros((500, 8, 8)), labels=np.zeros(500), heldout=50, val=50)


def test_cli_rejects_bad_config_fast():
    r = subprocess.run([sys.executable, "-m", "betanas_fast.search", "--drop-threshold", "0.5"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "would drop every path" in r.stderr and "Traceback" not in r.stderr


def test_preset_and_flags():
    cfg = parse_config(["--preset", "imagenet", "--epochs", "3"])
    assert (cfg.batch_size, cfg.lr, cfg.arch_lr, cfg.heldout, cfg.epochs) == (1024, 0.1, 1e-3, 50000, 3)
    assert parse_config([]).strategy == "betanas"


# --- the main command ------------------------------------------------------------------------------------------
def test_main_command_end_to_end(tmp_path):
    out = tmp_path / "main"
    r = subprocess.run([sys.executable, "-m", "betanas_fast.search", "--amp", "--epochs", "1", "--warmup-epochs", "0",
                        "--stage-depths", "1", "2", "1", "1", "--threads", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resolved configuration" in r.stdout and "chosen op" in r.stdout
    for f in ("config.json", "arch.json", "history.jsonl", "balance.png", "architecture.png"):
        assert (out / f).stat().st_size > 0, f
    assert any(p.name.startswith("events") for p in (out / "tensorboard").iterdir())
    arch = json.loads((out / "arch.json").read_text())
    assert len(arch["arch"]) == 5 and arch["mflops"] > 0 and arch["params"] > 0
    last = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    assert last["alpha"][0][0] is not None and len(last["phase1_counts"]) == 5


@pytest.mark.parametrize("strategy", ["spos", "random"])
def test_other_strategies_run(tmp_path, strategy):
    cfg = tiny(tmp_path, strategy=strategy, epochs=1, warmup_epochs=0, batch_size=64, spos_population=4, spos_parents=2,
               spos_generations=2,
               flops_target=0.6)
    res = Search(cfg).run()
    assert res["mflops"] <= 0.6 and len(res["arch"]) == 5


# --- configuration as data -------------------------------------------------------------------------------------
def test_every_flag_comes_from_the_config_fields():
    from dataclasses import fields

    from betanas_fast.search.config import build_parser
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest not in ("help", "preset")}
    assert set(flags) == {f.name for f in fields(SearchConfig)}
    for f in fields(SearchConfig):
        assert f.metadata["help"] and flags[f.name].help.startswith(f.metadata["help"]), f.name
    assert flags["strategy"].choices == ("betanas", "proxyless", "spos", "random", "darts", "fbnet", "pdarts",
                                         "dartsplus", "hmnas", "gdas", "enas")
    assert flags["stage_depths"].nargs == "+" and flags["stage_depths"].type is int
    assert flags["flops_target"].type is float
    with pytest.raises(SystemExit):
        parse_config(["--path-sampling", "per-pixel"])
    assert parse_config(["--no-augment", "--stage-depths", "1", "2", "1", "1"]).stage_depths == [1, 2, 1, 1]


def test_weight_decay_skips_batchnorm_and_biases(tmp_path):
    s = built(tmp_path)
    decay, no_decay = s.sgd.param_groups
    assert decay["weight_decay"] == s.cfg.weight_decay and no_decay["weight_decay"] == 0.0
    bn_and_bias = {id(p) for m in s.model.modules() for n, p in m.named_parameters(recurse=False)
                   if isinstance(m, torch.nn.BatchNorm2d) or n == "bias"}
    assert {id(p) for p in no_decay["params"]} == bn_and_bias and bn_and_bias
    everything = built(tmp_path / "all", weight_decay_bn=True)
    assert len(everything.sgd.param_groups[0]["params"]) == len(list(everything.model.parameters()))


def test_amp_runs_fp32_on_a_cpu_without_native_bf16(tmp_path, capsys):
    """--amp's choice on this CPU, as the detector finds it (no stand-ins): fp32 without native bf16, the
    faster of a measurement with it; an explicit --amp-dtype is obeyed; one line says what runs and why."""
    from betanas_fast.runs import runtime
    cpu = torch.device("cpu")
    assert runtime.resolve_amp(False, "bf16", cpu).dtype is None
    assert runtime.resolve_amp(True, "bf16", cpu).dtype == torch.bfloat16  # forced
    assert runtime.resolve_amp(True, "fp16", cpu).dtype == torch.float16
    assert capsys.readouterr().out == ""
    s = Search(tiny(tmp_path, amp=True, threads=1))
    lines = capsys.readouterr().out.splitlines()
    assert lines == [s.amp.reason] and s.amp_dtype == s.amp.dtype
    if runtime.cpu_has_native_bf16():  # measured: a Phase-1 step of the space in both precisions
        assert s.amp.fp32_ms > 0 and s.amp.bf16_ms > 0 and "Phase-1 forward+backward" in lines[0]
        assert s.amp_dtype == (torch.bfloat16 if s.amp.bf16_ms < s.amp.fp32_ms else None)
    else:
        assert s.amp_dtype is None and s.amp.fp32_ms is None and s.amp.bf16_ms is None
        assert "no native bf16" in lines[0] and "running in fp32 (--amp-dtype bf16 forces bf16)" in lines[0]


def test_flops_target_adapts_beta_and_is_reported(tmp_path):
    s = built(tmp_path, epochs=1, warmup_epochs=0, flops_target=0.5)
    betas = []
    for _ in range(4):
        s._iteration()
        betas.append(s.beta)
    assert betas[0] != s.cfg.beta and len(set(betas)) == 4   # β moves at every α step
    assert (betas[-1] > betas[-2]) == (s.expected_costs()["expected_mflops"] > 0.5)  # up while above the target, down below
    from betanas_fast.search.report import arch_summary, format_table
    arch = s.state.argmax_arch()
    res = arch_summary(s.space, s.state, arch, "betanas", None, s.cost)
    assert res["flops_target"] == 0.5 and res["meets_flops_target"] == (res["mflops"] <= 0.5)
    assert "FLOPs target 0.5000 MFLOPs" in format_table(res)
    untargeted = arch_summary(s.space, s.state, arch, "betanas", None)
    assert untargeted["flops_target"] is None and untargeted["meets_flops_target"] is None
