"""The one way the commands get their images: a search's splits (and a finished search's, for scoring it),
and a retraining's. Digits, cluttered digits, an ImageNet-layout folder decoded by DALI or PIL threads:
the source is named once (`data_source`); a folder's split is saved in the run directory and reloaded
when the run continues; AutoAugment is a transform of the training split."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from ..runs import files
from .base import ImageSplit, SearchData, build_data, load_test_split


def data_source(dataset: str, data: Optional[str]) -> str:
    """The data set a run uses: --data (a folder) switches the default digits to imagenet."""
    return "imagenet" if data is not None and dataset == "digits" else dataset


def _imagenet(root: str, run_dir: Optional[str], is_main: bool):
    """The folder's file index (cached), its excluded files reported in the run directory (rank 0)."""
    from . import imagenet  # registers the source; DALI is imported only if used
    index = imagenet.build_index(root)
    if run_dir and is_main:
        imagenet.write_report(index, os.path.join(run_dir, files.EXCLUDED_FILES))
    return imagenet, index


def search_data(config: Mapping, run_dir: str, device_type: str = "cpu", is_main: bool = True) -> SearchData:
    """A search's weight-train / held-out / validation splits, from its configuration (`config`: the search's
    settings as saved in config.json), at its space's resolution. The same call sets up a search and loads a
    finished one to score it."""
    from ..space import SPACES
    resolution = config["resolution"] or SPACES[config["space"]].resolution
    dataset = data_source(config["dataset"], config["data"])
    kwargs = dict(seed=config["seed"], heldout=config["heldout"], val=config["val"], resolution=resolution,
                  augment=config["augment"], root=config["data"])
    if dataset == "imagenet":
        _, index = _imagenet(config["data"], run_dir, is_main)
        kwargs.update(index=index, run_dir=run_dir, loader=config["loader"],
                      heldout_per_class=config["heldout_per_class"], channels_last=device_type == "cuda",
                      device="cuda" if device_type == "cuda" else "cpu")
    return build_data(dataset, **kwargs)


@dataclass
class TrainingData:
    """A retraining's images: `train` (every training image, the search's held-out ones included) and
    `scored` (the split every epoch is scored on), with the normalisation the training images carry."""
    train: ImageSplit
    scored: ImageSplit
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


def training_data(dataset: str, root: Optional[str], *, seed: int, val: Optional[int], score_split: str,
                  resolution: int, loader: str = "auto", run_dir: Optional[str] = None, autoaugment: bool = False,
                  is_main: bool = True) -> TrainingData:
    """An embedded data set (`root` None): every image outside the scored split trains, scored on a `val`
    carve-out drawn by `seed` from the images the searches split too, or (`score_split="test"`) on its fixed
    test split. A folder: train/ trains, scored on val/ or a class-balanced carve-out of `val` images (saved
    in `run_dir`, reloaded when the run continues)."""
    if root is None:
        test = score_split == "test"
        d = build_data(dataset, seed=seed, heldout=1, val=0 if test else val, resolution=resolution, augment=True,
                       root=None)
        data = TrainingData(d.train.joined(d.heldout), load_test_split(dataset, resolution) if test else d.val,
                            d.num_classes, (127.5,) * 3, (127.5,) * 3)
    else:
        imagenet, index = _imagenet(root, run_dir, is_main)
        from .imagenet.transforms import MEAN, STD
        kind = imagenet.resolve_loader(loader, verbose=is_main)
        val_per_class = 0 if index.val is not None else max(1, val // index.num_classes)
        split = imagenet.load_or_make_split(index, run_dir, max(val_per_class, 1), 0, seed)
        if kind == "dali":
            from .imagenet.dali import DaliSplit as Split
        else:
            from .imagenet.folder import FolderSplit as Split
        train_positions = range(len(index.train)) if index.val is not None else split.train
        train = Split(index, train_positions, resolution, "train", True)
        scored = Split(index, range(len(index.val)), resolution, "val", False) if index.val is not None \
            else Split(index, split.heldout, resolution, "train", False)
        data = TrainingData(train, scored, index.num_classes, MEAN, STD)
    if autoaugment:
        from .augment import AutoAugmentSplit
        data.train = AutoAugmentSplit(data.train, data.mean, data.std)
    return data


__all__ = ["TrainingData", "data_source", "load_test_split", "search_data", "training_data"]
