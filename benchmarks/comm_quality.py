"""Bytes per worker against final quality: full-rank (DDP), DiLoCo, and LTE across round lengths T,
outer optimizers and upload codecs, on the language-model default (configs/shakespeare_char.yaml,
4 workers x 1 head) or the digits ViT (configs/digits.yaml, 2 workers x 2 heads).

    python benchmarks/comm_quality.py                          # every run, the language model, 2 at a time
    python benchmarks/comm_quality.py --preset digits          # the digits ViT
    python benchmarks/comm_quality.py --runs lte-T50-nesterov --keep   # some runs, added to the last report
    python benchmarks/comm_quality.py --steps 40 --runs full,lte-T10 --fresh   # the code path in a minute
    python benchmarks/comm_quality.py --preset digits --seeds 0,1,2   # each run over 3 seeds: mean, range

A run already finished in --work (benchmarks/results/comm-quality-<preset>/<run>) is read back, not
run again (lte-train returns a finished run's summary): an interrupted benchmark continues where
it stopped; --fresh starts every run afresh.

Every run trains the same samples (train.steps at the config's batch) in its own `lte-train`
process, once per seed of --seeds (the seed draws the initial weights, the heads' streams and, on
the digits, the test split): a run reports the mean over its seeds and their range, and the Pareto
front is drawn on the means. One seed can mislead by more than the differences measured here: on
the digits, the same run moved by 4.5 points between seeds.

The lte-* runs are mode=lte: N simulated heads merge as the parameter server's workers' heads would
(tests/test_dist.py holds ps == lte to 1e-5, with an outer optimizer and int4 uploads too), so their
quality is that of the mode=ps run whose bytes are counted: those come from the parameter
server's message layouts for the preset's workers (lte.distributed.protocol, the sizes its byte
counters count, as tests/test_dist.py checks), the first base download, then every round's upload
and download (full downloads: the lte-* rows do not count comm.download=delta's savings). The ps-*
runs are mode=ps for real (a server and the preset's workers: nf4 bases with delta or error-fed
downloads, or fp32 bases with 2-bit error-fed ones) and report the bytes their counters counted.
mode=diloco runs as that many processes and reports its own byte counters (one ring all-reduce of the model a round).
DDP's bytes are what its counting hook adds up for the full-rank model over as many ranks, a ring
all-reduce of the fp32 gradient every step; full-rank training in one process gives DDP's quality
(the same global batch and steps).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
from pathlib import Path
from statistics import fmean

from common import ROOT, machine, read_metrics, run_train, train_command, write_json
from lte import core
from lte.data import build_data
from lte.distributed.protocol import worker_protocols
from lte.distributed.comm import ring_all_reduce_share
from lte.runtime.clock import RoundClock
from lte.runtime.config import load_config, resolve_heads
from lte.runtime.model import build_model
from lte.train.report import pyplot

COMMON = ["train.device=cpu", "checkpoint.every=0"]  # a finished run in --work is read back, not run again
NESTEROV = ["lte.outer=nesterov", "lte.outer_lr=1.0", "lte.outer_momentum=0.5"]
PS_LOWCOMM = ["worker.base_dtype=nf4", "comm.download=delta"]


def qsr(shortest: int) -> str:
    """Rounds that grow as the learning rate falls, from `shortest` steps to at most 400."""
    return f"lte.merge_every={{schedule: qsr, min: {shortest}, max: 400}}"


QSR20, QSR25, QSR30 = qsr(20), qsr(25), qsr(30)
PS_EF2 = ["worker.base_dtype=fp32", "comm.download=ef-int2"]
RANK32 = ["lte.rank=32", "lte.alpha=256"]
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
    "lte-T100-nesterov-m0.8": ["lte.merge_every=100", "eval.every=1", "lte.outer=nesterov", "lte.outer_lr=1.0",
                               "lte.outer_momentum=0.8"],
    "lte-T10-int4": ["lte.merge_every=10", "comm.upload=int4"],
    "lte-T50-nesterov-int4": ["lte.merge_every=50", "eval.every=2", *NESTEROV, "comm.upload=int4"],
    "lte-T100-int4": ["lte.merge_every=100", "eval.every=1", "comm.upload=int4"],
    "lte-T200-int4": ["lte.merge_every=200", "eval.every=1", "comm.upload=int4"],
    "lte-T100-nesterov-int8": ["lte.merge_every=100", "eval.every=1", *NESTEROV, "comm.upload=int8"],
    "lte-T100-nesterov-int4": ["lte.merge_every=100", "eval.every=1", *NESTEROV, "comm.upload=int4"],
    "lte-T200-nesterov-int4": ["lte.merge_every=200", "eval.every=1", *NESTEROV, "comm.upload=int4"],
    "lte-T10-overlap": ["lte.merge_every=10", "comm.overlap=true"],
    "lte-T50-nesterov-int4-overlap": ["lte.merge_every=50", "eval.every=2", *NESTEROV, "comm.upload=int4",
                                      "comm.overlap=true"],
    # mode=ps for real, as configs/digits_lowcomm.yaml ships: nf4 workers, delta downloads, bytes counted
    "ps-T50-nesterov-int4": ["mode=ps", "lte.merge_every=50", "eval.every=2", *NESTEROV, "comm.upload=int4",
                             *PS_LOWCOMM],
    "ps-T100-nesterov-int4": ["mode=ps", "lte.merge_every=100", "eval.every=1", *NESTEROV, "comm.upload=int4",
                              *PS_LOWCOMM],
    # issue 27's levers: rounds that grow as the learning rate falls (qsr: about T = 50's rounds in all),
    # a higher outer learning rate, lower rank (s = alpha / rank kept at 8), 2-bit uploads, error-fed downloads
    "lte-qsr20-nesterov-int4": [QSR20, "eval.every=2", *NESTEROV, "comm.upload=int4"],
    "lte-T50-nesterov1.5-int4": ["lte.merge_every=50", "eval.every=2", "lte.outer=nesterov", "lte.outer_lr=1.5",
                                 "lte.outer_momentum=0.5", "comm.upload=int4"],
    "lte-T50-nesterov-int4-r32": ["lte.merge_every=50", "eval.every=2", *NESTEROV, "comm.upload=int4", *RANK32],
    "lte-T50-nesterov-int2": ["lte.merge_every=50", "eval.every=2", *NESTEROV, "comm.upload=int2"],
    "lte-T50-nesterov-int2-r32": ["lte.merge_every=50", "eval.every=2", *NESTEROV, "comm.upload=int2", *RANK32],
    "lte-qsr20-nesterov-int2-r32": [QSR20, "eval.every=2", *NESTEROV, "comm.upload=int2", *RANK32],
    "ps-T50-nesterov-int4-r32-ef": ["mode=ps", "lte.merge_every=50", "eval.every=2", *NESTEROV, "comm.upload=int4",
                                    *RANK32, "worker.base_dtype=nf4", "comm.download=ef-int8"],
    "ps-T50-nesterov-int2-r32-ef": ["mode=ps", "lte.merge_every=50", "eval.every=2", *NESTEROV, "comm.upload=int2",
                                    *RANK32, "worker.base_dtype=nf4", "comm.download=ef-int8"],
    "ps-qsr20-nesterov-int4": ["mode=ps", QSR20, "eval.every=2", *NESTEROV, "comm.upload=int4", *PS_LOWCOMM],
    "ps-qsr20-nesterov-int4-r32-ef": ["mode=ps", QSR20, "eval.every=2", *NESTEROV, "comm.upload=int4", *RANK32,
                                      "worker.base_dtype=nf4", "comm.download=ef-int8"],
    "ps-qsr20-nesterov-int2-r32-fp32-ef4": ["mode=ps", QSR20, "eval.every=2", *NESTEROV, "comm.upload=int2", *RANK32,
                                            "worker.base_dtype=fp32", "comm.download=ef-int4"],
    "ps-qsr20-nesterov-int2-r32-ef": ["mode=ps", QSR20, "eval.every=2", *NESTEROV, "comm.upload=int2", *RANK32,
                                      "worker.base_dtype=nf4", "comm.download=ef-int8"],
    # fp32 workers whose base follows the master through 2-bit error-fed downloads (no nf4 error in the heads' base)
    "ps-qsr25-nesterov-int2-r32-fp32-ef2": ["mode=ps", QSR25, "eval.every=2", *NESTEROV, "comm.upload=int2", *RANK32,
                                            *PS_EF2],
    "ps-qsr20-nesterov-int4-fp32-ef2": ["mode=ps", QSR20, "eval.every=2", *NESTEROV, "comm.upload=int4", *PS_EF2],
    "ps-qsr30-nesterov-int2-fp32-ef2": ["mode=ps", QSR30, "eval.every=2", *NESTEROV, "comm.upload=int2", *PS_EF2],
    "ps-qsr25-nesterov-int4-r32-fp32-ef2": ["mode=ps", QSR25, "eval.every=2", *NESTEROV, "comm.upload=int4", *RANK32,
                                            *PS_EF2],
    "diloco-H50": ["mode=diloco", "lte.merge_every=50", "eval.every=2", *DILOCO_OUTER],
    "diloco-H100": ["mode=diloco", "lte.merge_every=100", "eval.every=1", *DILOCO_OUTER],
}
PRESETS = {  # the language-model default (4 workers x 1 head) and the digits (2 workers x 2 heads)
    "shakespeare": {"config": "shakespeare_char.yaml", "workers": 4, "metric": "loss"},
    "digits": {"config": "digits.yaml", "workers": 2, "metric": "accuracy"},
}


def ps_bytes_per_worker(config: Path, workers: int, overrides: list[str], steps: int) -> int:
    """Bytes one worker of a mode=ps run with these overrides sends and receives over the run."""
    cfg = resolve_heads(load_config(config, [*COMMON, *overrides, "mode=ps", f"train.steps={steps}"]), workers)
    data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
    model = build_model(cfg, data, None)
    spec, _ = core.plan(model, cfg.lte_config())
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items() if k in spec.master_keys()}
    proto = worker_protocols(cfg, spec, shapes, workers)[0]
    rounds = RoundClock.of(cfg).rounds
    return proto.download.nbytes + rounds * (proto.upload.nbytes + proto.download.nbytes)


def ddp_bytes_per_worker(config: Path, workers: int, steps: int) -> int:
    cfg = load_config(config, [*COMMON, "mode=ddp"])
    data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
    params = sum(p.numel() for p in build_model(cfg, data, None).parameters())
    per_step = 2 * ring_all_reduce_share(workers, params * 4)  # sent + received, as ddp.py counts
    return steps * per_step


def processes(name: str, workers: int) -> int | None:
    """How many processes a run takes (None: one, without torchrun)."""
    mode = next((o.split("=", 1)[1] for o in RUNS[name] if o.startswith("mode=")), "lte")
    return {"diloco": workers, "ps": workers + 1}.get(mode)


def run_one(name: str, seed: int, config: Path, workers: int, steps: int, work: Path) -> dict:
    """One seed of a run of RUNS; DiLoCo and mode=ps as processes whose byte counters it reports."""
    out_dir = work / f"{name}-seed{seed}"
    overrides = [*COMMON, *RUNS[name], f"seed={seed}", f"train.steps={steps}", f"out_dir={out_dir}"]
    nproc = processes(name, workers)
    summary = run_train(train_command("--config", config, *overrides, nproc=nproc), out_dir,
                        log=work / f"{name}-seed{seed}.log")
    curve = [(r["step"], r["eval_loss"]) for r in read_metrics(out_dir) if "eval_loss" in r]
    out = {"seed": seed, "eval_loss": summary["eval"]["loss"], "eval_accuracy": summary["eval"].get("accuracy"),
           "curve": curve, "merges": summary["merges"],
           "train_s": summary.get("train_s", summary["wall_s"])}  # a parameter server reports its wall time
    if nproc:
        out["measured_bytes_per_worker"] = summary["comm"]["bytes_per_step_per_worker"] * summary["steps"]
    return out


def over_seeds(name: str, runs: list[dict]) -> dict:
    """A run's seeds as one row: the mean of each figure, the range of the final quality, and the
    mean curve (every seed evaluates at the same steps)."""
    out = {"name": name, "overrides": RUNS[name], "seeds": [r["seed"] for r in runs], "per_seed": runs,
           "train_s": fmean([r["train_s"] for r in runs]), "merges": runs[0]["merges"],
           "curve": [(step, fmean([r["curve"][i][1] for r in runs])) for i, (step, _) in enumerate(runs[0]["curve"])]}
    for metric in ("eval_loss", "eval_accuracy"):
        values = [r[metric] for r in runs]
        out[metric] = None if None in values else fmean(values)
        out[f"{metric}_range"] = None if None in values else [min(values), max(values)]
    if "measured_bytes_per_worker" in runs[0]:
        out["measured_bytes_per_worker"] = fmean([r["measured_bytes_per_worker"] for r in runs])
    return out


def steps_to_reach(curve: list, loss: float) -> float | None:
    """The step at which a loss curve [(step, loss), ...] first reaches `loss`, linear between its
    evaluations (from (0, the first loss)); None if it never does."""
    previous = (0, curve[0][1]) if curve else None
    for step, value in curve:
        if value <= loss:
            (s0, v0) = previous
            return step if v0 <= loss or v0 == value else s0 + (step - s0) * (v0 - loss) / (v0 - value)
        previous = (step, value)
    return None


def ratio(x: float | None, measured: bool) -> str:
    """The DDP-to-its-loss ratio; where DDP never reaches the run's loss, says so."""
    if x is None:
        return "DDP never reaches it" if measured else "-"
    return f"{x:,.0f}x"


def spread(r: dict, metric: str) -> str:
    """A run's mean with its seeds' range, when it has more than one."""
    if r.get(metric) is None:
        return "-"
    low_high = r.get(f"{metric}_range")
    return f"{r[metric]:.3f}" + (f" ({low_high[0]:.3f}–{low_high[1]:.3f})" if len(r.get("seeds", [0])) > 1 else "")


def badness(r: dict, metric: str) -> float:
    return r["eval_loss"] if metric == "loss" else -r["eval_accuracy"]


def pareto(results: list[dict], metric: str) -> list[str]:
    """The runs no other run beats on both bytes and final quality."""
    key = lambda r: (r["bytes_per_worker"], badness(r, metric))  # noqa: E731
    return [r["name"] for r in results
            if not any(all(a <= b for a, b in zip(key(o), key(r))) and key(o) != key(r) for o in results)]


def plot(report: dict, png: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    runs = report["runs"]
    y = "eval_loss" if report["metric"] == "loss" else "eval_accuracy"
    for r in runs:
        low, high = r.get(f"{y}_range") or (r[y], r[y])  # the seeds' range as an error bar
        ax.errorbar(r["bytes_per_worker"], r[y], yerr=[[r[y] - low], [high - r[y]]], fmt="o", capsize=2,
                    color="tab:red" if r["name"] in report["pareto"] else "grey")
        ax.annotate(r["name"], (r["bytes_per_worker"], r[y]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    front = sorted((r for r in runs if r["name"] in report["pareto"]), key=lambda r: r["bytes_per_worker"])
    ax.plot([r["bytes_per_worker"] for r in front], [r[y] for r in front], color="tab:red", linewidth=1,
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(f"bytes per worker over the run ({report['workers']} workers)")
    ax.set_ylabel(f"final eval {report['metric']}")
    seeds = report.get("seeds", [0])
    ax.set_title(f"{report['config']}, {report['steps']} steps, mean of {len(seeds)} seed(s) "
                 f"({report['machine']['device']})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="shakespeare")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--steps", type=int, default=1500, help="every run's steps (batch 64)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds: each run once per seed")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (each uses one thread)")
    parser.add_argument("--work", type=Path, default=None, help="the runs' out_dirs (default: benchmarks/results/)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the report (default: benchmarks/results/comm_quality_<preset>.json; the PNG beside it)")
    parser.add_argument("--fresh", action="store_true", help="delete --work first: every run from scratch")
    parser.add_argument("--keep", action="store_true",
                        help="keep the runs of an existing --out report that this invocation does not run")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    config, workers, metric = ROOT / "configs" / preset["config"], preset["workers"], preset["metric"]
    work = args.work or ROOT / "benchmarks" / "results" / f"comm-quality-{args.preset}"
    out = args.out or ROOT / "benchmarks" / "results" / f"comm_quality_{args.preset}.json"
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; there are {list(RUNS)}")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    if args.parallel > 1:  # one thread a run: runs side by side must not fight over the cores
        os.environ["OMP_NUM_THREADS"] = "1"
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(n, seed) for n in names for seed in seeds]
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        done = list(pool.map(lambda job: run_one(*job, config, workers, args.steps, work), jobs))
    results = [over_seeds(n, done[i * len(seeds):(i + 1) * len(seeds)]) for i, n in enumerate(names)]
    ddp = ddp_bytes_per_worker(config, workers, args.steps)
    for r in results:
        if r["name"] == "full":
            r["bytes_per_worker"] = ddp
        else:
            r["bytes_per_worker"] = r.get("measured_bytes_per_worker") or ps_bytes_per_worker(
                config, workers, RUNS[r["name"]], args.steps)
        r["ddp_over_bytes"] = ddp / r["bytes_per_worker"]
    if args.keep and out.exists():
        earlier = json.loads(out.read_text())
        if earlier["steps"] == args.steps and earlier.get("seeds", [0]) == seeds:
            results = [r for r in earlier["runs"] if r["name"] not in names] + results
    results.sort(key=lambda r: list(RUNS).index(r["name"]))
    full = next((r for r in results if r["name"] == "full"), None)
    batch = load_config(config).train.batch_size
    for r in results:  # the first evaluation at or below full-rank's final loss
        reach = next((step for step, loss in r["curve"] if full is not None and loss <= full["eval_loss"]), None)
        r["samples_to_full_rank_loss"] = None if reach is None else reach * batch
        if full is not None and metric == "loss":  # what DDP spends to reach this run's final loss, over its bytes
            step = steps_to_reach(full["curve"], r["eval_loss"])
            reached = None if step is None else ddp * step / args.steps
            r["ddp_bytes_to_its_loss"] = reached
            r["ddp_to_its_loss_over_bytes"] = None if reached is None else reached / r["bytes_per_worker"]
    report = {"benchmark": "comm_quality", "preset": args.preset, "config": str(config.relative_to(ROOT)),
              "steps": args.steps, "seeds": seeds, "workers": workers, "metric": metric, "machine": machine("cpu"),
              "ddp_bytes_per_worker": ddp, "runs": results, "pareto": pareto(results, metric)}
    write_json(out, report)
    plot(report, out.with_suffix(".png"))
    print(f"{report['config']}, {args.steps} steps of batch {batch}; bytes per worker over the run, {workers} "
          f"workers (LTE: a parameter server and {workers} workers; full-rank: DDP over {workers} ranks)")
    print("| run | final eval loss | eval accuracy | vs full-rank | samples to full-rank's loss | bytes per worker "
          "| DDP / run | DDP to its loss / run |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if full is None:
            rel = ""
        elif metric == "loss":
            rel = f"{(r['eval_loss'] / full['eval_loss'] - 1) * 100:+.1f}%"
        else:
            rel = f"{(r['eval_accuracy'] - full['eval_accuracy']) * 100:+.1f} points"
        reach = r["samples_to_full_rank_loss"]
        front = " (Pareto)" if r["name"] in report["pareto"] else ""
        print(f"| {r['name']}{front} | {spread(r, 'eval_loss')} | {spread(r, 'eval_accuracy')} | {rel} | "
              f"{'-' if reach is None else f'{reach:,}'} | {r['bytes_per_worker'] / 1e6:,.2f} MB | "
              f"{r['ddp_over_bytes']:,.0f}x | "
              f"{ratio(r.get('ddp_to_its_loss_over_bytes'), 'ddp_bytes_to_its_loss' in r)} |")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
