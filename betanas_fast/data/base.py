"""The split interface, deterministic batch order, and the data-set registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch


class ImageSplit:
    """A split of labelled images addressed by index. `batch` returns (images N x C x H x W float,
    labels N long); `train=True` applies training augmentation drawn from `generator`. `decodes`: a batch
    costs real work (reading and decoding files), worth doing ahead of the model in a thread."""
    labels: torch.Tensor
    decodes = False

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, indices: torch.Tensor, train: bool, generator: Optional[torch.Generator] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TensorSplit(ImageSplit):
    """A split held in memory; augmentation is a random translation by up to `shift` pixels. `indices`: where
    its images sit in the data set they were taken from (their identity), when known."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int = 0,
                 indices: Optional[torch.Tensor] = None):
        if indices is not None and len(indices) != len(labels):
            raise ValueError(f"{len(indices)} indices for a split of {len(labels)} images")
        self.images, self.labels, self.shift, self.indices = images, labels, shift, indices

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices, train, generator=None):
        x, y = self.images[indices], self.labels[indices]
        if train and self.shift > 0:
            s, (n, _, h, w) = self.shift, x.shape
            padded = torch.nn.functional.pad(x, (s, s, s, s), value=float(x.min()))
            off = torch.randint(0, 2 * s + 1, (n, 2), generator=generator).tolist()
            x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(off)])
        return x, y

    def joined(self, other: "TensorSplit") -> "TensorSplit":
        """This split and `other` as one (the retraining's weight-training images: the search's weight-training
        and held-out splits)."""
        return TensorSplit(torch.cat([self.images, other.images]), torch.cat([self.labels, other.labels]), self.shift,
                           indices=torch.cat([self.indices, other.indices]))


@dataclass
class SearchData:
    train: ImageSplit
    heldout: ImageSplit
    val: ImageSplit
    num_classes: int
    resolution: int
    in_channels: int = 3


class BatchOrder:
    """Endless shuffled batches over one split, reshuffled each epoch from its own generator. Its state
    is the generator's state at the start of the epoch plus the position: a few kilobytes whatever the
    split's size (the permutation is drawn again on restore), so it can be snapshotted every batch."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if size < batch_size:
            raise ValueError(f"a split of {size} samples cannot fill a batch of {batch_size}")
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_start = self.generator.get_state()
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0
        self.epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size  # drop_last: equal batch sizes keep BN statistics comparable

    def next_indices(self) -> torch.Tensor:
        if self.epoch < 0 or self.pos + self.batch_size > self.size:
            self.epoch_start = self.generator.get_state()
            self.perm = torch.randperm(self.size, generator=self.generator)
            self.pos, self.epoch = 0, self.epoch + 1
        idx = self.perm[self.pos:self.pos + self.batch_size].clone()
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"epoch_start": self.epoch_start.clone(), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, d: dict) -> None:
        self.pos, self.epoch = int(d["pos"]), int(d["epoch"])
        self.epoch_start = d["epoch_start"].clone()
        self.generator.set_state(self.epoch_start)
        self.perm = torch.randperm(self.size, generator=self.generator) if self.epoch >= 0 \
            else torch.empty(0, dtype=torch.long)


def network_input(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Grey images N x H x W in [0, 1] -> N x 3 x resolution x resolution in [-1, 1] (resized bilinearly where
    H != resolution)."""
    x = x[:, None]
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def fixed_test_indices(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """The first `per_class` images of each class in one fixed permutation (every image of a class that has no
    more), ascending: a test split that no run's seed moves."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    picked = [perm[labels[perm] == c][:per_class] for c in torch.unique(labels).tolist()]
    return torch.sort(torch.cat(picked)).values


def search_splits(labels: torch.Tensor, test: torch.Tensor, seed: int, heldout: int, val: int,
                  min_train: int = 1) -> Dict[str, torch.Tensor]:
    """The index sets {"test", "heldout", "val", "train"}: the images outside `test` permuted by `seed` into
    held-out, validation and weight-training ones (at least `min_train` of those)."""
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[test] = False
    pool = torch.nonzero(keep).flatten()
    n = len(pool)
    if heldout < 1 or val < 0:
        raise ValueError(f"held-out size must be >= 1 and validation >= 0 (got {heldout}, {val})")
    if heldout + val + min_train > n:
        raise ValueError(f"held-out ({heldout}) + validation ({val}) splits need {heldout + val} samples but the "
                         f"data set has only {n} besides its {len(test)}-image test split, leaving "
                         f"{'nothing' if heldout + val >= n else 'too few'} to train the weights")
    perm = pool[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return {"test": test, "heldout": perm[:heldout], "val": perm[heldout:heldout + val],
            "train": perm[heldout + val:]}


def validate_labels(name: str, labels: torch.Tensor) -> None:
    if len(labels) == 0:
        raise ValueError(f"the {name} split is empty")
    if torch.unique(labels).numel() < 2:
        raise ValueError(f"the {name} split has a single class; classification needs at least two")


@dataclass(frozen=True)
class Dataset:
    """A registered data source. `load(seed=, heldout=, val=, resolution=, augment=, root=)` -> SearchData;
    `test(resolution)` -> the fixed test split no search loads, for the embedded sets that set one apart;
    `splits`: what defines the splits (a study records it and refuses to continue under another)."""
    name: str
    load: Callable[..., SearchData]
    test: Optional[Callable[[int], TensorSplit]] = None
    splits: Optional[dict] = None


_REGISTRY: Dict[str, Dataset] = {}
# The data sets shipped with the package (or its extras), each with a fixed test split that no search loads.
EMBEDDED = ("digits", "mnist-cluttered")
# Data sets whose module is imported only when named (its dependencies are optional).
_LAZY = {"mnist-cluttered": "betanas_fast.data.cluttered", "imagenet": "betanas_fast.data.imagenet"}


def register_dataset(name: str, loader: Callable[..., SearchData], test: Optional[Callable[[int], TensorSplit]] = None,
                     splits: Optional[dict] = None) -> None:
    _REGISTRY[name] = Dataset(name, loader, test, splits)


def dataset_names() -> Tuple[str, ...]:
    return tuple(sorted(set(_REGISTRY) | set(_LAZY)))


def get_dataset(name: str) -> Dataset:
    if name not in _REGISTRY and name in _LAZY:
        import importlib
        importlib.import_module(_LAZY[name])  # registers it
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(dataset_names())}")
    return _REGISTRY[name]


def build_data(name: str, **kwargs) -> SearchData:
    return get_dataset(name).load(**kwargs)


def load_test_split(name: str, resolution: int) -> TensorSplit:
    """The fixed test split of an embedded data set."""
    d = get_dataset(name)
    if d.test is None:
        raise ValueError(f"the {name} data set sets no test split apart")
    return d.test(resolution)
