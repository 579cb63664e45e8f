"""Everything the project measures on a GPU, in one command that fits a 10-minute window on one H100.

    python benchmarks/gpu_suite.py                 # on a CUDA machine
    python benchmarks/gpu_suite.py --dry-run       # every step on tiny shapes on the CPU (the tests run this)

Each step is one of the project's benchmarks (or a short training run) in its own process, with its
own time limit; a step that fails or runs out of time is recorded and the suite goes on. The suite
stops starting steps when its budget (--budget-s) would be exceeded. Results: one JSON
(benchmarks/results/gpu_suite.json: machine, every step's status, wall time, output tail and the
JSON the step wrote) and one table (gpu_suite.md, also printed). Results are written after every
step, so what ran survives a cut-off.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import ROOT, child_env, machine, train_command, write_json

PY = sys.executable
TINY_VIT = "model.args={embed_dim: 16, depth: 1, num_heads: 2}"


@dataclass
class Step:
    name: str
    what: str
    gpu: list[str]                     # the command on a GPU machine
    dry: list[str]                     # the same step on tiny shapes on the CPU
    timeout_s: int
    result: str | None = None          # JSON the step writes (relative to the results folder)
    headline: callable = field(default=lambda r: "")


def _throughput(r: dict) -> str:
    full, lte = r["results"]
    return (f"full {full['images_per_s']:,.0f} img/s, LTE {lte['images_per_s']:,.0f} img/s, "
            f"LTE/full step time {r['lte_over_full_step_time']:.2f}x, peak {lte['peak_memory_bytes'] / 2**30:.1f} GiB")


def _layer(r: dict) -> str:
    return "; ".join(f"{row['shape']}: explicit {row['explicit_ms']:.2f} ms, vmap {row['vmap_ms']:.2f} ms"
                     for row in r["rows"])


def _comm(r: dict) -> str:
    rt = r["ps"]["round_time"]
    return (f"ps {r['ps']['comm']['bytes_per_step_per_worker'] / 1e6:.2f} MB/step/worker, ddp "
            f"{r['ddp']['comm']['bytes_per_step_per_worker'] / 1e6:.2f}, ratio {r['ddp_over_ps_bytes']:.1f}x; round "
            + ", ".join(f"{k[:-2]} {v:.3f}s" for k, v in rt.items()))


def _memory(r: dict) -> str:
    parts = []
    for name, m in r["models"].items():
        rows = m["rows"]
        ddp = next(v["peak"] for k, v in rows.items() if k.startswith("DDP"))
        lean = min(v["peak"] for k, v in rows.items() if not k.startswith("DDP"))
        parts.append(f"{name}: DDP {ddp / 2**20:,.0f} MiB, leanest LTE {lean / 2**20:,.0f} MiB ({lean / ddp:.2f}x)")
    return "; ".join(parts)


def _quality(r: dict) -> str:
    c, runs = r.get("comparison") or {}, {x["name"]: x for x in r["runs"]}
    speed = ", ".join(f"{n} {x['samples_per_s_steady']:,.0f} samples/s" for n, x in runs.items())
    if not c:
        return speed
    reach = (f"LTE reaches it at {c['sample_ratio']:.2f}x the samples" if c["lte_reaches_full_best"]
             else f"LTE's best {c['lte_best_loss']:.3f} does not reach it")
    return f"full-rank best loss {c['full_best_loss']:.3f}, {reach}; {speed}"


def _vision(r: dict) -> str:
    return ", ".join(f"{x['mode']} {x['images_per_s_median']:,.0f} img/s, peak {x['peak_memory_bytes'] / 2**30:.1f} GiB"
                     for x in r["results"])


def _train(r: dict) -> str:
    ev = r.get("eval", {})
    figures = ", ".join(f"{k} {v:.3f}" for k, v in ev.items())
    return (f"{r['steps']} steps, {figures}, {r['samples_per_s']:,.0f} samples/s, "
            f"peak {r['peak_memory_bytes'] / 2**20:,.0f} MiB")


def _step_cost(r: dict) -> str:
    parts = []
    for m in r["results"]:
        full, lte = m["full"], m["lte"]
        ratios = [f"ops {lte['extrapolated']['ops'] / full['extrapolated']['ops']:.2f}x"]
        for key, label in (("eager", "eager"), ("compiled_timing", "compiled")):
            if key in full:
                ratios.append(f"{label} {lte[key]['step_s_median'] / full[key]['step_s_median']:.2f}x")
        parts.append(f"{m['model']}: LTE/full " + ", ".join(ratios))
    return "; ".join(parts)


def steps(results: Path, gpus: int) -> list[Step]:
    """The suite. `gpus` decides the placement of the distributed runs (see docs/distributed.md, 'Placement')."""
    r = str(results)
    shared_gpu = gpus < 2  # several processes on one GPU: NCCL refuses that, the exchange uses Gloo
    out = [
        Step("step-cost", "one step counted and timed, full-rank vs LTE: ViT-S/32 224px and gpt2, 32x r64, bf16",
             [PY, "benchmarks/step_cost.py", "--device", "cuda", "--out", f"{r}/step_cost.json"],
             [PY, "benchmarks/step_cost.py", "--models", "vit_tiny", "--no-compile", "--out", f"{r}/step_cost.json"],
             420, "step_cost.json", headline=_step_cost),
        Step("throughput-eager", "simulated LTE vs full-rank step, ViT-S/32 224px, batch 1024, 32x r64, bf16, eager",
             [PY, "benchmarks/throughput.py", "--preset", "gpu", "--compile", "false",
              "--out", f"{r}/throughput-eager.json"],
             [PY, "benchmarks/throughput.py", "--preset", "cpu", "--steps", "2", "--warmup", "1", "--batch", "16",
              "--compile", "false", "--out", f"{r}/throughput-eager.json"],
             240, "throughput-eager.json", headline=_throughput),
        Step("throughput-compiled", "the same with torch.compile (inductor)",
             [PY, "benchmarks/throughput.py", "--preset", "gpu", "--compile", "true", "--out",
              f"{r}/throughput-compiled.json"],
             [PY, "benchmarks/throughput.py", "--preset", "cpu", "--steps", "2", "--warmup", "1", "--batch", "16",
              "--compile", "true", "--compile-backend", "aot_eager", "--out", f"{r}/throughput-compiled.json"],
             300, "throughput-compiled.json", headline=_throughput),
        Step("layer", "one LTE linear: explicit batched matmuls vs vmap, bf16",
             [PY, "benchmarks/lte_layer.py", "--device", "cuda", "--dtype", "bf16", "--out", f"{r}/lte_layer.json"],
             [PY, "benchmarks/lte_layer.py", "--device", "cpu", "--repeats", "1", "--shapes", "digits-vit fc1",
              "--out", f"{r}/lte_layer.json"],
             120, "lte_layer.json", headline=_layer),
        Step("comm", "bytes per worker per step, ps vs ddp, ViT-S/32 r64 T=10 nf4; round time split"
             + ("" if shared_gpu else ", server on GPU over NCCL"),
             [PY, "benchmarks/comm.py", "--device", "cuda", "--steps", "50", "--work", f"{r}/comm-runs",
              "--out", f"{r}/comm.json"] + (["--backend", "gloo"] if shared_gpu else ["--ps-device", "cuda"]),
             [PY, "benchmarks/comm.py", "--model", "vit_digits", "--img-size", "8", "--rank", "4", "--steps", "4",
              "--merge-every", "2", "--work", f"{r}/comm-runs", "--out", f"{r}/comm.json"],
             240, "comm.json", headline=_comm),
    ]
    for mode, nproc in (("lte", None), ("full", None), ("ps", 3), ("ddp", 2)):
        common = ["--config", "configs/digits.yaml", f"mode={mode}", f"out_dir={r}/train-{mode}",
                  "checkpoint.resume=false", "train.log_every=100"]
        dist = ["dist.backend=gloo"] if mode in ("ps", "ddp") and shared_gpu else []
        out.append(Step(f"train-{mode}", f"digits ViT, mode={mode}, a short real run",
                        train_command(*common, "train.device=cuda", "train.steps=300", *dist, nproc=nproc),
                        train_command(*common, "train.device=cpu", "train.steps=4", "lte.merge_every=2", TINY_VIT,
                                      nproc=nproc),
                        180, f"train-{mode}/summary.json", headline=_train))
    out += [
        Step("memory", "peak memory of one worker: DDP vs LTE bases and activation options",
             [PY, "benchmarks/memory.py", "--out", f"{r}/memory.json"],
             [PY, "benchmarks/memory.py", "--dry-run", "--out", f"{r}/memory.json"],
             300, "memory.json", headline=_memory),
        Step("quality", "gpt_mini on Shakespeare, full vs 32 heads x r16, bf16",
             # 300 full-rank steps of 131k tokens (39M: about 39 passes over the text) and 450 LTE
             # steps, to fit the suite's window; the preset's own 1000 steps run on their own
             [PY, "benchmarks/quality.py", "--preset", "gpu", "--set", "train.steps=300", "--set", "eval.every=3",
              "--out", f"{r}/quality.json"],
             [PY, "benchmarks/quality.py", "--dry-run", "--out", f"{r}/quality.json"],
             420, "quality.json", headline=_quality),
        Step("vision-throughput", "ViT-S/32 ImageNet100-shaped, full vs LTE with the data pipeline",
             [PY, "benchmarks/ablation.py", "--preset", "gpu", "--runs-dir", f"{r}/vision",
              "--out", f"{r}/vision.json"],
             [PY, "benchmarks/ablation.py", "--preset", "gpu", "--dry-run", "--runs-dir", f"{r}/vision",
              "--out", f"{r}/vision.json"],
             300, "vision.json", headline=_vision),
    ]
    return out


def table(report: dict) -> str:
    lines = [f"GPU suite on {report['machine'].get('gpu', 'CPU (dry run)')}, torch {report['machine']['torch']}"
             f"{' (dry run)' if report['dry_run'] else ''}", "",
             "| step | status | wall s | result |", "|---|---|---|---|"]
    for s in report["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('wall_s', 0):.0f} | {s.get('headline', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step on tiny shapes on the CPU")
    parser.add_argument("--budget-s", type=float, default=570.0, help="stop starting steps past this many seconds")
    parser.add_argument("--only", nargs="*", default=None, help="run only these steps")
    parser.add_argument("--results", default="benchmarks/results", help="folder for the JSON, the table and runs")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; use --dry-run to check the suite on the CPU", file=sys.stderr)
        return 2
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    report = {"suite": "gpu", "dry_run": args.dry_run, "machine": machine(), "steps": []}
    t_start = time.perf_counter()
    for step in steps(results, torch.cuda.device_count()):
        if args.only is not None and step.name not in args.only:
            continue
        entry = {"name": step.name, "what": step.what}
        report["steps"].append(entry)
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < 30:
            entry["status"] = "skipped: out of time"
            continue
        cmd = step.dry if args.dry_run else step.gpu
        entry["command"] = " ".join(c if " " not in c else repr(c) for c in cmd)
        if step.result:
            (results / step.result).unlink(missing_ok=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                                  timeout=min(step.timeout_s, left))
            entry["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            entry["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as exc:
            entry["status"] = "timed out"
            entry["output_tail"] = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
                                    else (exc.stdout or ""))[-3000:]
        entry["wall_s"] = time.perf_counter() - t0
        path = results / step.result if step.result else None
        if path is not None and path.exists():
            entry["result"] = json.loads(path.read_text())
            try:
                entry["headline"] = step.headline(entry["result"])
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                entry["headline"] = f"(result without the expected fields: {exc})"
        print(f"[{time.perf_counter() - t_start:6.0f}s] {step.name}: {entry['status']} "
              f"({entry['wall_s']:.0f}s) {entry.get('headline', '')}", flush=True)
        write_json(results / "gpu_suite.json", report)
    report["wall_s"] = time.perf_counter() - t_start
    write_json(results / "gpu_suite.json", report)
    (results / "gpu_suite.md").write_text(table(report))
    print(table(report))
    return 0 if all(s["status"] == "ok" for s in report["steps"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
