"""Simulated LTE vs full-rank training of the same model in the same process: step time,
images/s and peak memory. Writes JSON and a table.

    python benchmarks/throughput.py                 # CPU-sized default (ViT on 8x8 inputs)
    python benchmarks/throughput.py --preset gpu    # ViT-S/32 at 224px, batch 1024, 32 heads, rank 64, bf16

Inputs are random (the speed of a step does not depend on their values); each mode is timed over
--steps steps after --warmup untimed ones, with the device synchronised around every step. Each
mode runs in its own process, so peak memory (CUDA allocator peak, or max RSS on a CPU) is its own.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch

from common import machine, step_times, write_json
import lte
from lte.models import create_model
from lte.runtime.log import peak_memory
from lte.runtime.engine import TrainStep, adamw
from lte.runtime.tasks import TrainingLoss

PRESETS = {
    "cpu": dict(model="vit_digits", img_size=8, in_chans=1, num_classes=10, batch=256, heads=4, rank=8,
                alpha=64, precision="fp32", compile=False, steps=20, warmup=5),
    "gpu": dict(model="vit_small_patch32_224", img_size=224, in_chans=3, num_classes=1000, batch=1024,
                heads=32, rank=64, alpha=4096, precision="bf16", compile=True, steps=30, warmup=10),
}


def measure(mode: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.img_size, in_chans=args.in_chans,
                         num_classes=args.num_classes).to(device)
    heads = 1
    if mode == "lte":
        lte.prepare(model, lte.LTEConfig(heads=args.heads, rank=args.rank, alpha=args.alpha))
        heads = args.heads
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=1e-4, weight_decay=0.0, heads=mode == "lte")  # the engine's optimizer
    forward = torch.compile(model, backend=args.compile_backend) if args.compile else model
    x = torch.randn(args.batch, args.in_chans, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = TrainStep(forward, TrainingLoss("classification"), params, opt, heads=heads, grad_clip=1.0,
                     device=device, precision=args.precision)
    times = step_times(lambda: step(x, y, 1e-4), device, args.steps, args.warmup)
    step_s = statistics.median(times)
    out = {"mode": mode, "step_s_median": step_s, "step_s_min": min(times), "images_per_s": args.batch / step_s,
           "trainable_params": sum(p.numel() for p in params), **peak_memory(device)}
    model = opt = forward = None  # freed before the next mode (the timing lambda holds the names)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="defaults for every option below (gpu when CUDA is available, else cpu)")
    for key, value in PRESETS["cpu"].items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (aot_eager traces the same graph without code generation)")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    parser.add_argument("--mode", choices=("full", "lte"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = PRESETS[args.preset or ("gpu" if args.device == "cuda" else "cpu")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    if args.mode is not None:  # child process: one mode, result on stdout
        print(json.dumps(measure(args.mode, args, device)))
        return
    results = []
    for mode in ("full", "lte"):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode],
                               capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(f"{mode} run failed:\n{child.stderr}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    full, lte_ = results
    report = {
        "benchmark": "throughput",
        "config": {k: getattr(args, k) for k in preset} | {"device": args.device,
                                                            "compile_backend": args.compile_backend},
        "machine": machine(device),
        "results": results, "lte_over_full_step_time": lte_["step_s_median"] / full["step_s_median"],
    }
    out = write_json(args.out, report)
    print(f"{args.model}, {args.img_size}px, batch {args.batch}, {args.precision}, compile={args.compile}, "
          f"on {report['machine']['device']} (torch {torch.__version__})")
    print(f"{'mode':<6} {'step ms':>9} {'images/s':>10} {'trainable':>12} {'peak MiB':>9}")
    for r in results:
        print(f"{r['mode']:<6} {1e3 * r['step_s_median']:>9.1f} {r['images_per_s']:>10,.0f} "
              f"{r['trainable_params']:>12,} {r['peak_memory_bytes'] / 2**20:>9.0f}")
    print(f"LTE ({args.heads} heads, rank {args.rank}) step time / full-rank: "
          f"{report['lte_over_full_step_time']:.2f}x   -> {out}")


if __name__ == "__main__":
    main()
