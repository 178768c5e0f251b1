"""The image transforms, one definition for both loaders: training = random-resized-crop (scale
0.08-1, aspect 3/4-4/3, torchvision's 10 attempts then centre-crop fallback) + horizontal flip +
normalise; evaluation = resize the shorter side to resolution / 0.875 + centre crop + normalise.
Both are expressed as a window of the source image resized to resolution x resolution, so the PIL and
the DALI random-access splits, given the same window, produce the same pixels up to interpolation."""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
from PIL import Image

MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875


def random_resized_crop_window(width: int, height: int, uniform) -> Tuple[int, int, int, int]:
    """(left, top, w, h) of a random-resized-crop window; `uniform(lo, hi)` draws one float."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * uniform(*SCALE)
        ratio = math.exp(uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = min(int(uniform(0, width - w + 1)), width - w)
            top = min(int(uniform(0, height - h + 1)), height - h)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def eval_resize_size(resolution: int) -> int:
    return int(round(resolution / EVAL_CROP_FRACTION))


def open_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def eval_window(width: int, height: int) -> Tuple[int, int, int, int]:
    """(left, top, w, h) of the evaluation crop in source pixels: the centred square that resizing the
    shorter side to resolution / 0.875 and centre-cropping `resolution` would keep."""
    side = max(1, int(round(min(width, height) * EVAL_CROP_FRACTION)))
    return (width - side) // 2, (height - side) // 2, side, side


def crop_resize(img: Image.Image, window, flip: bool, resolution: int) -> np.ndarray:
    """Resizes the window (left, top, w, h) of `img` to resolution x resolution, then optionally flips."""
    left, top, w, h = window
    img = img.resize((resolution, resolution), Image.BILINEAR, box=(left, top, left + w, top + h))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.array(img)


def to_normalized_tensor(images, channels_last: bool = False) -> torch.Tensor:
    """A list of H x W x 3 uint8 arrays -> N x 3 x H x W float, normalised (NHWC memory when channels_last)."""
    x = torch.from_numpy(np.stack(images)).float()
    x = (x - torch.tensor(MEAN)) / torch.tensor(STD)
    x = x.permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()
