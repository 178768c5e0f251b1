"""The class-balanced held-out split: an equal number of train/ images per class is set aside to
train the architecture parameters (50 per class = 50,000 on ImageNet); the rest train the weights.
When the tree has no val/ folder, a validation split is carved out the same way.

The split is drawn from a seed over the index (files in sorted order), saved as JSON in the run
directory and reloaded on resume; a reload verifies that its files still exist in the index with the
same labels, so a resume can never leak held-out images into weight training.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import List, Optional

import numpy as np

from ...runs.files import SPLIT, write_json
from .index import FileIndex

SPLIT_FILE = SPLIT  # in the run directory


@dataclass
class Split:
    """Positions into `index.train`: `train` (weights), `heldout` (alpha), `val` (empty when val/ exists)."""
    train: List[int]
    heldout: List[int]
    val: List[int]
    heldout_per_class: int
    val_per_class: int
    seed: int
    fingerprint: str


def per_class_count(index: FileIndex, per_class: Optional[int] = None, fraction: Optional[float] = None) -> int:
    """The held-out count per class, from a count or a fraction of the train/ images."""
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of per_class and fraction")
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
        per_class = max(1, round(fraction * len(index.train) / index.num_classes))
    if per_class < 1:
        raise ValueError(f"held-out count per class must be >= 1, got {per_class}")
    return int(per_class)


def make_split(index: FileIndex, heldout_per_class: int, val_per_class: int = 0, seed: int = 0) -> Split:
    labels = np.asarray(index.train.labels)
    counts = np.bincount(labels, minlength=index.num_classes)
    need = heldout_per_class + val_per_class
    total = need * index.num_classes
    if total >= len(labels):
        raise ValueError(f"the held-out ({heldout_per_class}/class) and validation ({val_per_class}/class) splits "
                         f"need {total} images but train/ has only {len(labels)}, leaving nothing to train the weights")
    short = [(index.classes[c], int(n)) for c, n in enumerate(counts) if n <= need]
    if short:
        raise ValueError(f"{len(short)} class(es) have too few images for {heldout_per_class} held-out + {val_per_class} "
                         f"validation per class plus at least one to train on: {short[:10]}")
    rng = np.random.Generator(np.random.PCG64(seed))
    train, heldout, val = [], [], []
    for c in range(index.num_classes):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        heldout += members[:heldout_per_class].tolist()
        val += members[heldout_per_class:need].tolist()
        train += members[need:].tolist()
    return Split(sorted(train), sorted(heldout), sorted(val), heldout_per_class, val_per_class, seed,
                 index.fingerprint)


def save_split(split: Split, index: FileIndex, path: str) -> None:
    d = asdict(split)
    # The file names make the saved split checkable (and readable) independently of positions.
    d["heldout_files"] = [index.train.files[i] for i in split.heldout]
    d["val_files"] = [index.train.files[i] for i in split.val]
    write_json(path, d, indent=None, newline=False, separators=(",", ":"))


def load_split(index: FileIndex, path: str) -> Split:
    """Reloads a saved split against the current index. Same tree: positions are reused. Changed tree:
    positions are rebuilt from the saved file names; a held-out or validation file that has gone is an
    error, because the weights may already have trained on its replacement."""
    with open(path) as f:
        d = json.load(f)
    if d["fingerprint"] == index.fingerprint:
        return Split(d["train"], d["heldout"], d["val"], d["heldout_per_class"], d["val_per_class"], d["seed"],
                     d["fingerprint"])
    position = {f: i for i, f in enumerate(index.train.files)}
    missing = [f for f in d["heldout_files"] + d["val_files"] if f not in position]
    if missing:
        raise ValueError(f"the saved split {path} does not match the data: {len(missing)} of its held-out/validation "
                         f"files are no longer in the index (e.g. {missing[:3]}); start a new run directory")
    heldout = sorted(position[f] for f in d["heldout_files"])
    val = sorted(position[f] for f in d["val_files"])
    taken = set(heldout) | set(val)
    warnings.warn(f"the tree changed since {path} was written; the saved held-out files are kept and every other "
                  f"indexed image trains the weights")
    return Split([i for i in range(len(index.train)) if i not in taken], heldout, val, d["heldout_per_class"],
                 d["val_per_class"], d["seed"], index.fingerprint)


def load_or_make_split(index: FileIndex, run_dir: Optional[str], heldout_per_class: int, val_per_class: int = 0,
                       seed: int = 0) -> Split:
    """The split saved in `run_dir` when there is one (its settings must match), else a new one, saved
    there. `run_dir=None` makes a split without saving it."""
    path = os.path.join(run_dir, SPLIT_FILE) if run_dir else None
    if path and os.path.exists(path):
        split = load_split(index, path)
        asked = (heldout_per_class, val_per_class, seed)
        saved = (split.heldout_per_class, split.val_per_class, split.seed)
        if asked != saved:
            raise ValueError(f"{path} was made with (held-out/class, val/class, seed) = {saved}, but {asked} was "
                             f"asked; resume with the same settings or use a new run directory")
        return split
    split = make_split(index, heldout_per_class, val_per_class, seed)
    if path:
        save_split(split, index, path)
    return split
