"""The loader that needs nothing but PIL and torch: a random-access `ImageSplit` over the index (for
the search engine's `BatchOrder`) and an epoch `DataLoader` with the same sharding and last-batch
policy as the DALI pipelines."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

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


def shard_range(n: int, shard_id: int, num_shards: int) -> range:
    """The contiguous block of a list of n that shard `shard_id` reads (DALI's reader splits the same way)."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} is not in [0, {num_shards})")
    return range(n * shard_id // num_shards, n * (shard_id + 1) // num_shards)


class ShardSampler(torch.utils.data.Sampler):
    """Yields (position, epoch): this shard's block of a permutation drawn from (seed, epoch), or of the
    identity when not shuffling. The blocks of all shards partition the data: every image once per
    epoch. `equal=True` trims every block to n // num_shards, so all DDP ranks take the same number
    of steps (as DALI's iterator does when dropping the last batch)."""

    def __init__(self, n: int, shard_id: int = 0, num_shards: int = 1, shuffle: bool = True, seed: int = 0,
                 equal: bool = False):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.shard = shard_range(n, shard_id, num_shards)
        if equal:
            self.shard = range(self.shard.start, self.shard.start + n // num_shards)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = (np.random.Generator(np.random.PCG64([self.seed, self.epoch])).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        return iter([(int(i), self.epoch) for i in order[self.shard.start:self.shard.stop]])

    def __len__(self) -> int:
        return len(self.shard)


class FolderDataset(torch.utils.data.Dataset):
    """Map-style data set indexed by (position, epoch); augmentation is seeded by (seed, epoch, position),
    so it does not depend on the number of workers."""

    def __init__(self, paths: List[str], labels: List[int], train: bool, resolution: int, seed: int = 0):
        self.paths, self.labels, self.train, self.resolution, self.seed = paths, labels, train, resolution, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        i, epoch = key
        uniforms = np.random.Generator(np.random.PCG64([self.seed, epoch, i])).random(_DRAWS).tolist()
        img = load_sample(self.paths[i], self.train, self.resolution, uniforms)
        return torch.from_numpy(img), self.labels[i]


class FolderLoader:
    """Epoch iterator of (images N x 3 x H x W float normalised, labels long). Training gives every
    shard n // num_shards samples and drops the last incomplete batch (all ranks take the same number
    of steps); evaluation keeps everything, so every image is seen exactly once across the shards."""

    def __init__(self, paths, labels, train: bool, batch_size: int, resolution: int, shard_id: int = 0,
                 num_shards: int = 1, seed: int = 0, workers: int = 2, channels_last: bool = False):
        self.sampler = ShardSampler(len(paths), shard_id, num_shards, shuffle=train, seed=seed, equal=train)
        self.channels_last = channels_last
        self.loader = torch.utils.data.DataLoader(
            FolderDataset(list(paths), list(labels), train, resolution, seed), batch_size=batch_size,
            sampler=self.sampler, num_workers=workers, drop_last=train, persistent_workers=workers > 0)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        mean, std = torch.tensor(T.MEAN), torch.tensor(T.STD)
        for images, labels in self.loader:
            x = ((images.float() - mean) / std).permute(0, 3, 1, 2)
            yield (x if self.channels_last else x.contiguous()), labels.long()
