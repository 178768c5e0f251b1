"""Retraining a searched architecture: recipes, the network's variants, exact resume, the files that
export reads, and clear errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from betanas_fast.scoring import score
from betanas_fast.space import build_space
from betanas_fast.data.augment import AutoAugmentSplit
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
    assert set(RECIPES) == {"demo", "cluttered", "proxyless", "mobilenetv2"}
    assert RECIPES["cluttered"] == dict(RECIPES["demo"], epochs=25)


# What each recipe must build: optimizer class and hyper-parameters, lr per images, schedule, decay of the 1-D
# parameters (BatchNorm weights and biases, the classifier's bias) and label smoothing.
RECIPE_OBJECTS = {
    "demo": dict(optimizer=torch.optim.SGD, hyper=dict(momentum=0.9, nesterov=True), lr=0.05, per=64,
                 schedule="cosine", warmup_epochs=2, weight_decay=4e-5, decay_1d=False, label_smoothing=0.1),
    "cluttered": dict(optimizer=torch.optim.SGD, hyper=dict(momentum=0.9, nesterov=True), lr=0.05, per=64,
                      schedule="cosine", warmup_epochs=2, weight_decay=4e-5, decay_1d=False, label_smoothing=0.1),
    "proxyless": dict(optimizer=torch.optim.SGD, hyper=dict(momentum=0.9, nesterov=True), lr=0.05, per=256,
                      schedule="cosine", warmup_epochs=5, weight_decay=4e-5, decay_1d=False, label_smoothing=0.1),
    "mobilenetv2": dict(optimizer=torch.optim.RMSprop, hyper=dict(alpha=0.9, momentum=0.9, eps=math.sqrt(1e-3)),
                        lr=0.045, per=96, schedule="exponential", decay=0.98, weight_decay=4e-5, decay_1d=True,
                        label_smoothing=0.0),
}


def built_trainer(tmp_path, name="run", **kw) -> Trainer:
    t = Trainer(cfg(tmp_path, name, threads=1, **kw))
    t._build()
    return t


def expected_lr(recipe: str, base: float, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The recipe's learning rate after `step` optimizer steps, from its formula: a linear warm-up from 1 % then a
    cosine to 0 over the remaining steps, or x decay per finished epoch."""
    want = RECIPE_OBJECTS[recipe]
    if want["schedule"] == "exponential":
        return base * want["decay"] ** (step // steps_per_epoch)
    total, warm = epochs * steps_per_epoch, want["warmup_epochs"] * steps_per_epoch
    if step < warm:
        return base * (0.01 + 0.99 * step / warm)
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))


@pytest.mark.parametrize("recipe", list(RECIPE_OBJECTS))
def test_recipe_builds_its_optimizer_schedule_and_decay(tmp_path, recipe):
    want, batch, epochs = RECIPE_OBJECTS[recipe], 128, 8
    assert set(RECIPE_OBJECTS) == set(RECIPES)
    t = built_trainer(tmp_path, recipe=recipe, batch_size=batch, epochs=epochs)
    t.stream.close()
    opt, spe = t.optimizer, t.steps_per_epoch
    base = want["lr"] * batch / want["per"]  # scaled linearly with the batch
    assert type(opt) is want["optimizer"] and spe == len(t.train_split) // batch
    for g in opt.param_groups:
        assert g["initial_lr"] == pytest.approx(base, rel=1e-12)
        for k, v in want["hyper"].items():
            assert g[k] == pytest.approx(v, rel=1e-12), k
    # weight decay: on every weight of more than one dimension; on the 1-D ones only where the recipe says
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert sorted(decay_of) == sorted(id(p) for p in t.net.parameters())
    one_d = [m.weight for m in t.net.modules() if isinstance(m, torch.nn.BatchNorm2d)] + \
        [m.bias for m in t.net.modules() if getattr(m, "bias", None) is not None]
    assert len(one_d) > 10 and all(p.ndim == 1 for p in one_d)
    assert all(decay_of[id(p)] == (want["weight_decay"] if want["decay_1d"] else 0.0) for p in one_d)
    assert all(decay_of[id(p)] == want["weight_decay"] for p in t.net.parameters() if p.ndim > 1)
    # the schedule as it is stepped: per optimizer step (cosine) or per epoch (exponential)
    per_step = want["schedule"] == "cosine"
    assert t.step_per == ("step" if per_step else "epoch")
    followed = []
    for step in range(epochs * spe):
        followed.append([g["lr"] for g in opt.param_groups])
        opt.step()  # no gradients: the weights stay, the scheduler sees a step taken
        if per_step or (step + 1) % spe == 0:
            t.scheduler.step()
    for step, lrs in enumerate(followed):
        assert lrs == pytest.approx([expected_lr(recipe, base, step, spe, epochs)] * 2, rel=1e-6, abs=1e-12), step


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["demo", "mobilenetv2"])
def test_recipe_training_uses_its_schedule_and_label_smoothing(tmp_path, recipe):
    """A real run at a learning rate too small to move the weights: its mean training loss is the loss of the
    initial net over the epoch's batches with the recipe's label smoothing, and each epoch's lr is the formula's."""
    want, batch, lr, epochs = RECIPE_OBJECTS[recipe], 512, 1e-9, 3
    run = Trainer(cfg(tmp_path, recipe=recipe, batch_size=batch, epochs=epochs, lr=lr, threads=1)).run()
    h = history(tmp_path / "run")
    replay = built_trainer(tmp_path, "replay", recipe=recipe, batch_size=batch, epochs=epochs, lr=lr)
    assert [r["epoch"] for r in h] == [1, 2, 3] and want.get("warmup_epochs", 0) < epochs  # a whole warm-up
    spe, base = replay.steps_per_epoch, lr * batch / want["per"]
    # the lr the epoch ended with: after spe steps (cosine), or before the epoch's own decay (exponential)
    for r in h:
        step = r["epoch"] * spe if want["schedule"] == "cosine" else (r["epoch"] - 1) * spe
        assert r["lr"] == pytest.approx(expected_lr(recipe, base, step, spe, epochs), rel=1e-6, abs=1e-15)
    losses = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():  # the same initial weights, the same batches and augmentation as the run's first epoch
        for _ in range(spe):
            x, y = replay.stream.next()
            logits = replay.net(replay._to_device(x)).float()
            losses += torch.tensor([float(F.cross_entropy(logits, y, label_smoothing=ls)) * len(y)
                                    for ls in (want["label_smoothing"], 0.1 - want["label_smoothing"])])
    replay.stream.close()
    recipe_loss, other_loss = (losses / (spe * batch)).tolist()
    assert abs(other_loss - recipe_loss) > 2e-4  # the two smoothings are told apart...
    assert h[0]["train_loss"] == pytest.approx(recipe_loss, rel=1e-5)  # ...and the run used the recipe's
    assert run["last"] == h[-1]


@pytest.mark.slow
def test_ema_weights_are_evaluated_and_saved(tmp_path):
    t = Trainer(cfg(tmp_path, ema_decay=0.9, batch_size=256, epochs=1, threads=1))
    t.run()
    h = history(tmp_path / "run")
    ema, raw = t.ema.module.state_dict(), t.net.state_dict()
    assert ema.keys() == raw.keys()
    params = [k for k, _ in t.net.named_parameters()]
    assert all(not torch.equal(ema[k], raw[k]) for k in params)  # the average trails the raw weights
    for name in ("last.pt", "best.pt"):
        saved = torch.load(tmp_path / "run" / name, weights_only=True)["model"]
        assert all(torch.equal(saved[k], ema[k]) for k in ema), name
    top1, top5, _ = score(t.ema.module, t.val_split, t.local_batch, t._to_device)
    assert (h[-1]["val_top1"], h[-1]["val_top5"]) == (top1, top5)


def test_autoaugment_changes_the_training_images(tmp_path):
    plain = built_trainer(tmp_path, "plain", batch_size=64)
    aa = built_trainer(tmp_path, "aa", batch_size=64, autoaugment=True)
    try:
        (x, y), (xa, ya) = plain.stream.next(), aa.stream.next()
    finally:
        plain.stream.close()
        aa.stream.close()
    assert isinstance(aa.train_split, AutoAugmentSplit) and not isinstance(plain.train_split, AutoAugmentSplit)
    # the same images (same order and base augmentation), most of them transformed by the policy
    assert torch.equal(y, ya) and xa.shape == x.shape
    changed = (xa - x).flatten(1).abs().amax(1) > 1e-3
    assert changed.float().mean() >= 0.5, f"{int(changed.sum())} of {len(changed)} images changed"


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
