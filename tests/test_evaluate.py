"""Scoring sub-networks of a trained supernet: exact BatchNorm recalibration, an untouched supernet,
reproducible accuracy, and the command."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from betanas_fast import ops
from betanas_fast.scoring import calibration_indices, recalibrate_bn
from betanas_fast.nn import DWConvBNAct, Net
from betanas_fast.search import Search
from betanas_fast.space import build_space

from common import built, tiny


def counted_mflops(space, arch_strings):
    """MFLOPs (multiply-adds) of one image through the net of `arch_strings`, as torch's FLOP counter counts
    them (it sees aten convolutions, so the net runs on the reference ops)."""
    net = Net(space, space.arch_from_strings(arch_strings)).eval()
    x = torch.randn(1, space.config.in_channels, space.config.resolution, space.config.resolution,
                    generator=torch.Generator().manual_seed(0))
    with ops.reference_ops(), FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x)
    return fc.get_total_flops() / 2 / 1e6


def _population_moments(x):
    x = x.double()
    dims = [0, 2, 3]
    return x.mean(dims), x.var(dims, unbiased=True)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_recalibration_equals_population_moments(batch_size):
    g = torch.Generator().manual_seed(batch_size)
    data = torch.randn(150, 3, 9, 9, generator=g) * 3 + 1.5  # 150 images: the last batch is partial for 7 and 64
    conv = nn.Conv2d(3, 8, 3, padding=1)
    model = nn.Sequential(conv, nn.BatchNorm2d(8))
    dw = nn.Sequential(DWConvBNAct(3, kernel_size=5, stride=2))
    for m in (model, dw):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):  # stale statistics that must be replaced, not averaged into
                bn.running_mean.uniform_(-5, 5)
                bn.running_var.uniform_(3, 9)
    batches = list(data.split(batch_size))
    assert recalibrate_bn(model, batches) == 150
    recalibrate_bn(dw, batches)
    with torch.no_grad():
        mean, var = _population_moments(conv(data))
        dmean, dvar = _population_moments(nn.functional.conv2d(data, dw[0].conv.weight, None, 2, 2, groups=3))
    torch.testing.assert_close(model[1].running_mean.double(), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_var.double(), var, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw[0].bn.running_mean.double(), dmean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw[0].bn.running_var.double(), dvar, atol=1e-5, rtol=1e-5)


def test_calibration_subset_is_fixed_by_the_seed():
    a, b = calibration_indices(100, 32, 4, seed=3), calibration_indices(100, 32, 4, seed=3)
    assert [t.tolist() for t in a] == [t.tolist() for t in b] and [len(t) for t in a] == [32, 32, 32, 4]
    assert calibration_indices(100, 32, 4, seed=4)[0].tolist() != a[0].tolist()


def test_supernet_untouched_after_100_subnets_and_accuracy_reproducible(tmp_path):
    s = built(tmp_path, heldout=64, bn_recalib_batches=2)
    with torch.no_grad():  # trained-looking state: random weights and BatchNorm statistics
        for name, t in s.model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "var" in name else torch.randn_like(t) * 0.3)
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    allowed = s.state.allowed
    scores = {}
    for _ in range(100):
        arch = [int(torch.multinomial(row.float(), 1, generator=g)) for row in allowed]
        scores[tuple(arch)] = s.evaluate(arch, s.data.heldout)
    after = s.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and buffers bit-identical
    arch, first = next(iter(scores.items()))
    again = s.evaluate(list(arch), s.data.heldout)
    assert again == first and 0 <= first.top1 <= first.top5 <= 1 and first.images == len(s.data.heldout)
    assert len({r.top1 for r in scores.values()}) > 1  # the architectures are told apart


@pytest.mark.slow
def test_evaluate_command_reproduces_the_search_and_scores_any_arch(tmp_path):
    cfg = tiny(tmp_path, epochs=1, warmup_epochs=0, threads=1)
    result = Search(cfg).run()
    run = cfg.out
    r = subprocess.run([sys.executable, "-m", "betanas_fast.evaluate", run], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    # the search's final evaluation is this function: same subset, same number
    assert ev["top1"] == result["val_acc"] and ev["arch"] == result["arch"] and ev["params"] == result["params"]
    other = ["ir_r1_k7_s2_e6_c16", "ir_r1_k3_s2_e3_c24", "ir_r1_k5_s1_e6_c24", "ir_r1_k3_s2_e6_c32",
             "ir_r1_k7_s1_e3_c40"]
    r = subprocess.run([sys.executable, "-m", "betanas_fast.evaluate", run, "--arch", *other, "--split", "heldout"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ev2 = json.loads(r.stdout.strip().splitlines()[-1])
    assert other != ev["arch"]  # else the case below would not tell the two apart
    assert ev2["arch"] == other
    # the MFLOPs the command reports are those torch's own FLOP counter finds in each net (2 FLOPs per MAC)
    space = build_space(cfg.space, stage_depths=cfg.stage_depths, width_mult=cfg.width_mult,
                        resolution=cfg.resolution, candidates=cfg.candidates, num_classes=10)  # digits: 10 classes
    searched, scored = counted_mflops(space, ev["arch"]), counted_mflops(space, other)
    assert ev["mflops"] == pytest.approx(searched, rel=1e-12) and ev2["mflops"] == pytest.approx(scored, rel=1e-12)
    assert searched != scored
    bad = subprocess.run([sys.executable, "-m", "betanas_fast.evaluate", run, "--arch", "ir_r1_k4_s2_e6_c16"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_a_loaded_run_scores_in_the_dtype_the_search_chose(tmp_path):
    """The checkpoint records the autocast dtype the run chose (--amp may time it, so the configuration alone
    does not tell it); loading the run for scoring takes that one, on the device type it was chosen for."""
    from betanas_fast.runs import files
    from betanas_fast.scoring import load_search
    s = Search(tiny(tmp_path, epochs=1, warmup_epochs=0))
    result = s.run()
    path, state = files.load_latest(files.checkpoint_dir(s.out))
    assert state["autocast"] == {"device_type": "cpu", "dtype": None}
    run = load_search(s.out, device="cpu")
    assert getattr(run.scorer.autocast, "fast_dtype", None) is None
    assert run.evaluate(result["choices"], run.split("val")).top1 == result["val_acc"]
    # as if --amp had timed bf16 faster on this device: the record wins over the configuration (amp off)
    torch.save(dict(state, autocast={"device_type": "cpu", "dtype": "bfloat16"}), path)
    assert load_search(s.out, device="cpu").scorer.autocast.fast_dtype == torch.bfloat16
    # chosen for another device type: resolved from the configuration here
    torch.save(dict(state, autocast={"device_type": "cuda", "dtype": "float16"}), path)
    assert getattr(load_search(s.out, device="cpu").scorer.autocast, "fast_dtype", None) is None
