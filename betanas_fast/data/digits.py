"""The embedded demo data: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes,
shipped with the package, no download), upscaled to the space's resolution as 3-channel images."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .base import SearchData, TensorSplit, register_dataset, validate_labels


def load_digits_data(seed: int = 0, heldout: int = 300, val: int = 200, resolution: int = 32,
                     augment: bool = True, root: Optional[str] = None, images=None, labels=None) -> SearchData:
    """Deterministic split from `seed`. `images`/`labels` override the embedded set (used to test
    the checks)."""
    if images is None:
        from sklearn.datasets import load_digits
        d = load_digits()
        images, labels = d.images, d.target
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    validate_labels("whole data", y)
    n = len(y)
    if heldout < 1 or val < 0:
        raise ValueError(f"held-out size must be >= 1 and validation >= 0 (got {heldout}, {val})")
    if heldout + val >= n:
        raise ValueError(f"held-out ({heldout}) + validation ({val}) splits need {heldout + val} samples but the "
                         f"data set has only {n}, leaving nothing to train the weights")
    x = x / 16.0 if x.max() > 1 else x
    x = F.interpolate(x[:, None], size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    h_idx, v_idx, t_idx = perm[:heldout], perm[heldout:heldout + val], perm[heldout + val:]
    shift = max(1, resolution // 16) if augment else 0
    train = TensorSplit(x[t_idx], y[t_idx], shift)
    validate_labels("weight-train", train.labels)
    return SearchData(train=train, heldout=TensorSplit(x[h_idx], y[h_idx]), val=TensorSplit(x[v_idx], y[v_idx]),
                      num_classes=int(y.max()) + 1, resolution=resolution)


register_dataset("digits", load_digits_data)
