"""NVIDIA DALI pipelines over the validated index. Imported only on demand: `import betanas_fast`
never imports DALI.

`DaliLoader` (epochs, DALI's PyTorch iterator, DDP sharding): training = decode + random-resized-crop
(fused, `decoders.image_random_crop`) + resize + random flip + normalise; evaluation = decode + resize
shorter side to resolution / 0.875 + centre crop + normalise. Files and labels come from the index
through `readers.file(files=, labels=)`, so no file DALI cannot decode ever reaches it.
`DaliSplit` (random access for the search engine): the same transforms, with the crop windows drawn
on the host like `FolderSplit` and decoded with `decoders.image_slice`.
The decoder runs on the GPU ("mixed") when one is used and on the CPU otherwise (`device_id=None`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from . import transforms as T
from .folder import shard_range


def build_pipeline(files: Sequence[str], labels: Sequence[int], train: bool, batch_size: int, resolution: int,
                   shard_id: int = 0, num_shards: int = 1, seed: int = 0, threads: int = 2,
                   device_id: Optional[int] = None, channels_last: bool = False):
    """A built DALI pipeline reading `files` (absolute paths). `device_id=None` runs everything on the
    CPU. The reader's shuffling seed is the same on every shard, so the shards partition one
    permutation per epoch; augmentation seeds differ per shard."""
    if len(files) != len(labels):
        raise ValueError(f"{len(files)} files but {len(labels)} labels")
    files, labels = list(files), [int(v) for v in labels]
    if train:
        # The reader reshuffles only after each epoch; shuffling the list makes epoch 0 random too.
        order = np.random.Generator(np.random.PCG64(seed)).permutation(len(files))
        files, labels = [files[i] for i in order], [labels[i] for i in order]
    decoder = "cpu" if device_id is None else "mixed"

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed * 1000 + shard_id + 1,
                  prefetch_queue_depth=2)
    def pipeline():
        encoded, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                         shuffle_after_epoch=train, stick_to_shard=not train, pad_last_batch=True,
                                         seed=seed, name="Reader")
        if train:
            images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                                   random_area=list(T.SCALE), random_aspect_ratio=list(T.RATIO),
                                                   num_attempts=10)
            images = fn.resize(images, resize_x=resolution, resize_y=resolution)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=T.eval_resize_size(resolution))
            mirror = 0
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
                                          crop=(resolution, resolution), mean=list(T.MEAN), std=list(T.STD),
                                          mirror=mirror)
        if device_id is not None:
            label = label.gpu()
        return images, label

    pipe = pipeline()
    pipe.build()
    return pipe


class DaliLoader:
    """Epoch iterator of (images N x 3 x H x W float normalised, labels long) through DALI's PyTorch
    iterator. Training: every shard yields (n // num_shards) // batch_size full batches (equal batch
    sizes keep BN statistics comparable; equal counts keep DDP ranks in step), shards rotating over a
    fresh permutation each epoch. Evaluation: fixed shards, the last batch partially filled, so every
    image is seen exactly once."""

    def __init__(self, files, labels, train: bool, batch_size: int, resolution: int, shard_id: int = 0,
                 num_shards: int = 1, seed: int = 0, threads: int = 2, device_id: Optional[int] = None,
                 channels_last: bool = False):
        self.pipe = build_pipeline(files, labels, train, batch_size, resolution, shard_id, num_shards, seed, threads,
                                   device_id, channels_last)
        self.channels_last = channels_last
        self.num_samples = len(files) // num_shards if train else len(shard_range(len(files), shard_id, num_shards))
        self.batch_size, self.train = batch_size, train
        self.iterator = DALIGenericIterator([self.pipe], ["images", "labels"], reader_name="Reader",
                                            last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL,
                                            auto_reset=True)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.train else -(-n // b)

    def __iter__(self):
        for out in self.iterator:
            x, y = out[0]["images"], out[0]["labels"].reshape(-1).long()
            yield (x.permute(0, 3, 1, 2) if self.channels_last else x), y


class DaliSplit:
    """A random-access split (the engine's `ImageSplit` interface) decoded by DALI: `batch(indices,
    train, generator)` reads those files and runs them through a synchronous DALI pipeline fed by
    `external_source`. The crop windows and flips are drawn from `generator` exactly as in
    `FolderSplit` (same windows, same flips; the index knows every image's size), so both loaders
    produce the same images up to interpolation and a resumed run repeats its augmentation."""
    decodes = True

    def __init__(self, index, positions, resolution: int, split: str = "train", augment: bool = True,
                 threads: int = 2, device_id: Optional[int] = None, channels_last: bool = False):
        from .folder import FolderSplit
        # The folder split holds paths, sizes and labels, and draws the augmentation parameters.
        self._folder = FolderSplit(index, positions, resolution, split, augment, threads, channels_last)
        self.labels = self._folder.labels
        self.resolution, self.augment, self.threads = resolution, augment, threads
        self.device_id, self.channels_last = device_id, channels_last
        self._pipe, self._capacity = None, 0

    def __len__(self) -> int:
        return len(self._folder)

    def _pipeline(self, batch_size: int):
        # External sources take any batch up to the pipeline's size: one pipeline serves all sizes.
        if batch_size <= self._capacity:
            return self._pipe
        decoder = "cpu" if self.device_id is None else "mixed"
        res = self.resolution

        @pipeline_def(batch_size=batch_size, num_threads=self.threads, device_id=self.device_id,
                      exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            images = fn.decoders.image_slice(encoded, anchor, shape, device=decoder, output_type=types.RGB,
                                             normalized_anchor=False, normalized_shape=False, axis_names="WH")
            images = fn.resize(images, resize_x=res, resize_y=res)
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC" if self.channels_last else "CHW",
                                            crop=(res, res), mean=list(T.MEAN), std=list(T.STD), mirror=flip)

        self._pipe = pipeline()
        self._pipe.build()
        self._capacity = batch_size
        return self._pipe

    def batch(self, indices, train, generator=None):
        from .folder import _DRAWS, sample_window
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        train = train and self.augment
        draws = torch.rand((len(indices), _DRAWS), generator=generator, dtype=torch.float64).tolist()
        paths = [self._folder.paths[i] for i in indices.tolist()]
        encoded = [np.fromfile(p, dtype=np.uint8) for p in paths]
        flips, anchors, shapes = [], [], []
        for i, u in zip(indices.tolist(), draws):
            (left, top, w, h), flip = sample_window(*self._folder.sizes[i], train, u)
            flips.append(np.int32(flip))
            anchors.append(np.array([left, top], dtype=np.float32))
            shapes.append(np.array([w, h], dtype=np.float32))
        pipe = self._pipeline(max(len(indices), 1))
        pipe.feed_input("encoded", encoded)
        pipe.feed_input("anchor", anchors)
        pipe.feed_input("shape", shapes)
        pipe.feed_input("flip", flips)
        (out,) = pipe.run()
        x = _to_torch(out.as_tensor(), self.device_id)
        x = x.permute(0, 3, 1, 2) if self.channels_last else x
        return x, self.labels[indices]


def _to_torch(tensor, device_id: Optional[int]) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray
    device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
    out = torch.empty(tensor.shape(), dtype=torch.float32, device=device)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device) if device_id is not None else None)
    return out
