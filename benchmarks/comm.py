"""Communication per worker per training step, parameter-server LTE vs DDP, from the trainer's own
byte counters, next to the analytic figures of section 4.5 of the LTE paper; and the wall time of
a round split into compute, upload, merge and download.

    python benchmarks/comm.py                          # ViT-S/32, rank 64, T=10, nf4 base, CPU/Gloo
    python benchmarks/comm.py --device cuda            # the same on GPUs (one GPU: workers share it, Gloo)

Both runs use synthetic 224px images (bytes moved do not depend on pixel values) and the same
global batch; the counters count every payload byte of the trainer's collectives (docs/distributed.md,
"Communication accounting").
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import torch

from common import run_train, train_command, write_json
from lte.core.linear import is_patch_conv
from lte.models import create_model


def analytic(model_name: str, rank: int, heads_per_worker: int, merge_every: int, ranks_ddp: int,
             img_size: int = 224) -> dict:
    """Bytes per worker per step from parameter counts alone (section 4.5 of the paper).

    LTE with a parameter server: each round a worker sends its heads' LoRA parameters (fp32) and
    receives the base in nf4 (half a byte per weight plus one fp32 scale per 64) with the other
    parameters in fp32; per step that is divided by T. DDP: every step a ring all-reduce of the
    fp32 gradient sends and receives 2 (W-1)/W M * 4 bytes per rank; with a parameter server it
    would be 2 M * 4 (gradient up, weights down)."""
    model = create_model(model_name, img_size=img_size)
    lora = other = linear_weights = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or is_patch_conv(module):
            out_f, d_in = module.weight.shape[0], module.weight[0].numel()
            lora += rank * (d_in + out_f)
            linear_weights += module.weight.numel()
            other += 0 if module.bias is None else module.bias.numel()
        else:
            other += sum(p.numel() for p in module.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    up = heads_per_worker * (lora + other) * 4
    down = linear_weights / 2 + math.ceil(linear_weights / 64) * 4 + other * 4
    return {"params": total, "lora_params_per_head": lora, "ps_up_bytes_per_round": up,
            "ps_down_bytes_per_round": down, "ps_bytes_per_step": (up + down) / merge_every,
            "ddp_ring_bytes_per_step": 2 * 2 * (ranks_ddp - 1) / ranks_ddp * total * 4,
            "ddp_ps_style_bytes_per_step": 2 * total * 4}


def run(mode: str, nproc: int, args, out_dir: Path) -> dict:
    overrides = [f"mode={mode}", f"model.name={args.model}", "data.name=synthetic",
                 f"data.args={{img_size: {args.img_size}}}", f"dist.ps_device={args.ps_device}",
                 f"dist.backend={args.backend}",
                 f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"lte.rank={args.rank}",
                 "lte.alpha=4096", f"lte.merge_every={args.merge_every}", f"lte.heads={args.workers * args.heads}",
                 f"worker.base_dtype={args.base}", "eval.every=0", "eval.batch_size=16", "train.log_every=10",
                 f"train.device={args.device}", "dist.sync_phases=true", "checkpoint.resume=false",
                 f"out_dir={out_dir}"]
    return run_train(train_command(*overrides, nproc=nproc), out_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch32_224")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--merge-every", type=int, default=10)
    parser.add_argument("--base", default="nf4")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1, help="heads per worker")
    parser.add_argument("--batch", type=int, default=4, help="global batch (bytes moved do not depend on it)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--ps-device", choices=("cpu", "cuda"), default="cpu",
                        help="where the server keeps the master: cuda (NCCL) needs a GPU per process")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                        help="gloo when several processes share one GPU (NCCL refuses that)")
    parser.add_argument("--work", default="benchmarks/results/comm-runs", help="out_dir of the two runs")
    parser.add_argument("--out", default="benchmarks/results/comm.json")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)  # fresh runs, not continuations of the last benchmark's
    ps = run("ps", args.workers + 1, args, work / "ps")
    ddp = run("ddp", args.workers, args, work / "ddp")
    theory = analytic(args.model, args.rank, args.heads, args.merge_every, args.workers, args.img_size)
    report = {"config": vars(args), "analytic": theory,
              "ps": {k: ps[k] for k in ("comm", "round_time", "steps", "merges", "samples_per_s", "device")},
              "ddp": {k: ddp[k] for k in ("comm", "steps", "samples_per_s", "device")},
              "ddp_over_ps_bytes": ddp["comm"]["bytes_per_step_per_worker"] / ps["comm"]["bytes_per_step_per_worker"]}
    out = write_json(args.out, report)

    mb = 1e6
    print(f"{args.model}: {theory['params'] / 1e6:.1f}M parameters, LoRA rank {args.rank}: "
          f"{theory['lora_params_per_head'] / 1e6:.2f}M per head; T={args.merge_every}, base {args.base}, "
          f"{args.workers} workers x {args.heads} head(s); device {args.device}")
    print(f"MB per worker per step     {'measured, whole run':>20}{'steady state':>14}{'analytic':>10}")
    print(f"{'LTE, parameter server':<26} {ps['comm']['bytes_per_step_per_worker'] / mb:>20.2f}"
          f"{ps['comm']['steady_bytes_per_step_per_worker'] / mb:>14.2f}{theory['ps_bytes_per_step'] / mb:>10.2f}")
    print(f"{'DDP, ring all-reduce':<26} {ddp['comm']['bytes_per_step_per_worker'] / mb:>20.2f}"
          f"{ddp['comm']['bytes_per_step_per_worker'] / mb:>14.2f}{theory['ddp_ring_bytes_per_step'] / mb:>10.2f}")
    print(f"DDP / LTE bytes per step: {report['ddp_over_ps_bytes']:.1f}x measured over {args.steps} steps "
          f"(includes the start-up base download), "
          f"{theory['ddp_ring_bytes_per_step'] / theory['ps_bytes_per_step']:.1f}x analytic (ring); "
          f"{theory['ddp_ps_style_bytes_per_step'] / theory['ps_bytes_per_step']:.1f}x against DDP through a "
          "parameter server")
    rt = ps["round_time"]
    print("LTE round time, mean s: " + ", ".join(f"{k[:-2]} {v:.3f}" for k, v in rt.items())
          + f"  ({ps['merges']} rounds, phases separated by a barrier)")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
