"""The embedded demo data: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes,
shipped with the package, no download), upscaled to the space's resolution as 3-channel images.

The images are split in two before any seed is used:
- the test split: 30 images of each class (300 in all, 17 %), drawn once by a fixed permutation
  (`TEST_SPLIT_SEED`), the same for every run. No search loads it (`load_digits_data` never returns it); a
  retraining scores on it with `python -m betanas_fast.train --score-split test` (`load_digits_test`), and
  the studies score every net they compare on it.
- the search pool: the other 1,497, which each search splits by its own seed into held-out (for α),
  validation and weight-training images (the search's defaults: 300 / 200 / 997).

Every split keeps the indices of its images in scikit-learn's order (`TensorSplit.indices`), so that
disjointness can be checked by identity. The 1,797 images hold no two identical ones."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .base import (SearchData, TensorSplit, fixed_test_indices, network_input, register_dataset, search_splits,
                   validate_labels)

TEST_PER_CLASS = 30
TEST_SPLIT_SEED = 1797  # a constant: the test split does not move with any run's seed
# What defines the splits; a study records it, so that one continued under another definition is refused.
SPLITS = {"test": f"{TEST_PER_CLASS} images per class, fixed permutation (seed {TEST_SPLIT_SEED}), removed before "
                  f"any search split", "search": "the rest, permuted by the run's seed: held-out, validation, "
                                                 "weight-training", "version": 2}


def _source(images=None, labels=None):
    """The images (N x 8 x 8 float in [0, 1]) and labels, the embedded set unless given."""
    if images is None:
        from sklearn.datasets import load_digits
        d = load_digits()
        images, labels = d.images, d.target
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    validate_labels("whole data", y)
    return (x / 16.0 if x.max() > 1 else x), y


def _test_indices(labels: torch.Tensor) -> torch.Tensor:
    return fixed_test_indices(labels, TEST_PER_CLASS, TEST_SPLIT_SEED)


def split_indices(seed: int = 0, heldout: int = 300, val: int = 200, images=None, labels=None
                  ) -> Dict[str, torch.Tensor]:
    """The index sets (into the source images) of the test split and of the search splits of `seed`:
    {"test", "heldout", "val", "train"}."""
    _, y = _source(images, labels)
    return _split(y, seed, heldout, val)


def _split(y: torch.Tensor, seed: int, heldout: int, val: int) -> Dict[str, torch.Tensor]:
    return search_splits(y, _test_indices(y), seed, heldout, val)


def load_digits_data(seed: int = 0, heldout: int = 300, val: int = 200, resolution: int = 32,
                     augment: bool = True, root: Optional[str] = None, images=None, labels=None) -> SearchData:
    """The search splits of `seed`, from the images outside the test split (which is not loaded).
    `images`/`labels` override the embedded set (used to test the checks)."""
    x, y = _source(images, labels)
    idx = _split(y, seed, heldout, val)

    def part(name: str, shift: int = 0) -> TensorSplit:
        i = idx[name]
        return TensorSplit(network_input(x[i], resolution), y[i], shift, indices=i)

    train = part("train", max(1, resolution // 16) if augment else 0)
    validate_labels("weight-train", train.labels)
    return SearchData(train=train, heldout=part("heldout"), val=part("val"), num_classes=int(y.max()) + 1,
                      resolution=resolution)


def load_digits_test(resolution: int = 32, images=None, labels=None) -> TensorSplit:
    """The fixed test split: images no search loads, for scoring retrained nets."""
    x, y = _source(images, labels)
    i = _test_indices(y)
    test = TensorSplit(network_input(x[i], resolution), y[i], indices=i)
    validate_labels("test", test.labels)
    return test


register_dataset("digits", load_digits_data, test=load_digits_test, splits=SPLITS)
