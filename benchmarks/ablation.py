"""Table 1 of the LTE paper (heads, rank and merge interval) at a scale that runs on a CPU, and the
ViT-S/32 ImageNet100-shaped throughput of full-rank vs LTE with the image pipeline included.

    python benchmarks/ablation.py                      # the study: vit_digits on scikit-learn's digits
    python benchmarks/ablation.py --preset gpu         # throughput: ViT-S/32, generated 100-class JPEG folder
    python benchmarks/ablation.py --dry-run            # either preset on tiny shapes, a few steps (CI, CPU)

The study (preset cpu) trains the digits ViT (embed 64, MLP 128, 4 blocks) at a fixed global batch
of 64 and a fixed number of steps, as the paper fixes the cumulative batch and the epochs: heads
{1, 4, 16} at rank 8, rank {4, 8, 16} at 4 heads, merge interval {1, 10, 50, 200} at 4 heads of
rank 8, and the full-rank model; every run over --seeds seeds. Each run is its own `lte-train`
process (logs beside the results). Writes benchmarks/results/ablation.json, ablation.png and a
Markdown table.

The throughput preset (gpu) generates an ImageNet100-shaped folder of JPEGs (100 classes, sizes
like ImageNet's), then trains ViT-S/32 from it with `data.name=imagefolder` in both modes, so the
images/s include decoding and augmentation in the DataLoader workers.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import time
from pathlib import Path

from common import ROOT, loadavg, machine, read_metrics, read_summary, run_train, train_command, write_json

DIGITS = ROOT / "configs" / "digits.yaml"

# (group, label, overrides); the reference run (4 heads, rank 8, T=10) belongs to all three sweeps.
BASE = {"lte.heads": 4, "lte.rank": 8, "lte.merge_every": 10}
STUDY = [
    ("full", "full-rank", {"mode": "full"}),
    *[("heads", f"heads={h}", {**BASE, "lte.heads": h}) for h in (1, 4, 16)],
    *[("rank", f"rank={r}", {**BASE, "lte.rank": r}) for r in (4, 8, 16)],
    *[("merge", f"T={t}", {**BASE, "lte.merge_every": t}) for t in (1, 10, 50, 200)],
    # Figure 6 / section 4.4: heads at the same per-head batch (16), so the global batch grows with them
    *[("heads_same_per_head", f"heads={h}, batch {16 * h}",
       {**BASE, "lte.heads": h, **({} if h == 4 else {"train.batch_size": 16 * h})}) for h in (1, 4, 16)],
]

# The paper's Table 1 (ViT-S/32, ImageNet100, batch 4096, 1200 epochs): test loss, test accuracy.
PAPER = {
    "full": [("full-rank", 1.78, 71.97)],
    "heads": [("heads=2 (r=64)", 1.86, 69.82), ("heads=8 (r=64)", 1.84, 71.97), ("heads=32 (r=64)", 1.79, 73.73),
              ("heads=2 (r=8)", 2.31, 54.68), ("heads=8 (r=8)", 2.35, 54.88), ("heads=32 (r=8)", 2.26, 58.21)],
    "rank": [("rank=8", 2.66, 44.00), ("rank=16", 2.12, 60.35), ("rank=32", 1.81, 71.20), ("rank=64", 1.79, 73.73),
             ("rank=128", 1.78, 73.54)],
    "merge": [("T=5", 1.87, 70.67), ("T=10", 1.79, 73.73), ("T=20", 1.97, 66.80), ("T=50", 1.99, 65.43),
              ("T=100", 2.10, 61.04)],
}


def unique_runs(study):
    """Each distinct configuration once (the reference run appears in three groups)."""
    seen = {}
    for group, label, overrides in study:
        key = json.dumps(overrides, sort_keys=True)
        seen.setdefault(key, overrides)
    return seen


def run_name(overrides: dict, seed: int) -> str:
    if overrides.get("mode") == "full":
        return f"full_s{seed}"
    batch = f"_b{overrides['train.batch_size']}" if "train.batch_size" in overrides else ""
    return f"h{overrides['lte.heads']}_r{overrides['lte.rank']}_T{overrides['lte.merge_every']}{batch}_s{seed}"


def train_one(overrides: dict, seed: int, steps: int, out_dir: Path, extra: list[str]) -> dict:
    """One lte-train process; returns its summary and eval curve (reused if already there)."""
    summary_path = out_dir / "summary.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    # Two ablation processes may share the study (--reverse): whoever holds out_dir's claim runs it,
    # the other waits and reuses the result. An flock, so a process that dies releases it.
    with (out_dir / ".claim").open("w") as claim:
        fcntl.flock(claim, fcntl.LOCK_EX)
        if not summary_path.exists():
            merge_every = overrides.get("lte.merge_every", 10)
            args = [f"{k}={v}" for k, v in overrides.items()] + [
                f"seed={seed}", f"out_dir={out_dir}", f"train.steps={steps}", "train.log_every=100",
                f"eval.every={max(1, 100 // merge_every)}", "checkpoint.every=0", "checkpoint.resume=false", *extra]
            run_train(train_command("--config", DIGITS, *args), out_dir, log=out_dir / "train.log")
    summary = read_summary(out_dir)
    curve = [(r["step"], r["eval_loss"], r["eval_accuracy"]) for r in read_metrics(out_dir) if "eval_loss" in r]
    return {"eval": summary["eval"], "wall_s": summary["wall_s"], "samples_per_s": summary["samples_per_s"],
            "trainable_params": summary["trainable_params"], "curve": curve}


def study(args) -> None:
    runs_dir = Path(args.runs_dir)
    steps = 6 if args.dry_run else args.steps
    seeds = [0] if args.dry_run else list(range(args.seeds))
    extra = ["model.args={embed_dim: 16, depth: 1, num_heads: 2}"] if args.dry_run else []
    results = {}
    t0 = time.time()
    todo = [(o, s) for o in unique_runs(STUDY).values() for s in seeds]
    for overrides, seed in (reversed(todo) if args.reverse else todo):
        name = run_name(overrides, seed)
        r = train_one(overrides, seed, steps, runs_dir / name, extra)
        results[name] = r
        print(f"{name:<18} acc {r['eval']['accuracy']:.4f} loss {r['eval']['loss']:.4f} "
              f"({r['wall_s']:.0f} s)", flush=True)
    rows = []
    for group, label, overrides in STUDY:
        per_seed = [results[run_name(overrides, s)] for s in seeds]
        accs = [r["eval"]["accuracy"] for r in per_seed]
        losses = [r["eval"]["loss"] for r in per_seed]
        rows.append({"group": group, "label": label, "overrides": overrides, "seeds": seeds,
                     "accuracy_mean": statistics.fmean(accs), "accuracy_sd": statistics.pstdev(accs),
                     "loss_mean": statistics.fmean(losses), "loss_sd": statistics.pstdev(losses),
                     "accuracy": accs, "loss": losses, "trainable_params": per_seed[0]["trainable_params"],
                     "curves": [r["curve"] for r in per_seed]})
    report = {"benchmark": "ablation", "preset": "cpu", "dry_run": args.dry_run, "model": "vit_digits",
              "data": "digits (1437 train / 360 test)", "global_batch": 64, "steps": steps, "seeds": seeds,
              "machine": machine(), "load_before": args.load_before, "wall_s": time.time() - t0, "rows": rows,
              "paper_table1": PAPER}
    out = write_json(args.out, report)
    print(markdown(rows))
    if not args.no_plot:
        plot(rows, out.with_suffix(".png"))
    print(f"-> {out}")


def markdown(rows) -> str:
    lines = ["| sweep | run | test accuracy (mean ± sd) | test loss (mean ± sd) | trainable params |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['label']} | {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_sd']:.2f} "
                     f"| {r['loss_mean']:.3f} ± {r['loss_sd']:.3f} | {r['trainable_params']:,} |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["heads", "rank", "merge", "heads_same_per_head"]
    full = next(r for r in rows if r["group"] == "full")
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    for col, group in enumerate(groups):
        sel = [r for r in rows if r["group"] == group]
        ax = axes[0, col]
        ax.errorbar(range(len(sel)), [100 * r["accuracy_mean"] for r in sel],
                    yerr=[100 * r["accuracy_sd"] for r in sel], marker="o", capsize=3, label="LTE")
        ax.axhline(100 * full["accuracy_mean"], color="k", ls="--", lw=1, label="full-rank")
        ax.set_xticks(range(len(sel)), [r["label"].replace(", ", "\n") for r in sel])
        ax.set_title(f"final test accuracy: {group.replace('_', ' ')}", fontsize=10)
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=8)
        ax = axes[1, col]
        for r in [*sel, full]:
            curve = r["curves"][0]  # seed 0
            ax.plot([c[0] for c in curve], [c[1] for c in curve], label=r["label"],
                    ls="--" if r is full else "-", color="k" if r is full else None)
        ax.set_xlabel("step")
        ax.set_ylabel("test loss (seed 0)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("LTE ablation (Table 1 at CPU scale): vit_digits on scikit-learn digits, global batch 64 "
                 "(last column: 16 per head), 1500 steps, mean ± sd over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def pipeline_throughput(args) -> None:
    """Full-rank vs LTE training of ViT-S/32 from a generated ImageNet100-shaped JPEG folder with
    the shipped config (bf16, torch.compile, 32 heads of rank 64, batch 4096), data pipeline
    included: images/s is the median of the logged intervals after the first two (compilation)."""
    from data import make_folder  # benchmarks/data.py (beside this script): the image generator

    base = Path(args.runs_dir) / ("gpu-dry" if args.dry_run else "gpu")
    if args.dry_run:  # tiny shapes on the CPU: checks the path, measures nothing
        folder = make_folder(base / "images", 2, 4, (64, 48))
        shape = ["data.args.image_size=32", "data.args.workers=1", "model.args={embed_dim: 16, depth: 1, num_heads: 2}",
                 "train.steps=4", "train.batch_size=8", "lte.heads=4", "train.log_every=1", "train.warmup_steps=1",
                 "train.compile=false", "train.precision=fp32", "train.device=cpu", "eval.batch_size=8"]
    else:
        folder = make_folder(base / "images", 100, args.images_per_class, (500, 375))
        shape = [f"train.steps={args.steps_gpu}", "train.log_every=5", "train.warmup_steps=5"]
        if args.workers is not None:
            shape.append(f"data.args.workers={args.workers}")
        if args.resized:
            small = base / f"images-{args.resized}"
            if not (small / "done").exists():
                from lte.data.resize import resize_folder

                resize_folder(str(folder), str(small), size=args.resized)
                (small / "done").touch()
            folder = small
    results = []
    for mode in ("full", "lte"):
        out_dir = base / mode
        cfg = ROOT / "configs" / "vit_s32_imagenet100.yaml"
        cmd = train_command("--config", cfg, f"mode={mode}", f"out_dir={out_dir}", f"data.args.root={folder}",
                            "data.args.classes=null", "eval.every=0", "checkpoint.every=0", "checkpoint.resume=false",
                            *shape)
        summary = run_train(cmd, out_dir, log=base / f"{mode}.log")
        rates = [r["samples_per_s"] for r in read_metrics(out_dir) if "samples_per_s" in r]
        steady = rates[2:] or rates
        results.append({"mode": mode, "images_per_s_median": statistics.median(steady), "intervals": rates,
                        "peak_memory_bytes": summary.get("peak_memory_bytes"), "device": summary.get("device"),
                        "trainable_params": summary["trainable_params"], "load": loadavg()})
        print(f"{mode:<5} {results[-1]['images_per_s_median']:>9,.0f} images/s (median of {len(steady)} intervals) "
              f"on {summary.get('device')}", flush=True)
    report = {"benchmark": "ablation-gpu", "dry_run": args.dry_run, "folder": str(folder), "machine": machine(),
              "results": results}
    print(f"-> {write_json(args.out, report)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes and a few steps, to check it runs")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runs-dir", default="runs/ablation")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--reverse", action="store_true",
                        help="run the study's runs last first (a second process on the same --runs-dir shares "
                             "the work)")
    parser.add_argument("--steps-gpu", type=int, default=40, help="gpu preset: training steps per mode")
    parser.add_argument("--images-per-class", type=int, default=50, help="gpu preset: generated images per class")
    parser.add_argument("--workers", type=int, default=None, help="gpu preset: DataLoader workers (default: auto)")
    parser.add_argument("--resized", type=int, default=None,
                        help="gpu preset: train from a resize-images copy with this shorter side (the fast path)")
    args = parser.parse_args()
    args.load_before = loadavg()
    if args.preset == "cpu":
        args.out = args.out or ("benchmarks/results/ablation-dry.json" if args.dry_run
                                else "benchmarks/results/ablation.json")
        study(args)
    else:
        args.out = args.out or ("benchmarks/results/ablation-gpu-dry.json" if args.dry_run
                                else "benchmarks/results/ablation-gpu.json")
        pipeline_throughput(args)


if __name__ == "__main__":
    main()
