"""Image loading throughput: images/s decoded and augmented by the trainer's own pipeline
(lte.data.imagefolder through TrainBatches: per-head streams, DataLoader workers, chunked steps,
uint8 batches) with 0 (in-process), 1, 2, 4... worker processes. This is the host's work; the
normalization (the bundle's device_transform) runs on the device and is left out.

    python benchmarks/data.py                 # generates ImageNet-sized JPEGs, then measures
    python benchmarks/data.py --dry-run       # tiny, to check it runs

Three sources are measured: JPEGs of ImageNet's typical size (500 x 375, quality 90, ~110 KB like
ImageNet's average file) decoded whole; the same with fast_decode (DCT-scaled decoding of large
crops); and the copy `lte-train resize-images --size 256` makes (the fast path). Generated images
are smooth random fields plus noise, so their JPEGs cost about what photographs cost to decode.
Timings depend on the host's load: the load average is recorded next to every figure, and the
in-process run (0 workers) also reports CPU milliseconds per image, which the load barely moves:
cores needed for a rate R = R x that / 1000.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common import loadavg, machine, write_json
from lte.data import HeadBatches, TrainBatches
from lte.data.imagefolder import imagefolder
from lte.data.resize import resize_folder


def write_class(job: tuple[str, int, int, tuple[int, int], int]) -> None:
    """One class folder of JPEGs that cost about what photographs cost: smooth random colour fields
    plus sensor-like noise."""
    from PIL import Image

    folder, c, count, (w, h), seed = job
    rng = np.random.default_rng([seed, c, count])
    Path(folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = rng.integers(0, 256, (h // 24 + 1, w // 24 + 1, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img += rng.normal(0, 14, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(Path(folder) / f"{i:05d}.JPEG", quality=90)


def make_folder(root: Path, classes: int, per_class: int, size: tuple[int, int], seed: int = 0) -> Path:
    """A generated image folder (train/ and val/, `classes` classes), written in parallel; kept once done."""
    from multiprocessing import Pool

    if (root / "done").exists():
        return root
    jobs = [(str(root / split / f"n{c:08d}"), c, count, size, seed)
            for split, count in (("train", per_class), ("val", max(1, per_class // 8))) for c in range(classes)]
    with Pool() as pool:
        pool.map(write_class, jobs)
    (root / "done").touch()
    return root


def measure(root: Path, workers: int, batch: int, steps: int, image_size: int, fast_decode: bool) -> dict:
    data = imagefolder(str(root), image_size=image_size, workers=workers, fast_decode=fast_decode)
    heads = 4
    batches = TrainBatches(data.train, HeadBatches(len(data.train), batch // heads, 0, range(heads)),
                           steps=steps + 2, workers=workers)  # normalization runs on the device: not host work
    batches.get(0)  # start-up (worker processes, first batches) is not what a long run sees
    batches.get(1)
    before = loadavg()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for step in range(2, steps + 2):
        x, _ = batches.get(step)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    batches.close()
    assert x.shape == (batch, image_size, image_size, 3) and x.dtype == torch.uint8
    row = {"workers": workers, "images_per_s": steps * batch / elapsed, "load_before": before, "load_after": loadavg()}
    if workers == 0:  # all the work is in this (single-threaded) process: CPU time per image, whatever the load
        row["cpu_ms_per_image"] = 1e3 * cpu / (steps * batch)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="runs/data-bench", help="where the generated folders go")
    parser.add_argument("--workers", default="0,1,2,4", help="comma-separated worker counts")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=64)
    parser.add_argument("--resize", type=int, default=256, help="shorter side of the pre-resized copy")
    parser.add_argument("--out", default="benchmarks/results/data.json")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run:
        args.workers, args.batch, args.steps, args.classes, args.per_class = "0,1", 8, 2, 2, 4
        args.dir, args.out = args.dir + "-dry", args.out.replace(".json", "-dry.json")
    torch.set_num_threads(1)
    base = Path(args.dir)
    full = make_folder(base / "full", args.classes, args.per_class, (500, 375))
    small = base / f"resized{args.resize}"
    if not (small / "done").exists():
        shutil.rmtree(small, ignore_errors=True)
        resize_folder(str(full), str(small), size=args.resize, processes=2)
        (small / "done").touch()
    jpeg_kb = np.mean([p.stat().st_size for p in (full / "train").rglob("*.JPEG")]) / 1024
    small_kb = np.mean([p.stat().st_size for p in (small / "train").rglob("*.jpg")]) / 1024
    sources = [("500x375 JPEG, full decode", full, False), ("500x375 JPEG, fast_decode", full, True),
               (f"resized to {args.resize} (resize-images)", small, True)]
    rows = []
    for label, root, fast in sources:
        for w in [int(v) for v in args.workers.split(",")]:
            r = measure(root, w, args.batch, args.steps, args.image_size, fast)
            rows.append({"source": label, **r})
            cpu = f"  {r['cpu_ms_per_image']:.2f} CPU ms/image" if "cpu_ms_per_image" in r else ""
            print(f"{label:<38} workers {w:>2}: {r['images_per_s']:>7.0f} images/s{cpu}  (load {r['load_before']})",
                  flush=True)
    report = {"benchmark": "data", "batch": args.batch, "image_size": args.image_size, "steps": args.steps,
              "mean_file_kb": {"500x375": jpeg_kb, f"resized{args.resize}": small_kb},
              "machine": machine("cpu"), "rows": rows}
    out = write_json(args.out, report)
    print(f"mean file size: 500x375 {jpeg_kb:.0f} KB, resized {small_kb:.0f} KB  -> {out}")


if __name__ == "__main__":
    main()
