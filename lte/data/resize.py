"""lte-train resize-images SRC DST [--size 256] [--quality 90] [--classes FILE] [--processes N]

Writes a copy of an image folder (SRC/train, SRC/val, a folder per class) whose images have their
shorter side at most --size pixels (never enlarged), as JPEG. Decoding cost grows with the pixels
of the source, so training from such a copy needs fewer host cores per image/s (docs/data.md, "Keeping
the device fed"); training at 224 px from a copy at 256 keeps RandomResizedCrop's full range of crops.
Files already in DST are skipped, so an interrupted run can be restarted.
"""
from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import Pool
from pathlib import Path

from ..errors import UserError
from .imagefolder import read_class_list, scan_split


def resize_one(job: tuple[str, str, int, int]) -> str | None:
    """Resize one file; returns an error message instead of raising (one bad file must not stop the rest)."""
    from PIL import Image

    src, dst, size, quality = job
    if os.path.exists(dst):
        return None
    try:
        with Image.open(src) as image:
            image.draft("RGB", (size, size))  # DCT-scaled decode, never below size on the shorter side
            image = image.convert("RGB")
            scale = size / min(image.size)
            if scale < 1:
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.BICUBIC, reducing_gap=None)
            tmp = dst + ".part"
            image.save(tmp, "JPEG", quality=quality)
            os.replace(tmp, dst)
    except (OSError, ValueError, SyntaxError) as exc:
        return f"{src}: {exc}"
    return None


def resize_folder(src: str, dst: str, size: int = 256, quality: int = 90, classes: str | None = None,
                  processes: int | None = None) -> int:
    """Resize every image of src/train and src/val into dst; returns the number of files written or kept."""
    source, target = Path(src), Path(dst)
    for split in ("train", "val"):
        if not (source / split).is_dir():
            raise UserError(f"resize-images: {source} has no {split}/ folder")
    names, listed_in = read_class_list(classes) if classes else (None, None)
    jobs = []
    for split in ("train", "val"):
        try:
            found, paths, _ = scan_split(source / split, names, listed_in)
        except (ValueError, FileNotFoundError) as exc:
            raise UserError(f"resize-images: {exc}") from None
        for name in found:
            (target / split / name).mkdir(parents=True, exist_ok=True)
        for rel in paths:
            rel = os.fsdecode(rel)
            jobs.append((str(source / split / rel), str((target / split / rel).with_suffix(".jpg")), size, quality))
    with Pool(processes) as pool:
        errors = [e for e in pool.imap_unordered(resize_one, jobs, chunksize=64) if e]
    if errors:
        raise UserError(f"resize-images: {len(errors)} file(s) could not be read, first: {errors[0]}")
    return len(jobs)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lte-train resize-images", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--size", type=int, default=256, help="shorter side at most this (pixels)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--classes", default=None, help="a class list file (or imagenet100): copy only these")
    parser.add_argument("--processes", type=int, default=None, help="worker processes (default: every core)")
    args = parser.parse_args(argv)
    try:
        count = resize_folder(args.src, args.dst, args.size, args.quality, args.classes, args.processes)
    except UserError as exc:
        print(f"lte-train: error: {exc}", file=sys.stderr)
        return 2
    print(f"{count} images in {args.dst}")
    return 0
