"""Image classification sets: the standard ImageNet transforms, seeded per sample.

Training: RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3) to image_size, then a horizontal flip
with probability 1/2. Evaluation: resize the shorter side to image_size / crop_fraction and take
the centre image_size square (224 of 256 for ImageNet). Both are a PIL crop then resize (bilinear,
antialiased), computed from the source image's size before it is decoded, so a JPEG whose crop is
at least twice the output size is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
`fast_decode`), which is most of the cost saved for large images.

The random parameters of sample i come from its augmentation key alone (`random.Random(key)`),
never from a global generator: the same key gives the same crop in any process, so augmentation
is reproducible across modes and restarts, and gathering in the training process leaves the
trainer's RNG untouched.

gather() returns uint8 images, B x H x W x 3, and the labels; `Normalize` (the bundle's
device_transform) turns them into normalized float B x 3 x H x W on the device.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = tuple[float, float, float, float]  # left, top, right, bottom in source pixels


def random_resized_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0),
                       ratio=(3 / 4, 4 / 3)) -> Box:
    """A crop covering a random fraction `scale` of the area with aspect ratio in `ratio` (log-uniform),
    as torchvision's RandomResizedCrop draws it: 10 tries, then the largest centred crop in `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_box(width: int, height: int, size: int, crop_fraction: float) -> Box:
    """The source region that `resize(shorter side -> size / crop_fraction)` then `center_crop(size)` keeps."""
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def crop_resize(image, box: Box, size: int, fast_decode: bool, flip: bool = False) -> np.ndarray:
    """`box` of a PIL image (opened, maybe not yet decoded) resized to size x size (then mirrored
    left-right if `flip`), as uint8 H x W x 3."""
    from PIL import Image

    if fast_decode and image.format == "JPEG":
        shrink = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
        if shrink >= 2:  # draft picks the largest DCT scale that keeps the image >= the requested size
            width, height = image.size
            image.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
            fx, fy = image.size[0] / width, image.size[1] / height
            box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    if image.mode != "RGB":
        image = image.convert("RGB")
    # crop, then resize: exactly torchvision's resized_crop on a PIL image (a resize with box= would
    # also blend in the pixels just outside the box)
    out = image.crop(tuple(int(round(v)) for v in box)).resize((size, size), Image.BILINEAR, reducing_gap=None)
    if flip:  # in PIL: a numpy view with a negative stride would make the batch copy slow
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


class ImageSet:
    """Labelled images with the standard transforms. Subclasses provide len(), `labels` and
    open(i) -> PIL image (and what to call sample i in an error message)."""

    def __init__(self, *, train: bool, image_size: int, crop_fraction: float, fast_decode: bool):
        self.train, self.image_size = train, image_size
        self.crop_fraction, self.fast_decode = crop_fraction, fast_decode

    labels: np.ndarray

    def open(self, i: int):
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int, key: int | None) -> np.ndarray:
        image = self.open(i)
        try:
            width, height = image.size
            if self.train:
                rng = random.Random(key if key is not None else i)
                box = random_resized_box(width, height, rng)
                return crop_resize(image, box, self.image_size, self.fast_decode, flip=rng.random() < 0.5)
            box = center_box(width, height, self.image_size, self.crop_fraction)
            return crop_resize(image, box, self.image_size, self.fast_decode)
        finally:
            image.close()

    def gather(self, idx, keys=None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long).tolist()
        keys = [None] * len(idx) if keys is None else torch.as_tensor(keys).tolist()
        out = torch.empty(len(idx), self.image_size, self.image_size, 3, dtype=torch.uint8)
        view = out.numpy()
        for row, (i, key) in enumerate(zip(idx, keys)):
            view[row] = self.load(i, key)
        return out, torch.from_numpy(self.labels[idx].astype(np.int64))


class Normalize:
    """uint8 B x H x W x 3 -> float B x 3 x H x W, (x / 255 - mean) / std: a device_transform."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = tuple(mean), tuple(std)
        self._cache: dict = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = x.device
        if key not in self._cache:
            self._cache[key] = (torch.tensor(self.mean, device=x.device).mul(255).view(1, 3, 1, 1),
                                torch.tensor(self.std, device=x.device).mul(255).view(1, 3, 1, 1))
        mean, std = self._cache[key]
        return ((x.permute(0, 3, 1, 2).float() - mean) / std).contiguous()
