"""ImageNet-layout data for the search and retraining: a validated, cached file index; the
class-balanced held-out split; DALI pipelines (optional) and a PIL/torch fallback with the same
transforms, sharding and last-batch policy.

Two ways to read: random-access splits (`load_imagenet_data` -> SearchData of `DaliSplit` or
`FolderSplit`, driven by the engine's BatchOrder) and epoch loaders (`make_loader` -> `DaliLoader`
through DALI's PyTorch iterator, or `FolderLoader` over a torch DataLoader), for DDP training.

    index = build_index("/data/imagenet")                          # validated, cached
    split = load_or_make_split(index, run_dir, heldout_per_class=50, seed=0)
    loader = make_loader(index, split.train, train=True, batch_size=256, resolution=224,
                         loader="auto", shard_id=rank, num_shards=world_size, seed=0)
    data = load_imagenet_data(root="/data/imagenet", run_dir=run_dir, loader="auto")  # SearchData
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch

from ..base import SearchData, register_dataset, validate_labels
from .folder import FolderLoader, FolderSplit, ShardSampler, shard_range
from .index import FileIndex, build_index, default_cache_path, write_report
from .split import Split, load_or_make_split, make_split, per_class_count

# "torchvision" names the fallback as the search CLI does; it needs only PIL and torch.
LOADERS = ("auto", "dali", "folder", "torchvision")


@functools.lru_cache(maxsize=None)
def dali_available() -> bool:
    """True when nvidia.dali imports (tried only when a loader is chosen: a broken install counts as absent)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a DALI build that cannot load its libraries
        return False
    return True


def resolve_loader(loader: str = "auto", verbose: bool = True) -> str:
    """"auto" -> "dali" when DALI is installed, else "folder" (with a one-line notice); "torchvision" -> "folder"."""
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; expected one of {LOADERS}")
    if loader == "torchvision":
        return "folder"
    if loader == "auto":
        if dali_available():
            return "dali"
        if verbose:
            print("NVIDIA DALI is not installed (pip install 'betanas_fast[dali]'); using the PIL/torch loader")
        return "folder"
    if loader == "dali" and not dali_available():
        raise ImportError("loader 'dali' needs NVIDIA DALI: pip install 'betanas_fast[dali]'")
    return loader


def make_loader(index: FileIndex, positions: Optional[Sequence[int]] = None, split: str = "train", train: bool = True,
                batch_size: int = 256, resolution: int = 224, loader: str = "auto", shard_id: int = 0,
                num_shards: int = 1, seed: int = 0, workers: int = 2, device: Optional[str] = None,
                channels_last: bool = False):
    """An epoch iterator of (images N x 3 x R x R float normalised, labels long) over `positions` of
    index split `split` (all when None). `train` selects augmentation, shuffling and drop-last.
    `workers` is DALI's thread count or the DataLoader's worker count. `device`: "cuda" (GPU decode,
    output on the GPU; DALI only) or "cpu"; None picks cuda when available and DALI is used.
    Each shard (DDP rank) reads a disjoint block; together they read every image once per epoch."""
    kind = resolve_loader(loader)
    part = getattr(index, split)
    if part is None:
        raise ValueError(f"the index of {index.root} has no {split}/ split")
    positions = range(len(part)) if positions is None else positions
    files = [os.path.join(index.root, part.files[i]) for i in positions]
    labels = [part.labels[i] for i in positions]
    if kind == "folder":
        if device == "cuda":
            raise ValueError("the folder loader decodes on the CPU; move batches to the GPU yourself")
        return FolderLoader(files, labels, train, batch_size, resolution, shard_id, num_shards, seed, workers,
                            channels_last)
    from .dali import DaliLoader  # DALI is imported only here
    return DaliLoader(files, labels, train, batch_size, resolution, shard_id, num_shards, seed, max(1, workers),
                      _dali_device_id(device), channels_last)


def _dali_device_id(device: Optional[str]) -> Optional[int]:
    """DALI's device_id: the current CUDA device for "cuda" (default when one is available), None for "cpu"."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    return torch.cuda.current_device() if device == "cuda" else None


def load_imagenet_data(seed: int = 0, heldout: int = 50_000, val: int = 10_000, resolution: int = 224,
                       augment: bool = True, root: Optional[str] = None, run_dir: Optional[str] = None,
                       cache: Optional[str] = None, heldout_per_class: Optional[int] = None,
                       heldout_fraction: Optional[float] = None, threads: Optional[int] = None,
                       loader: str = "auto", device: Optional[str] = None, channels_last: bool = False,
                       index: Optional[FileIndex] = None) -> SearchData:
    """The search's data from an ImageNet-layout tree, as random-access splits (the engine's
    `ImageSplit`) decoded by DALI (`loader="dali"`; `device="cuda"` decodes on the GPU and returns GPU
    tensors) or by PIL threads (`"folder"`); "auto" picks DALI when installed. Held-out size:
    `heldout_per_class`, or `heldout_fraction` of train/, or else `heldout` in total (divided evenly
    over the classes). Validation: val/ when the tree has one,
    else `val` images carved from train/ the same balanced way. The split is saved in / reloaded from
    `run_dir`."""
    if root is None:
        raise ValueError("the imagenet data set needs root=<folder with train/<class>/...>")
    index = index or build_index(root, cache=cache)
    if heldout_per_class is None and heldout_fraction is None:
        heldout_per_class = heldout // index.num_classes
        if heldout_per_class < 1:
            raise ValueError(f"a held-out split of {heldout} cannot give every one of {index.num_classes} classes an image")
    per_class = per_class_count(index, heldout_per_class, heldout_fraction)
    val_per_class = 0 if index.val is not None else max(1, val // index.num_classes)
    split = load_or_make_split(index, run_dir, per_class, val_per_class, seed)
    kind = resolve_loader(loader)
    if kind == "dali":
        from .dali import DaliSplit
        device_id = _dali_device_id(device)

        def make(positions, part, aug):
            return DaliSplit(index, positions, resolution, part, aug, threads or 2, device_id, channels_last)
    else:
        if device == "cuda":
            raise ValueError("the folder loader decodes on the CPU; use loader='dali' for GPU decoding")

        def make(positions, part, aug):
            return FolderSplit(index, positions, resolution, part, aug, threads, channels_last)
    train = make(split.train, "train", augment)
    held = make(split.heldout, "train", False)
    valid = make(range(len(index.val)), "val", False) if index.val is not None else make(split.val, "train", False)
    validate_labels("weight-train", train.labels)
    return SearchData(train=train, heldout=held, val=valid, num_classes=index.num_classes, resolution=resolution)


register_dataset("imagenet", load_imagenet_data)

__all__ = ["FileIndex", "FolderLoader", "FolderSplit", "LOADERS", "ShardSampler", "Split", "build_index",
           "dali_available", "default_cache_path", "load_imagenet_data", "load_or_make_split", "make_loader",
           "make_split", "per_class_count", "resolve_loader", "shard_range", "write_report"]
