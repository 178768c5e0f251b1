"""NVIDIA DALI decoding over the validated index. Imported only on demand: `import betanas_fast`
never imports DALI.

`DaliSplit` (random access for the search engine's `BatchStream`): the transforms of `FolderSplit`
(training = random-resized-crop + random flip, evaluation = the centre window; resized to resolution and
normalised), with the crop windows drawn on the host like `FolderSplit` and decoded with
`decoders.image_slice`. Files come from the index, so no file DALI cannot decode ever reaches it.
The decoder runs on the GPU ("mixed") when one is used and on the CPU otherwise (`device_id=None`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from . import transforms as T


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
