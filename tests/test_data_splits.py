"""The digits' test split: fixed whatever the seed, never among the images a search loads (checked by the
images' indices in scikit-learn's set and by their pixels), and the split the studies' retrainings score on."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from betanas_fast.data import base as data_base, digits
from betanas_fast.data.digits import TEST_PER_CLASS, load_digits_data, load_digits_test, split_indices
from betanas_fast.space import build_space
from betanas_fast.study import common
from betanas_fast.study.seeds import SeedsConfig
from betanas_fast.study.sharing import SET_BY_STUDY_TRAIN, SharingConfig
from betanas_fast.train import TrainConfig, Trainer, load_data

SEEDS = (0, 1, 2, 5, 17, 123)
# the search's defaults, the tests' tiny searches, the sharing study's supernets, and a small weight-train split
SIZES = ((300, 200), (64, 64), (1, 0), (500, 800))
SOURCE = load_digits()
N = len(SOURCE.target)
DEMO = build_space("demo")


def reference_images(resolution=32):
    """The whole set prepared as the loader documents it (scaled to [0, 1], bilinear upscaling, [-1, 1],
    3 channels), written out here independently of the loader."""
    x = torch.as_tensor(SOURCE.images, dtype=torch.float32) / 16.0
    x = F.interpolate(x[:, None], size=(resolution, resolution), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1)


TEST = load_digits_test().indices


def test_the_test_split_is_fixed_balanced_and_the_same_for_every_seed():
    assert len(TEST) == 10 * TEST_PER_CLASS == 300 and len(set(TEST.tolist())) == 300
    assert np.bincount(SOURCE.target[TEST.numpy()]).tolist() == [TEST_PER_CLASS] * 10
    for seed in SEEDS:
        for heldout, val in SIZES:
            assert torch.equal(split_indices(seed, heldout, val)["test"], TEST)
    # not the first images, nor a sorted block: drawn from the whole set
    assert TEST.min() < 50 and TEST.max() > N - 50


@pytest.mark.parametrize("heldout, val", SIZES)
def test_the_test_images_are_in_no_search_split_of_any_seed(heldout, val):
    test = set(TEST.tolist())
    pool = set(range(N)) - test
    for seed in SEEDS:
        d = load_digits_data(seed=seed, heldout=heldout, val=val)
        splits = {name: d_split.indices.tolist() for name, d_split in
                  (("weight-train", d.train), ("held-out", d.heldout), ("validation", d.val))}
        assert [len(v) for v in splits.values()] == [N - 300 - heldout - val, heldout, val]
        for name, idx in splits.items():
            assert not test & set(idx), f"seed {seed}: test images in the {name} split"
        # the three search splits partition exactly the images outside the test split
        together = [i for idx in splits.values() for i in idx]
        assert len(together) == len(set(together)) and set(together) == pool
        assert torch.equal(d.train.indices, split_indices(seed, heldout, val)["train"])


def test_the_search_splits_still_move_with_the_seed():
    a, b = split_indices(0), split_indices(1)
    assert set(a["heldout"].tolist()) != set(b["heldout"].tolist())
    assert set(a["heldout"].tolist() + a["val"].tolist() + a["train"].tolist()) == \
        set(b["heldout"].tolist() + b["val"].tolist() + b["train"].tolist())


def test_each_split_holds_the_images_its_indices_name():
    """The indices are the images' identity: each split's images are the source images at its indices."""
    ref = reference_images()
    test = load_digits_test()
    assert torch.equal(test.images, ref[test.indices]) and torch.equal(test.labels, torch.as_tensor(
        SOURCE.target[test.indices.numpy()]))
    d = load_digits_data(seed=3)
    for split in (d.train, d.heldout, d.val):
        assert torch.equal(split.images, ref[split.indices])
        assert split.labels.tolist() == SOURCE.target[split.indices.numpy()].tolist()


def test_no_test_image_has_an_identical_copy_among_the_search_images():
    raw = SOURCE.images.reshape(N, -1)
    rows = [r.tobytes() for r in raw]
    # scikit-learn's digits hold no two identical images at all ...
    assert len(set(rows)) == N
    # ... and by pixels too no test image is among the searchable ones, at 8x8 or at the search's 32x32
    test_rows = {rows[i] for i in TEST.tolist()}
    pool = [i for i in range(N) if i not in set(TEST.tolist())]
    assert not test_rows & {rows[i] for i in pool}
    big_test = {r.numpy().tobytes() for r in load_digits_test().images.flatten(1)}
    d = load_digits_data(seed=0, heldout=1, val=0)
    big_pool = {r.numpy().tobytes() for s in (d.train, d.heldout) for r in s.images.flatten(1)}
    assert len(big_test) == 300 and not big_test & big_pool


def test_a_retraining_scored_on_test_trains_on_every_other_image():
    cfg = TrainConfig(arch=["x"], score_split="test", seed=4).resolved()
    d = load_data(cfg, DEMO)
    train, scored, classes = d.train, d.scored, d.num_classes
    assert torch.equal(scored.indices, TEST) and classes == 10
    assert sorted(train.indices.tolist()) == sorted(set(range(N)) - set(TEST.tolist()))
    # scored on val: the carve-out comes from the search pool, never from the test split
    cfg = TrainConfig(arch=["x"], seed=4).resolved()
    d = load_data(cfg, DEMO)
    train, scored = d.train, d.scored
    assert len(scored) == 200 and not set(scored.indices.tolist()) & set(TEST.tolist())
    assert not set(train.indices.tolist()) & set(TEST.tolist() + scored.indices.tolist())


def test_scoring_on_test_is_refused_where_it_cannot_mean_the_test_split(tmp_path):
    with pytest.raises(ValueError, match="--val 100 with --score-split test"):
        Trainer(TrainConfig(arch=["x"], score_split="test", val=100, out=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="only the embedded data sets set a test split apart"):
        Trainer(TrainConfig(arch=["x"], score_split="test", data=str(tmp_path), out=str(tmp_path / "b")))


@pytest.mark.parametrize("study, flags, set_by_study", [
    ("seeds", SeedsConfig().train_flags, ("arch", "out", "resume")),
    ("sharing", SharingConfig().train_flags, SET_BY_STUDY_TRAIN),
])
def test_the_studies_retrainings_score_on_exactly_the_test_images(study, flags, set_by_study):
    cfg = common.train_config(flags, set_by_study)
    assert cfg.score_split == "test"
    scored = load_data(cfg.resolved(), DEMO).scored
    assert torch.equal(scored.indices, TEST)
    with pytest.raises(ValueError, match="--score-split in the train flags"):
        common.train_config(flags + " --score-split val", set_by_study)
    with pytest.raises(ValueError, match="the study scores every net on the test split: --val 500"):
        common.train_config(flags + " --val 500", set_by_study)


def test_a_study_under_another_split_definition_is_refused(tmp_path, monkeypatch):
    cfg = SeedsConfig(out=str(tmp_path / "study"))
    resolved = {"search": {"data": None, "dataset": "digits"}, "train": {"data": None}}
    common.StudyRun("seeds", cfg).start(resolved)
    with open(tmp_path / "study" / common.STUDY_CONFIG) as f:
        assert json.load(f)["data_splits"] == {"digits": digits.SPLITS}
    common.StudyRun("seeds", cfg).start(resolved)  # the same definition: continued
    registered = data_base._REGISTRY["digits"]
    monkeypatch.setitem(data_base._REGISTRY, "digits", dataclasses.replace(
        registered, splits=dict(digits.SPLITS, version=digits.SPLITS["version"] + 1)))
    with pytest.raises(ValueError, match="other settings \\(data_splits: saved"):
        common.StudyRun("seeds", cfg).start(resolved)
    # per-strategy configurations ({strategy: configuration}) are read as configurations, not as one without data
    assert common.data_splits({"search": {"data": None, "dataset": "mnist-cluttered"},
                               "train": {"data": None, "dataset": "mnist-cluttered"},
                               "search_per_strategy": {"pdarts": {"data": None, "dataset": "mnist-cluttered"}}}
                              ) == {"mnist-cluttered": data_base.get_dataset("mnist-cluttered").splits}
    # a study on other data records no digits split definition
    other = SeedsConfig(out=str(tmp_path / "other"))
    common.StudyRun("seeds", other).start({"search": {"data": "/data/imagenet", "dataset": "digits"},
                                           "train": {"data": "/data/imagenet"}})
    assert json.load(open(os.path.join(other.out, common.STUDY_CONFIG)))["data_splits"] is None


def test_search_splits_too_large_for_the_images_outside_the_test_split_are_refused():
    load_digits_data(heldout=1000, val=400)  # 97 left to train the weights
    with pytest.raises(ValueError, match=r"need 1497 samples but the data set has only 1497 besides its 300-image "
                                         r"test split"):
        load_digits_data(heldout=1000, val=497)
