"""ImageNet-layout data for the search and retraining: a validated, cached file index; the
class-balanced held-out split; random-access splits decoded by DALI (optional, `DaliSplit`) or by PIL
threads (`FolderSplit`) with the same transforms.

`load_imagenet_data` returns a SearchData of those splits; the engine reads each through a
`BatchStream` (data/stream.py) in a `BatchOrder`'s order, each rank taking its share of every global
batch, decoded ahead of the model in a thread.

    index = build_index("/data/imagenet")                          # validated, cached
    data = load_imagenet_data(root="/data/imagenet", run_dir=run_dir, heldout_per_class=50, loader="auto",
                              index=index)                         # SearchData; split saved in run_dir
    stream = BatchStream(data.train, BatchOrder(len(data.train), 256, seed=0), train=True,
                         generator=torch.Generator().manual_seed(0))
    x, y = stream.next()                                           # 256 x 3 x 224 x 224, labels
    stream.close()
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..base import SearchData, register_dataset, validate_labels
from .folder import FolderSplit
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

__all__ = ["FileIndex", "FolderSplit", "LOADERS", "Split", "build_index", "dali_available", "default_cache_path",
           "load_imagenet_data", "load_or_make_split", "make_split", "per_class_count", "resolve_loader",
           "write_report"]
