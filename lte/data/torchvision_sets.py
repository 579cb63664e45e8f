"""CIFAR-10, CIFAR-100 and STL-10 through torchvision, at the paper's training size (224 px).

data.name=cifar10 | cifar100 | stl10, data.args: root (where torchvision keeps or puts the files),
download (false by default: nothing is fetched unless asked), image_size (224), workers. The
images are upscaled with the standard transforms (lte.data.vision): RandomResizedCrop + flip for
training; for evaluation the whole image resized to image_size (no centre crop of a 32 px image).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DataBundle
from .imagefolder import default_workers
from .vision import IMAGENET_MEAN, IMAGENET_STD, ImageSet, Normalize

# name: (torchvision class, folder it reads under root, archive size, mean, std)
SETS = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "163 MB", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", "cifar-100-python", "161 MB", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ("STL10", "stl10_binary", "2.6 GB", IMAGENET_MEAN, IMAGENET_STD),
}


class ArrayImages(ImageSet):
    """uint8 images held in memory (N x H x W x 3) with their labels."""

    def __init__(self, images: np.ndarray, labels, *, train: bool, image_size: int):
        super().__init__(train=train, image_size=image_size, crop_fraction=1.0, fast_decode=False)
        self.images, self.labels = np.ascontiguousarray(images), np.asarray(labels, dtype=np.int16)

    def open(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i])


def load_split(name: str, root: str, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(images N x H x W x 3 uint8, labels, number of classes) of one split, via torchvision."""
    import torchvision.datasets as tvd

    cls_name, folder, size, _, _ = SETS[name]
    cls = getattr(tvd, cls_name)
    split = {"split": "train" if train else "test"} if name == "stl10" else {"train": train}
    try:
        ds = cls(root=root, download=download, **split)
    except RuntimeError as exc:
        if "not found" not in str(exc).lower():
            raise
        raise FileNotFoundError(
            f"root: no {name} files in {Path(root) / folder} (torchvision's layout: the extracted archive); "
            f"set data.args.download=true to fetch it ({size}) or extract it there yourself") from None
    images = np.asarray(ds.data)
    if name == "stl10":
        images = images.transpose(0, 2, 3, 1)  # stored N x 3 x H x W
    labels = np.asarray(ds.labels if name == "stl10" else ds.targets)
    return images, labels, len(ds.classes)


def _builder(name: str):
    def build(root: str, download: bool = False, image_size: int = 224, workers: int | None = None) -> DataBundle:
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if not isinstance(download, bool):
            raise ValueError(f"download must be true or false, got {download!r}")
        x_train, y_train, classes = load_split(name, root, True, download)
        x_test, y_test, _ = load_split(name, root, False, download)
        _, _, _, mean, std = SETS[name]
        return DataBundle(train=ArrayImages(x_train, y_train, train=True, image_size=image_size),
                          eval=ArrayImages(x_test, y_test, train=False, image_size=image_size),
                          task="classification",
                          model_args={"num_classes": classes, "img_size": image_size, "in_chans": 3},
                          workers=default_workers() if workers is None else workers,
                          device_transform=Normalize(mean, std))

    build.__name__ = name
    build.__doc__ = f"{name} through torchvision (root, download=False, image_size=224, workers)."
    return build


cifar10, cifar100, stl10 = (_builder(n) for n in ("cifar10", "cifar100", "stl10"))
