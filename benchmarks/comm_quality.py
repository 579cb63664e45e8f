"""Bytes per worker against final quality: LTE across round lengths T and outer optimizers, next to
full-rank training, on the language-model default (configs/shakespeare_char.yaml).

    python benchmarks/comm_quality.py                          # every run of the CPU preset, 2 at a time
    python benchmarks/comm_quality.py --runs lte-T50-nesterov  # some of them
    python benchmarks/comm_quality.py --steps 40 --runs full,lte-T10   # the code path in a minute

Every run trains the same samples (train.steps at batch 64) in its own `lte-train` process. The LTE
runs are mode=lte: N simulated heads merge exactly as N parameter-server workers of one head each
would (tests/test_dist.py holds ps == lte to 1e-5), so their quality is that of the mode=ps run
the bytes are counted for. mode=diloco runs as WORKERS processes and reports its own byte counters
(one ring all-reduce of the model a round). Bytes per worker over a run come from the parameter server's message
layouts for WORKERS workers x 1 head (lte.distributed.protocol, the sizes its byte counters count:
tests/test_dist.py checks the counters against them): the first base download, then every round's
upload and download. DDP's are what its counting hook adds up for the full-rank model over WORKERS
ranks, a ring all-reduce of the fp32 gradient every step; full-rank training in one process gives
DDP's quality (the same global batch and steps).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
from pathlib import Path

from common import ROOT, machine, read_metrics, run_train, train_command, write_json
from lte import core
from lte.data import build_data
from lte.distributed.protocol import worker_protocols
from lte.train.config import load_config
from lte.train.engine import build_model
from lte.train.report import pyplot

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
    "lte-T10-int4": ["lte.merge_every=10", "comm.upload=int4"],
    "lte-T100-nesterov-int8": ["lte.merge_every=100", "eval.every=1", *NESTEROV, "comm.upload=int8"],
    "lte-T100-nesterov-int4": ["lte.merge_every=100", "eval.every=1", *NESTEROV, "comm.upload=int4"],
    "lte-T200-nesterov-int4": ["lte.merge_every=200", "eval.every=1", *NESTEROV, "comm.upload=int4"],
    "diloco-H50": ["mode=diloco", "lte.merge_every=50", "eval.every=2", *DILOCO_OUTER],
    "diloco-H100": ["mode=diloco", "lte.merge_every=100", "eval.every=1", *DILOCO_OUTER],
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
    """One run of RUNS; DiLoCo as WORKERS processes, whose byte counters it reports."""
    out_dir = work / name
    overrides = [*COMMON, *RUNS[name], f"train.steps={steps}", f"out_dir={out_dir}"]
    nproc = WORKERS if "mode=diloco" in RUNS[name] else None
    summary = run_train(train_command("--config", CONFIG, *overrides, nproc=nproc), out_dir, log=work / f"{name}.log")
    curve = [(r["step"], r["eval_loss"]) for r in read_metrics(out_dir) if "eval_loss" in r]
    out = {"name": name, "overrides": RUNS[name], "eval_loss": summary["eval"]["loss"], "curve": curve,
           "train_s": summary["train_s"], "merges": summary["merges"]}
    if nproc:
        out["measured_bytes_per_worker"] = summary["comm"]["bytes_per_step_per_worker"] * summary["steps"]
    return out


def pareto(results: list[dict]) -> list[str]:
    """The runs no other run beats on both bytes and final loss."""
    return [r["name"] for r in results
            if not any(o["bytes_per_worker"] <= r["bytes_per_worker"] and o["eval_loss"] <= r["eval_loss"]
                       and (o["bytes_per_worker"], o["eval_loss"]) != (r["bytes_per_worker"], r["eval_loss"])
                       for o in results)]


def plot(report: dict, png: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    runs = report["runs"]
    for r in runs:
        ax.scatter(r["bytes_per_worker"], r["eval_loss"], color="tab:red" if r["name"] in report["pareto"] else "grey")
        ax.annotate(r["name"], (r["bytes_per_worker"], r["eval_loss"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    front = sorted((r for r in runs if r["name"] in report["pareto"]), key=lambda r: r["bytes_per_worker"])
    ax.plot([r["bytes_per_worker"] for r in front], [r["eval_loss"] for r in front], color="tab:red", linewidth=1,
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(f"bytes per worker over the run ({report['workers']} workers)")
    ax.set_ylabel("final eval loss")
    ax.set_title(f"{report['config']}, {report['steps']} steps ({report['machine']['device']})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--steps", type=int, default=1500, help="every run's steps (batch 64)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (each uses one thread)")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "comm-quality-runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "comm_quality.json")
    parser.add_argument("--keep", action="store_true",
                        help="keep the runs of an existing --out report that this invocation does not run")
    args = parser.parse_args()
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; there are {list(RUNS)}")
    if args.parallel > 1:  # one thread a run: runs side by side must not fight over the cores
        os.environ["OMP_NUM_THREADS"] = "1"
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda n: run_one(n, args.steps, args.work), names))
    ddp = ddp_bytes_per_worker(args.steps)
    for r in results:
        if r["name"] == "full":
            r["bytes_per_worker"] = ddp
        else:
            r["bytes_per_worker"] = r.get("measured_bytes_per_worker") or ps_bytes_per_worker(RUNS[r["name"]],
                                                                                              args.steps)
        r["ddp_over_bytes"] = ddp / r["bytes_per_worker"]
    if args.keep and args.out.exists():
        earlier = json.loads(args.out.read_text())
        if earlier["steps"] == args.steps:
            results = [r for r in earlier["runs"] if r["name"] not in names] + results
    results.sort(key=lambda r: list(RUNS).index(r["name"]))
    reference = next((r["eval_loss"] for r in results if r["name"] == "full"), None)
    for r in results:  # the first evaluation at or below full-rank's final loss
        reach = next((step for step, loss in r["curve"] if reference is not None and loss <= reference), None)
        r["samples_to_full_rank_loss"] = None if reach is None else reach * load_config(CONFIG).train.batch_size
    report = {"benchmark": "comm_quality", "config": str(CONFIG.relative_to(ROOT)), "steps": args.steps,
              "workers": WORKERS, "machine": machine("cpu"), "ddp_bytes_per_worker": ddp, "runs": results,
              "pareto": pareto(results)}
    write_json(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    print(f"{report['config']}, {args.steps} steps of batch 64; bytes per worker over the run, {WORKERS} workers "
          "(LTE: a parameter server and 4 workers x 1 head; full-rank: DDP over 4 ranks)")
    print("| run | final eval loss | vs full-rank | samples to full-rank's loss | bytes per worker | DDP / run |")
    print("|---|---|---|---|---|---|")
    for r in results:
        rel = f"{(r['eval_loss'] / reference - 1) * 100:+.1f}%" if reference else ""
        reach = r["samples_to_full_rank_loss"]
        front = " (Pareto)" if r["name"] in report["pareto"] else ""
        print(f"| {r['name']}{front} | {r['eval_loss']:.3f} | {rel} | {'-' if reach is None else f'{reach:,}'} | "
              f"{r['bytes_per_worker'] / 1e6:,.2f} MB | {r['ddp_over_bytes']:,.0f}x |")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
