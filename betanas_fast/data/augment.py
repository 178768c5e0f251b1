"""Augmentation as a transform of a split: torchvision's AutoAugment on a training split's decoded images."""
from __future__ import annotations

import torch


class AutoAugmentSplit:
    """A training split with torchvision's AutoAugment (ImageNet policy) on each decoded image: undo the
    normalisation, augment as uint8, normalise again. Its randomness is drawn from the stream's generator
    (torchvision draws from torch's global generator, which is forked and seeded per batch)."""

    def __init__(self, split, mean, std):
        from torchvision.transforms import AutoAugment, AutoAugmentPolicy
        self.split, self.policy = split, AutoAugment(AutoAugmentPolicy.IMAGENET)
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.labels = split.labels
        self.decodes = True  # per-image augmentation: worth doing ahead of the model

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, indices, train, generator=None):
        x, y = self.split.batch(indices, train, generator)
        if not train:
            return x, y
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            img = (x * self.std + self.mean).round().clamp(0, 255).to(torch.uint8)
            img = torch.stack([self.policy(i) for i in img])
        return ((img.float() - self.mean) / self.std).contiguous(memory_format=torch.contiguous_format), y
