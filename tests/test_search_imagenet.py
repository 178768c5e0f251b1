"""The search command on an ImageNet-layout tree with the real data set's oddities, with each loader."""
import json
import os
import subprocess
import sys

import pytest

from test_data_imagenet import CLASSES, make_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet_search"))
    bad = make_tree(root)
    return root, bad


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_search_runs_on_a_tree(tree, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    root, bad = tree
    out = tmp_path / loader
    cmd = [sys.executable, "-m", "betanas_fast.search", "--data", root, "--loader", loader, "--epochs", "2",
           "--warmup-epochs", "1", "--batch-size", "8", "--heldout-batch-size", "4", "--resolution", "32",
           "--heldout-per-class", "1", "--stage-depths", "1", "1", "1", "1", "--threads", "2", "--no-progress",
           "--out", str(out)]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-2000:]
    for name in bad:  # every bad file is reported by name
        assert name.split("/")[-1] in r.stdout + r.stderr, name
    report = (out / "excluded_files.tsv").read_text()
    assert all(name in report for name in bad), report
    split = json.loads((out / "heldout_split.json").read_text())  # saved for resume
    assert split["heldout_per_class"] == 1 and len(split["heldout"]) == len(CLASSES)
    assert not set(split["heldout"]) & set(split["train"])
    arch = json.loads((out / "arch.json").read_text())
    assert len(arch["arch"]) == 4


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_train_runs_on_a_tree(tree, tmp_path, loader):
    """Retraining reads the same tree (val/ when present), with the classifier sized for its classes."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    from betanas_fast.space import build_space
    root, _ = tree
    arch = build_space("demo").arch_strings([0, 1, 2, 3, 0, 1, 2, 3])
    out = tmp_path / loader
    cmd = [sys.executable, "-m", "betanas_fast.train", "--arch", *arch, "--data", root, "--loader", loader,
           "--epochs", "2", "--batch-size", "8", "--autoaugment", "--threads", "2", "--no-progress", "--out", str(out)]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-2000:]
    history = [json.loads(ln) for ln in open(out / "history.jsonl")]
    assert [h["epoch"] for h in history] == [1, 2] and all(0 <= h["val_top1"] <= h["val_top5"] <= 1 for h in history)
    import torch
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["space"]["num_classes"] == len(CLASSES) and best["model"]["classifier.weight"].shape[0] == len(CLASSES)
