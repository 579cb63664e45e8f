"""Images on disk in torchvision's folder layout, as ImageNet is usually kept:

    root/train/<class>/<image>    root/val/<class>/<image>

data.name=imagefolder, data.args: root, image_size (224), workers (DataLoader processes; null: one
per core but one, at most 16), classes (a file listing class folder names, one per line, to train
on a subset; `imagenet100` names the bundled ImageNet100 list of Tian et al.'s CMC), fast_decode
(JPEG DCT-scaled decoding of large crops, default on). Classes are numbered in sorted name order,
as torchvision's ImageFolder numbers them. Decoding and augmentation run in the workers
(lte.data.vision); the folder is scanned once, in the process that builds the data.

`lte-train resize-images SRC DST --size 256` writes a copy whose shorter sides are at most 256
pixels: the fast path for hosts whose cores cannot decode full-size images at the rate the device
trains (docs/data.md, "Keeping the device fed").
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import DataBundle
from .vision import ImageSet, Normalize

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BUNDLED_CLASSES = Path(__file__).with_name("classes")


def read_class_list(classes: str) -> tuple[list[str], str]:
    """Class folder names from a file (one per line; '#' comments; a name may be followed by a
    description), or from a bundled list by name. Returns the names and where they came from."""
    path = Path(classes)
    if not path.is_file() and (BUNDLED_CLASSES / f"{classes}.txt").is_file():
        path = BUNDLED_CLASSES / f"{classes}.txt"
    if not path.is_file():
        bundled = sorted(p.stem for p in BUNDLED_CLASSES.glob("*.txt"))
        raise FileNotFoundError(f"classes: no class list file {classes!r} (a path, or one of {bundled})")
    names = [line.split("#")[0].split()[0] for line in path.read_text().splitlines() if line.split("#")[0].strip()]
    if not names:
        raise ValueError(f"classes: {path} lists no class")
    if len(set(names)) != len(names):
        raise ValueError(f"classes: {path} lists a class twice")
    return names, str(path)


def scan_split(split_dir: Path, classes: list[str] | None,
               listed_in: str | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(class names, relative paths as bytes, labels) of one split; one-line errors for what is missing."""
    if classes is None:
        classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
        if not classes:
            raise ValueError(f"root: {split_dir} has no class folder (expected {split_dir}/<class>/<images>)")
    else:
        missing = [c for c in classes if not (split_dir / c).is_dir()]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise FileNotFoundError(f"classes: {listed_in} names {len(missing)} class(es) with no folder in "
                                    f"{split_dir}: {shown}")
        classes = sorted(classes)
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(e.name for e in os.scandir(split_dir / name)
                       if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
        if not files:
            raise ValueError(f"root: class folder {split_dir / name} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        paths += [os.fsencode(f"{name}/{f}") for f in files]
        labels += [label] * len(files)
    # numpy arrays, not lists of str: cheap to pickle to worker processes and not copied on fork
    label_dtype = np.int16 if len(classes) < 2**15 else np.int32
    return classes, np.array(paths, dtype=np.bytes_), np.array(labels, dtype=label_dtype)


class ImageFiles(ImageSet):
    """One split of an image folder: the files of each class, decoded and augmented on demand."""

    def __init__(self, split_dir: Path, classes: list[str] | None, listed_in: str | None, *, train: bool,
                 image_size: int, fast_decode: bool):
        super().__init__(train=train, image_size=image_size, crop_fraction=224 / 256, fast_decode=fast_decode)
        self.root = str(split_dir)
        self.classes, self.paths, self.labels = scan_split(split_dir, classes, listed_in)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[i]))

    def open(self, i: int):
        from PIL import Image

        path = self.path(i)
        try:
            return Image.open(path)
        except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
            raise DataError(f"cannot read image {path}: {exc}") from None

    def load(self, i: int, key: int | None) -> np.ndarray:
        try:
            return super().load(i, key)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt past the header
            raise DataError(f"cannot read image {self.path(i)}: {exc}") from None


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cores - 1))


def imagefolder(root: str, image_size: int = 224, workers: int | None = None, classes: str | None = None,
                fast_decode: bool = True) -> DataBundle:
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"root: {base} does not exist (expected {base}/train/<class>/<images> and "
                                f"{base}/val/<class>/<images>)")
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise FileNotFoundError(f"root: {base} has no {split}/ folder (expected {base}/train/<class>/<images> "
                                    f"and {base}/val/<class>/<images>)")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be an integer >= 0 or null, got {workers!r}")
    names, listed_in = read_class_list(classes) if classes is not None else (None, None)
    train = ImageFiles(base / "train", names, listed_in, train=True, image_size=image_size, fast_decode=fast_decode)
    val = ImageFiles(base / "val", train.classes, listed_in or f"{base / 'train'}", train=False,
                     image_size=image_size, fast_decode=fast_decode)
    return DataBundle(train=train, eval=val, task="classification",
                      model_args={"num_classes": len(train.classes), "img_size": image_size, "in_chans": 3},
                      workers=default_workers() if workers is None else workers, device_transform=Normalize())
