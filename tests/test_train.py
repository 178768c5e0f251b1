"""Retraining a searched architecture: recipes, the network's variants, exact resume, the files that
export reads, and clear errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from betanas_fast.space import build_space
from betanas_fast.train import RECIPES, TrainConfig, Trainer, build_net, resolve_arch

DEMO = build_space("demo")
ARCH = DEMO.arch_strings([1, 0, 3, 6, 2, 5, 0, 1])  # a valid mix, skip included


def cfg(tmp_path, name="run", **kw):
    d = dict(arch=list(ARCH), epochs=2, batch_size=64, progress=False, tensorboard=False, threads=2,
             out=str(tmp_path / name))
    d.update(kw)
    return TrainConfig(**d)


def history(out):
    return [json.loads(ln) for ln in open(os.path.join(out, "history.jsonl"))]


def test_recipes_resolve_and_flags_override():
    c = TrainConfig(arch=list(ARCH), recipe="proxyless", lr=0.1).resolved()
    assert (c.optimizer, c.lr, c.lr_batch, c.schedule, c.epochs, c.label_smoothing, c.dropout, c.weight_decay_bn) == \
        ("sgd", 0.1, 256, "cosine", 300, 0.1, 0.2, False)
    m = TrainConfig(arch=list(ARCH), recipe="mobilenetv2").resolved()
    assert (m.optimizer, m.lr, m.lr_batch, m.schedule, m.decay, m.weight_decay) == \
        ("rmsprop", 0.045, 96, "exponential", 0.98, 4e-5)
    assert set(RECIPES) == {"demo", "proxyless", "mobilenetv2"}


def test_variants_build_the_papers_nets():
    c = TrainConfig(arch=list(ARCH), width_mult=1.4, se_ratio=0.25, act="swish", dropout=0.2).resolved()
    space, arch = resolve_arch(c)
    net = build_net(space, arch, c)
    base = build_net(*resolve_arch(TrainConfig(arch=list(ARCH)).resolved()), TrainConfig(arch=list(ARCH)).resolved())
    assert net.act == "silu" and any(type(m).__name__ == "SqueezeExcite" for m in net.modules())
    assert sum(p.numel() for p in net.parameters()) > 1.5 * sum(p.numel() for p in base.parameters())  # x1.4 + SE
    assert space.config.width_mult == 1.4 and space.arch_strings(arch) != ARCH  # wider channels, same choices
    net.train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    a = net(x)
    torch.manual_seed(1)
    assert not torch.equal(a, net(x))  # dropout before the classifier is active in training
    net.eval()
    assert torch.equal(net(x), net(x))


@pytest.mark.slow
def test_train_resume_is_exact_and_writes_what_export_reads(tmp_path):
    full = Trainer(cfg(tmp_path, "full", epochs=3)).run()
    assert Trainer(cfg(tmp_path, "part", epochs=3, stop_after=1)).run() is not None
    assert len(history(tmp_path / "part")) == 1
    resumed = Trainer(cfg(tmp_path, "part", epochs=3)).run()  # the same command again continues the run
    hf, hp = history(tmp_path / "full"), history(tmp_path / "part")
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(hf) == strip(hp) and [r["epoch"] for r in hp] == [1, 2, 3]
    assert resumed["best_val_top1"] == full["best_val_top1"]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["arch"] == ARCH and a["net"] == {"se_ratio": 0.0, "act": "relu6"} and a["space"] == DEMO.config.to_dict()
    assert all(0 <= r["val_top1"] <= r["val_top5"] <= 1 for r in hf) and hf[-1]["train_loss"] < hf[0]["train_loss"]
    from betanas_fast.export import load_net  # the retrained net's file is what export reads
    net = load_net(str(tmp_path / "full"), weights=str(tmp_path / "full" / "best.pt"))
    assert net.space.arch_strings(net.arch) == ARCH
    best = torch.load(tmp_path / "full" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(v, best[k]) for k, v in net.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(recipe="mobilenetv2", batch_size=64, epochs=1),
                                dict(autoaugment=True, ema_decay=0.99, epochs=1)])
def test_other_recipes_and_options_run(tmp_path, kw):
    res = Trainer(cfg(tmp_path, **kw)).run()
    assert 0 <= res["best_val_top1"] <= 1 and len(history(tmp_path / "run")) == 1


def test_autoaugment_is_seeded():
    from betanas_fast.data.digits import load_digits_data
    from betanas_fast.train import AutoAugmentSplit
    d = load_digits_data(resolution=32)
    split = AutoAugmentSplit(d.train, (127.5,) * 3, (127.5,) * 3)
    idx = torch.arange(16)
    a, _ = split.batch(idx, True, torch.Generator().manual_seed(3))
    b, _ = split.batch(idx, True, torch.Generator().manual_seed(3))
    c, _ = split.batch(idx, True, torch.Generator().manual_seed(4))
    plain, _ = d.train.batch(idx, False)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == plain.shape
    assert not torch.equal(split.batch(idx, False)[0], a)


def test_bad_arch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="block 2: 'ir_r1_k4_s2_e6_c24' is not a candidate here"):
        Trainer(cfg(tmp_path, arch=ARCH[:2] + ["ir_r1_k4_s2_e6_c24"] + ARCH[3:]))
    with pytest.raises(ValueError, match="3 block strings; the demo space has 8"):
        Trainer(cfg(tmp_path, arch=ARCH[:3]))
    r = subprocess.run([sys.executable, "-m", "betanas_fast.train", "--arch", "ir_r1_k9_s2_e6_c16"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr
