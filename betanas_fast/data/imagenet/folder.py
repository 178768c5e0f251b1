"""The loader that needs nothing but PIL and torch: a random-access `ImageSplit` over the index, read
by the engine's `BatchStream` in a `BatchOrder`'s order, with the same crop windows and flips as
`DaliSplit`."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch

from ..base import ImageSplit
from . import transforms as T

# Uniforms per sample for one random-resized-crop: 10 attempts x 4 draws, plus the flip.
_DRAWS = 41


class _Uniforms:
    def __init__(self, values):
        self.values, self.pos = values, 0

    def __call__(self, lo, hi):
        u = self.values[self.pos]
        self.pos += 1
        return lo + (hi - lo) * u


def sample_window(width: int, height: int, train: bool, uniforms):
    """(window, flip) of one sample: random from `uniforms` when training, the centre crop otherwise."""
    if not train:
        return T.eval_window(width, height), False
    draw = _Uniforms(uniforms)
    flip = draw(0, 1) < 0.5
    return T.random_resized_crop_window(width, height, draw), flip


def load_sample(path: str, train: bool, resolution: int, uniforms) -> np.ndarray:
    img = T.open_rgb(path)
    window, flip = sample_window(img.size[0], img.size[1], train, uniforms)
    return T.crop_resize(img, window, flip, resolution)


class FolderSplit(ImageSplit):
    """Images `positions` of one split of the index, decoded on demand with `threads` threads.
    Training augmentation is drawn from the engine's generator, so a resumed run repeats it exactly."""
    decodes = True

    def __init__(self, index, positions: Sequence[int], resolution: int, split: str = "train", augment: bool = True,
                 threads: Optional[int] = None, channels_last: bool = False):
        part = getattr(index, split)
        positions = list(positions)
        self.paths = [os.path.join(index.root, part.files[i]) for i in positions]
        self.sizes = [part.sizes[i] for i in positions]
        self.labels = torch.tensor([part.labels[i] for i in positions], dtype=torch.long)
        self.resolution, self.augment, self.channels_last = resolution, augment, channels_last
        self.threads = threads or min(8, os.cpu_count() or 1)
        self._pool: Optional[ThreadPoolExecutor] = None

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, indices, train, generator=None):
        indices = torch.as_tensor(indices, dtype=torch.long)
        train = train and self.augment
        draws = torch.rand((len(indices), _DRAWS), generator=generator, dtype=torch.float64).tolist()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads)  # PIL decodes without the GIL
        images = list(self._pool.map(
            lambda a: load_sample(self.paths[a[0]], train, self.resolution, a[1]),
            zip(indices.tolist(), draws)))
        return T.to_normalized_tensor(images, self.channels_last), self.labels[indices]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_pool"] = None
        return d
