"""Bytes per worker against final quality: LTE across round lengths T and outer optimizers, next to
full-rank training, on the language-model default (configs/shakespeare_char.yaml).

    python benchmarks/comm_quality.py                          # every run of the CPU preset, 2 at a time
    python benchmarks/comm_quality.py --runs lte-T50-nesterov  # some of them
    python benchmarks/comm_quality.py --steps 40 --runs full,lte-T10   # the code path in a minute

Every run trains the same samples (train.steps at batch 64) in its own `lte-train` process. The LTE
runs are mode=lte: N simulated heads merge exactly as N parameter-server workers of one head each
would (tests/test_dist.py holds ps == lte to 1e-5), so their quality is that of the mode=ps run
the bytes are counted for. Bytes per worker over a run come from the parameter server's message
layouts for WORKERS workers x 1 head (lte.distributed.protocol, the sizes its byte counters count:
tests/test_dist.py checks the counters against them): the first base download, then every round's
upload and download. DDP's are what its counting hook adds up for the full-rank model over WORKERS
ranks, a ring all-reduce of the fp32 gradient every step; full-rank training in one process gives
DDP's quality (the same global batch and steps).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import math
from pathlib import Path

from common import ROOT, machine, read_metrics, run_train, train_command, write_json
from lte import core
from lte.data import build_data
from lte.distributed.protocol import worker_protocols
from lte.train.config import load_config
from lte.train.engine import build_model

CONFIG = ROOT / "configs" / "shakespeare_char.yaml"
WORKERS = 4
COMMON = ["train.device=cpu", "checkpoint.every=0", "checkpoint.resume=false"]
NESTEROV = ["lte.outer=nesterov", "lte.outer_lr=1.0", "lte.outer_momentum=0.5"]
DILOCO_OUTER = ["lte.outer=nesterov", "lte.outer_lr=0.7", "lte.outer_momentum=0.9"]
RUNS = {  # name: overrides of the config (mode=lte unless they say otherwise)
    "full": ["mode=full"],
    "lte-T10": ["lte.merge_every=10"],
    "lte-T50": ["lte.merge_every=50", "eval.every=2"],
    "lte-T50-nesterov": ["lte.merge_every=50", "eval.every=2", *NESTEROV],
    "lte-T100": ["lte.merge_every=100", "eval.every=1"],
    "lte-T100-nesterov": ["lte.merge_every=100", "eval.every=1", *NESTEROV],
    "lte-T100-diloco-outer": ["lte.merge_every=100", "eval.every=1", *DILOCO_OUTER],
    "lte-T200-nesterov": ["lte.merge_every=200", "eval.every=1", *NESTEROV],
}


def ps_bytes_per_worker(overrides: list[str], steps: int) -> int:
    """Bytes one worker of a mode=ps run with these overrides sends and receives over the run."""
    cfg = load_config(CONFIG, [*COMMON, *overrides, "mode=ps", f"lte.heads={WORKERS}", "worker.heads=1",
                               f"train.steps={steps}"])
    data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
    model = build_model(cfg, data, None)
    spec, _ = core.plan(model, cfg.lte_config())
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items() if k in spec.master_keys()}
    proto = worker_protocols(cfg, spec, shapes, WORKERS)[0]
    rounds = math.ceil(steps / cfg.lte.merge_every)
    return proto.download.nbytes + rounds * (proto.upload.nbytes + proto.download.nbytes)


def ddp_bytes_per_worker(steps: int) -> int:
    cfg = load_config(CONFIG, [*COMMON, "mode=ddp"])
    data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
    params = sum(p.numel() for p in build_model(cfg, data, None).parameters())
    per_step = 2 * int(2 * (WORKERS - 1) / WORKERS * params * 4)  # sent + received, as ddp.py counts
    return steps * per_step


def run_one(name: str, steps: int, work: Path) -> dict:
    out_dir = work / name
    overrides = [*COMMON, *RUNS[name], f"train.steps={steps}", f"out_dir={out_dir}"]
    summary = run_train(train_command("--config", CONFIG, *overrides), out_dir, log=work / f"{name}.log")
    curve = [(r["step"], r["eval_loss"]) for r in read_metrics(out_dir) if "eval_loss" in r]
    return {"name": name, "overrides": RUNS[name], "eval_loss": summary["eval"]["loss"], "curve": curve,
            "train_s": summary["train_s"], "merges": summary["merges"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--steps", type=int, default=1500, help="every run's steps (batch 64)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (each uses one thread)")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "comm-quality-runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "comm_quality.json")
    args = parser.parse_args()
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; there are {list(RUNS)}")
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda n: run_one(n, args.steps, args.work), names))
    ddp = ddp_bytes_per_worker(args.steps)
    for r in results:
        r["bytes_per_worker"] = ddp if r["name"] == "full" else ps_bytes_per_worker(RUNS[r["name"]], args.steps)
        r["ddp_over_bytes"] = ddp / r["bytes_per_worker"]
    reference = next((r["eval_loss"] for r in results if r["name"] == "full"), None)
    report = {"benchmark": "comm_quality", "config": str(CONFIG.relative_to(ROOT)), "steps": args.steps,
              "workers": WORKERS, "machine": machine("cpu"), "ddp_bytes_per_worker": ddp, "runs": results}
    write_json(args.out, report)
    print(f"{report['config']}, {args.steps} steps of batch 64; bytes per worker over the run, {WORKERS} workers "
          "(LTE: a parameter server and 4 workers x 1 head; full-rank: DDP over 4 ranks)")
    print("| run | final eval loss | vs full-rank | bytes per worker | DDP / run |")
    print("|---|---|---|---|---|")
    for r in results:
        rel = f"{(r['eval_loss'] / reference - 1) * 100:+.1f}%" if reference else ""
        print(f"| {r['name']} | {r['eval_loss']:.3f} | {rel} | {r['bytes_per_worker'] / 1e6:,.1f} MB | "
              f"{r['ddp_over_bytes']:,.0f}x |")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
