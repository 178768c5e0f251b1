"""Export (betanas_fast.export): the timm model and the ONNX graph compute the Net's logits, timm alone rebuilds
the model, the exported costs are arch.json's, ProxylessNAS-Mobile has its published size, and the command line
works end to end on a search run (and says clearly what is wrong with bad input)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

timm = pytest.importorskip("timm", reason="timm is not installed (it comes with the export extra: "
                                          "pip install '.[export]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (it comes with the export extra: "
                                          "pip install '.[export]')")

from betanas_fast import export as ex  # noqa: E402
from betanas_fast.cost import arch_cost  # noqa: E402
from betanas_fast.nn import DWConvBNAct, Net  # noqa: E402
from betanas_fast.nn.mbconv import se_channels  # noqa: E402
from betanas_fast.search import Search  # noqa: E402
from betanas_fast.space import SearchSpace, SpaceConfig, build_space  # noqa: E402

from common import tiny  # noqa: E402

TIMM_ONLY_CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "timm_only_check.py")


def random_arch(space, seed):
    """A random legal arch, with the identity in the first block that allows it (the timm stage then has a
    block less)."""
    g = torch.Generator().manual_seed(seed)
    arch = [int(torch.nonzero(torch.tensor(b.allowed)).flatten()[torch.randint(sum(b.allowed), (1,), generator=g)])
            for b in space.blocks]
    skip = space.candidate_names.index("skip")
    arch[next(i for i, b in enumerate(space.blocks) if b.allowed[skip])] = skip
    return arch


def randomised(net, seed=0):
    """The net with fresh random weights (the default initialisation, seeded) and every BatchNorm's affine
    parameters and running statistics random, far from their defaults; in eval mode. The scales keep the
    logits of order 1, where 1e-5 is a tight absolute tolerance for float32."""
    torch.manual_seed(seed)
    net.apply(lambda m: m.reset_parameters() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) else None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(7)
    return net.eval()


def inputs(space, batch, seed=1):
    c = space.config
    return torch.randn(batch, c.in_channels, c.resolution, c.resolution, generator=torch.Generator().manual_seed(seed))


def max_err(a, b):
    return float((a.double() - b.double()).abs().max())


def rebuilt(out_dir):
    """The exported timm model, built and loaded (strict) in this process."""
    with open(os.path.join(out_dir, "model_timm.json")) as f:
        cfg = json.load(f)
    model = ex.build_timm_model(cfg)
    model.load_state_dict(torch.load(os.path.join(out_dir, "model_timm.pt"), weights_only=True), strict=True)
    return model.eval(), cfg


def flops(model, x):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


DEMO = build_space("demo")
DEMO_ARCH = random_arch(DEMO, 0)


def test_timm_key_mapping():
    net = Net(DEMO, DEMO_ARCH, se_ratio=0.25)
    arch_def, layout = ex.timm_layout(net)
    skipped = [i for i, m in enumerate(DEMO_ARCH) if DEMO.candidates[m].is_skip]
    assert skipped and all(f"blocks.{i}" not in layout for i in skipped)
    assert [len(s) for s in arch_def][0] == 1 and sum(len(s) for s in arch_def) == 1 + len(DEMO_ARCH) - len(skipped)
    assert ex.timm_key("stem.0.weight", layout) == "conv_stem.weight"
    assert ex.timm_key("stem.1.running_var", layout) == "bn1.running_var"
    assert ex.timm_key("first.depthwise.conv.weight", layout) == "blocks.0.0.conv_dw.weight"
    assert ex.timm_key("first.depthwise.bn.num_batches_tracked", layout) == "blocks.0.0.bn1.num_batches_tracked"
    assert ex.timm_key("first.se.conv_reduce.bias", layout) == "blocks.0.0.se.conv_reduce.bias"
    assert ex.timm_key("first.project.1.weight", layout) == "blocks.0.0.bn2.weight"
    assert ex.timm_key("blocks.0.expand.0.weight", layout) == "blocks.1.0.conv_pw.weight"
    assert ex.timm_key("blocks.0.expand.1.bias", layout) == "blocks.1.0.bn1.bias"
    assert ex.timm_key("blocks.0.depthwise.bn.running_mean", layout) == "blocks.1.0.bn2.running_mean"
    assert ex.timm_key("blocks.0.se.conv_expand.weight", layout) == "blocks.1.0.se.conv_expand.weight"
    assert ex.timm_key("blocks.0.project.0.weight", layout) == "blocks.1.0.conv_pwl.weight"
    assert ex.timm_key("blocks.0.project.1.weight", layout) == "blocks.1.0.bn3.weight"
    assert ex.timm_key("head.0.weight", layout) == "conv_head.weight"
    assert ex.timm_key("head.1.running_mean", layout) == "bn2.running_mean"
    assert ex.timm_key("classifier.bias", layout) == "classifier.bias"
    t = 1  # timm stage 0 is the first block; each stage of the space follows, without its identities
    for stage in range(len(DEMO.config.stages)):
        kept = [i for i, b in enumerate(DEMO.blocks) if b.stage == stage and i not in skipped]
        assert [layout[f"blocks.{i}"] for i in kept] == [(f"blocks.{t}.{j}", "ir") for j in range(len(kept))]
        t += bool(kept)
    with pytest.raises(KeyError):
        ex.timm_key(f"blocks.{skipped[0]}.project.0.weight", layout)
    # one timm key per key of ours, and exactly timm's model's keys (strict loading checks the shapes)
    sd = net.state_dict()
    mapped = ex.timm_state_dict(net)
    assert len(mapped) == len(sd)
    assert set(mapped) == set(ex.build_timm_model(ex.timm_config(net)).state_dict())


@pytest.mark.parametrize("se_ratio,act", [(0.0, "relu6"), (0.0, "silu"), (0.25, "relu6"), (0.25, "silu")])
def test_timm_logits_equal_ours(tmp_path, se_ratio, act):
    torch.manual_seed(3)
    net = randomised(Net(DEMO, DEMO_ARCH, se_ratio=se_ratio, act=act), seed=4)
    assert (net.act, net.se_ratio) == (act, se_ratio)
    assert all((m.se is not None) == (se_ratio > 0) for m in ex._mbconvs(net))
    cfg = ex.export_timm(net, str(tmp_path))
    assert cfg["check"]["max_abs_logit_diff"] <= 1e-5
    model, saved = rebuilt(str(tmp_path))
    assert saved["act"] == act and saved["se_ratio"] == se_ratio and saved["bn_eps"] == 1e-5
    assert all(s.endswith(f"_se{se_ratio}") == (se_ratio > 0) for stage in saved["arch_def"] for s in stage)
    acts = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.Hardswish, torch.nn.GELU)
    kinds = lambda module: sorted(type(m).__name__ for m in module.modules() if isinstance(m, acts))  # noqa: E731
    fused = [m.act for m in net.modules() if isinstance(m, DWConvBNAct)]  # the depthwise stages' activation
    assert set(kinds(model)) == set(kinds(net)) == {"ReLU6" if act == "relu6" else "SiLU"} and set(fused) == {act}
    assert len(kinds(model)) == len(kinds(net)) + len(fused)
    x = inputs(DEMO, 4)
    with torch.no_grad():
        ours, theirs = net(x), model(x)
    assert 0.1 < ours.abs().max() < 100  # neither degenerate nor blown up
    assert max_err(theirs, ours) <= 1e-5
    print(f"timm vs ours, se {se_ratio}, {act}: max |diff| {max_err(theirs, ours):.3g} "
          f"(max |logit| {ours.abs().max():.3g})")


def test_se_channels_follow_timm(tmp_path):
    """The reduced widths timm builds from `_se<r>` (relative to the block input) are ours, also where the
    rounding is not trivial (x 1.4 widths, r = 0.0625)."""
    sp = build_space("demo", width_mult=1.4, channel_divisor=8)
    net = randomised(Net(sp, random_arch(sp, 5), se_ratio=0.0625, act="silu"), seed=6)
    model = ex.build_timm_model(ex.timm_config(net))
    ours = [m.se.conv_reduce.out_channels for m in ex._mbconvs(net)]
    se_type = timm.models._efficientnet_blocks.SqueezeExcite
    theirs = [m.conv_reduce.out_channels for m in model.modules() if isinstance(m, se_type)]
    assert ours == theirs
    assert ours == [se_channels(m.in_channels, m.expand_ratio, 0.0625) for m in ex._mbconvs(net)]
    assert ours[0] == round(sp.stem_channels * 0.0625)  # the first block: input width x ratio
    cfg = ex.export_timm(net, str(tmp_path))
    assert cfg["check"]["max_abs_logit_diff"] <= 1e-5


def test_other_spaces_export_and_unexportable_widths(tmp_path):
    # stem stride 1 (the bench space): timm's stem is set to stride 1 after construction
    sp = build_space("bench")
    net = randomised(Net(sp, random_arch(sp, 7)), seed=8)
    cfg = ex.export_timm(net, str(tmp_path / "bench"))
    assert cfg["stem_stride"] == 1 and cfg["check"]["max_abs_logit_diff"] <= 1e-5
    # x1.4 with channels rounded to multiples of 4: 12 x 3 = 36 expanded channels, timm's InvertedResidual
    # would build 40
    sp = build_space("demo", width_mult=1.4)
    net = Net(sp, [0] * sp.num_blocks)
    with pytest.raises(ex.ExportError, match="multiples of 8"):
        ex.timm_config(net)


def test_rebuild_with_torch_and_timm_only(tmp_path):
    net = randomised(Net(DEMO, DEMO_ARCH, se_ratio=0.25, act="silu"), seed=9)
    out = tmp_path / "export"
    ex.export_timm(net, str(out))
    x = inputs(DEMO, 3)
    torch.save(x, tmp_path / "x.pt")
    r = subprocess.run([sys.executable, "-I", TIMM_ONLY_CHECK, str(out), str(tmp_path / "x.pt"),
                        str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert "rebuilt timm.models.efficientnet.EfficientNet" in r.stdout  # the script's own __main__ ran
    assert "betanas_fast" not in report["modules"] and {"torch", "timm"} <= set(report["modules"])
    assert report["params"] == n_params(net)
    with torch.no_grad():
        ours = net(x)
    err = max_err(torch.load(tmp_path / "y.pt", weights_only=True), ours)
    assert err <= 1e-5
    print(f"timm-only rebuild: max |diff| {err:.3g}")


def test_exported_costs_are_arch_json_numbers(tmp_path):
    arch = random_arch(DEMO, 11)
    net = Net(DEMO, arch)
    cost = arch_cost(DEMO, arch)
    cfg = ex.export_timm(net, str(tmp_path / "plain"), check=False)
    model, _ = rebuilt(str(tmp_path / "plain"))
    assert (cfg["macs"], cfg["params"]) == (cost.macs, cost.params)
    assert n_params(model) == cost.params
    assert flops(model, inputs(DEMO, 1)) == 2 * cost.macs
    # with squeeze-excitation: arch_cost plus two 1x1 convolutions (with bias) on a 1x1 map per MBConv
    net = Net(DEMO, arch, se_ratio=0.25)
    cfg = ex.export_timm(net, str(tmp_path / "se"), check=False)
    model, _ = rebuilt(str(tmp_path / "se"))
    assert cfg["macs"] > cost.macs and cfg["params"] > cost.params
    assert n_params(model) == n_params(net) == cfg["params"]
    assert flops(model, inputs(DEMO, 1)) == 2 * cfg["macs"]


# ProxylessNAS-Mobile as published (github.com/mit-han-lab/proxylessnas, proxyless_mobile.config; the same
# blocks as osmr/imgclsmob's proxylessnas_mobile, 4,080,512 parameters): stem 32, MB1 k3 16, then per stage
# (kernel, expansion) with None for the identity; head 1280. Its first searched stage is 32 wide, where the
# paper's "mobile" preset has 24, so the space is the preset with that width.
PROXYLESS_MOBILE = [[(5, 3), (3, 3), None, None], [(7, 3), (3, 3), (5, 3), (5, 3)], [(7, 6), (5, 3), (5, 3), (5, 3)],
                    [(5, 6), (5, 3), (5, 3), (5, 3)], [(7, 6), (7, 6), (7, 3), (7, 3)], [(7, 6)]]


def test_proxylessnas_mobile_has_its_published_size(tmp_path):
    sp = SearchSpace(SpaceConfig(stages=[(32, 4, 2), (40, 4, 2), (80, 4, 2), (96, 4, 1), (192, 4, 2), (320, 1, 1)]))
    arch = [sp.index_of("skip" if b is None else f"mb_k{b[0]}_e{b[1]}") for stage in PROXYLESS_MOBILE for b in stage]
    net = Net(sp, arch)
    cfg = ex.export_timm(net, str(tmp_path), check=False)
    assert cfg["arch_def"] == [
        ["ds_r1_k3_s1_c16"],
        ["ir_r1_k5_s2_e3_c32", "ir_r1_k3_s1_e3_c32"],
        ["ir_r1_k7_s2_e3_c40", "ir_r1_k3_s1_e3_c40", "ir_r1_k5_s1_e3_c40", "ir_r1_k5_s1_e3_c40"],
        ["ir_r1_k7_s2_e6_c80", "ir_r1_k5_s1_e3_c80", "ir_r1_k5_s1_e3_c80", "ir_r1_k5_s1_e3_c80"],
        ["ir_r1_k5_s1_e6_c96", "ir_r1_k5_s1_e3_c96", "ir_r1_k5_s1_e3_c96", "ir_r1_k5_s1_e3_c96"],
        ["ir_r1_k7_s2_e6_c192", "ir_r1_k7_s1_e6_c192", "ir_r1_k7_s1_e3_c192", "ir_r1_k7_s1_e3_c192"],
        ["ir_r1_k7_s1_e6_c320"]]
    model, _ = rebuilt(str(tmp_path))
    assert n_params(model) == 4_080_512 == arch_cost(sp, arch).params
    assert flops(model, torch.zeros(1, 3, 224, 224)) == 2 * arch_cost(sp, arch).macs


# --- the command line on a search run ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_cli")
    Search(tiny(tmp, epochs=1, warmup_epochs=0)).run()
    return str(tmp / "run")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "betanas_fast.export", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_timm(run_dir):
    with open(os.path.join(run_dir, "arch.json")) as f:
        summary = json.load(f)
    net = ex.load_net(run_dir)  # the supernet's latest checkpoint, inherited
    assert "supernet checkpoint" in net.export_source["weights"] and "recomputed" in net.export_source["weights"]
    assert net.space.arch_strings(net.arch) == summary["arch"]
    # BatchNorm recomputed as the search's own score did it: the exported net scores what arch.json says
    from betanas_fast.scoring import load_search, score
    val = load_search(run_dir, device="cpu").data.val
    cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    top1, _, _ = score(cl, val, 32, lambda x: x.contiguous(memory_format=torch.channels_last))
    assert top1 == summary["val_acc"]

    r = cli(run_dir, "--format", "timm")
    assert r.returncode == 0, r.stderr
    out = os.path.join(run_dir, "export")
    assert all(os.path.isfile(os.path.join(out, f)) for f in ex.TIMM_FILES)
    model, cfg = rebuilt(out)
    assert cfg["block_strings"] == summary["arch"] and cfg["choices"] == summary["choices"]
    assert (cfg["macs"], cfg["params"]) == (summary["macs"], summary["params"])
    assert n_params(model) == summary["params"]
    x = inputs(net.space, 2)
    assert flops(model, x[:1]) == 2 * summary["macs"]
    with torch.no_grad():
        assert max_err(model(x), net(x)) <= 1e-5


def retrained(run_dir, tmp_path, se_ratio=0.25, act="silu"):
    """A retrained net of the run's architecture (random weights and BN statistics, squeeze-excitation,
    SiLU) and its checkpoint, as the training command writes it: "model", "arch", "space", "net"."""
    with open(os.path.join(run_dir, "arch.json")) as f:
        summary = json.load(f)
    space = SearchSpace(SpaceConfig.from_dict(summary["space"]))
    net = randomised(Net(space, summary["choices"], se_ratio=se_ratio, act=act), seed=13)
    weights = str(tmp_path / "net.pt")
    torch.save({"model": net.state_dict(), "arch": summary["arch"], "space": summary["space"], "net": net.net_config},
               weights)
    return net, weights


def test_cli_onnx_with_retrained_weights(run_dir, tmp_path):
    pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (the export extra)")
    net, weights = retrained(run_dir, tmp_path)
    out = str(tmp_path / "onnx")
    r = cli(run_dir, "--weights", weights, "--format", "onnx", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "retrained checkpoint" in r.stdout
    path = os.path.join(out, ex.ONNX_FILE)
    errors = {}
    for b in (1, 3):  # the batch axis is dynamic
        x = inputs(net.space, b, seed=20 + b)
        with torch.no_grad():
            errors[b] = max_err(ex.onnx_outputs(path, x), net(x))
    assert max(errors.values()) <= 1e-4
    print(f"onnxruntime vs ours: max |diff| {errors}")


def test_load_net_with_retrained_weights(run_dir, tmp_path):
    net, weights = retrained(run_dir, tmp_path)
    loaded = ex.load_net(run_dir, weights)
    assert loaded.net_config == {"se_ratio": 0.25, "act": "silu"} and not loaded.training
    x = inputs(net.space, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    result = ex.main([os.path.join(run_dir, "arch.json"), "--weights", weights, "--format", "timm",
                      "--out", str(tmp_path / "out")])
    assert result["check"]["max_abs_logit_diff"] <= 1e-5 and result["net"] == {"se_ratio": 0.25, "act": "silu"}
    model, _ = rebuilt(str(tmp_path / "out"))
    with torch.no_grad():
        assert max_err(model(x), net(x)) <= 1e-5


def test_cli_bad_input(run_dir, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    r = cli(str(empty), "--format", "timm")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "error:" in r.stderr and "arch.json: no such file" in r.stderr

    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    r = cli(run_dir, "--weights", str(bad), "--format", "onnx")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"--weights {bad} is not a readable torch checkpoint" in r.stderr

    def error(*argv):
        with pytest.raises(SystemExit) as e:
            ex.main([*argv])
        return str(e.value.code)

    assert "no such file" in error(run_dir, "--weights", str(tmp_path / "missing.pt"), "--format", "timm")
    assert "no such run directory" in error(str(tmp_path / "nowhere"), "--format", "timm")
    torch.save({"state_dict": {}}, tmp_path / "nomodel.pt")
    assert "holds no 'model' state dict" in error(run_dir, "--weights", str(tmp_path / "nomodel.pt"),
                                                  "--format", "timm")
    with open(os.path.join(run_dir, "arch.json")) as f:
        summary = json.load(f)
    torch.save({"model": {}, "arch": ["ir_r1_k9_s2_e6_c16"] + summary["arch"][1:], "space": summary["space"]},
               tmp_path / "bad_arch.pt")
    assert "is not a candidate" in error(run_dir, "--weights", str(tmp_path / "bad_arch.pt"), "--format", "timm")
    space = SearchSpace(SpaceConfig.from_dict(summary["space"]))
    other = list(summary["choices"])
    other[0] = next(m for m, ok in enumerate(space.blocks[0].allowed) if ok and m != other[0])
    torch.save({"model": Net(space, other).state_dict(), "arch": space.arch_strings(other), "space": summary["space"]},
               tmp_path / "other.pt")
    assert "another architecture" in error(run_dir, "--weights", str(tmp_path / "other.pt"), "--format", "timm")
    (tmp_path / "arch_bad.json").write_text("{not json")
    assert "not a readable arch.json" in error(str(tmp_path / "arch_bad.json"), "--format", "timm")
    nockpt = tmp_path / "nockpt"
    nockpt.mkdir()
    with open(nockpt / "arch.json", "w") as f:
        json.dump(summary, f)
    assert "no checkpoint" in error(str(nockpt), "--format", "timm")
