"""LTE against full-rank training of the same GPT on the same data: evaluation loss against samples
seen and against training time, as JSON and one PNG.

    python benchmarks/quality.py                      # CPU preset: configs/shakespeare_char.yaml
    python benchmarks/quality.py --preset gpu         # gpt_mini on Shakespeare, 32 heads x r16, bf16
    python benchmarks/quality.py --preset gpu --dry-run   # the GPU preset's code path, tiny, on the CPU
    python benchmarks/quality.py --set lte.lr=1e-2 --tag lr1e-2   # overrides for every run

Each run is `lte-train` in its own process (out_dir: OUT_DIR/quality-<preset>[-tag]/<run>), so
what is measured is what a user runs. The headline number is the sample ratio: the samples LTE
needed to first reach, at an evaluation, the best evaluation loss of the full-rank run, over the
samples full-rank needed to reach it (the LTE paper reports about 1.4x on ImageNet). LTE may be
given a longer budget than full-rank (--lte-steps-factor, as the paper trains LTE longer and stops
once it matches), with its learning-rate schedule stretched over that budget.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import ROOT, loadavg, machine, read_metrics, read_summary, run_train, train_command, write_json
from lte.runtime.config import load_config
from lte.train.report import eval_curve, pyplot

PRESETS = {
    "cpu": {
        "config": "configs/shakespeare_char.yaml",
        "runs": {"full": ["mode=full"], "lte": ["mode=lte"],
                 # the token embedding as an LTE layer instead of a trained copy per head
                 "lte-emb": ["mode=lte", "lte.embeddings=lte"]},
        "default_runs": ["full", "lte"],
        "common": ["train.device=cpu"],
        "lte_steps_factor": 1.5,
    },
    "gpu": {
        "config": "configs/gpt_mini_shakespeare.yaml",
        "runs": {
            "full": ["mode=full"],
            # The paper's 32 heads x r16, with s * lr scaled from the CPU runs (s = 8, lr 3e-3, where
            # the A factors' norm sqrt(rank / width) was 0.5) to this A's norm of 0.2: s = 20.
            "lte": ["mode=lte", "lte.alpha=320", "lte.lr=3.0e-3"],
            "lte-paper-lr": ["mode=lte"],   # the config as printed: alpha 4096, lr 2e-6
            # fewer, wider heads (heads x rank = 2 x width), what tracked full-rank best on the CPU
            "lte-h8r96": ["mode=lte", "lte.heads=8", "lte.rank=96", "lte.alpha=768", "lte.lr=3.0e-3"],
        },
        "default_runs": ["full", "lte"],
        # 1000 steps of 131k tokens (130 passes over the text): past full-rank's best already
        "common": ["train.device=cuda", "train.steps=1000", "eval.every=5"],
        "lte_steps_factor": 1.5,
    },
}
# Tiny shapes and a few steps, on the CPU, without compilation: the preset's code path in a minute.
DRY_RUN = ["model.args={n_layer: 1, n_head: 2, n_embd: 32, block_size: 16}", "data.args.block_size=16",
           "train.steps=20", "train.warmup_steps=2", "train.batch_size=64", "train.log_every=5",
           "train.compile=false", "train.device=cpu", "lte.merge_every=5", "eval.every=1", "eval.batch_size=32",
           "eval.batches=2"]


def run_one(name: str, config: str, overrides: list[str], out_dir: Path, timeout: float) -> dict:
    cmd = train_command("--config", config, *overrides, f"out_dir={out_dir}", "checkpoint.every=0",
                        "checkpoint.resume=false")
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    load_before, t0 = loadavg(), time.perf_counter()
    summary = run_train(cmd, out_dir, log=out_dir / "stdout.log", timeout=timeout)
    rates = [r["samples_per_s"] for r in read_metrics(out_dir) if r.get("samples_per_s") is not None]
    return {"name": name, "command": cmd[1:], "curve": eval_curve(out_dir), "summary": summary,
            # the first logged interval holds start-up (and compilation): leave it out
            "samples_per_s_steady": statistics.median(rates[1:]) if len(rates) > 1 else summary["samples_per_s"],
            "process_wall_s": time.perf_counter() - t0, "loadavg_before": load_before, "loadavg_after": loadavg()}


def first_reach(curve: dict, target: float) -> int | None:
    """Index of the first evaluation at or below target."""
    return next((i for i, v in enumerate(curve["eval_loss"]) if v <= target), None)


def compare(full: dict, lte: dict) -> dict:
    fc, lc = full["curve"], lte["curve"]
    best_i = min(range(len(fc["eval_loss"])), key=fc["eval_loss"].__getitem__)
    best = fc["eval_loss"][best_i]
    out = {"full_best_loss": best, "full_best_samples": fc["samples"][best_i],
           "full_best_train_s": fc["train_s"][best_i],
           "full_final_loss": fc["eval_loss"][-1], "lte_best_loss": min(lc["eval_loss"]),
           "lte_final_loss": lc["eval_loss"][-1], "lte_reaches_full_best": False}
    # LTE's loss at full-rank's sample budget (the last LTE evaluation within it)
    within = [i for i, s in enumerate(lc["samples"]) if s <= fc["samples"][-1]]
    if within:
        out["lte_loss_at_full_budget"] = lc["eval_loss"][within[-1]]
    i = first_reach(lc, best)
    if i is not None:
        out.update(lte_reaches_full_best=True, lte_reach_samples=lc["samples"][i], lte_reach_train_s=lc["train_s"][i],
                   sample_ratio=lc["samples"][i] / fc["samples"][best_i],
                   time_ratio=(lc["train_s"][i] / fc["train_s"][best_i]) if fc["train_s"][best_i] else None)
    return out


def plot(results: list[dict], cmp: dict | None, out: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, x, label in ((axes[0], "samples", "samples seen (windows)"), (axes[1], "train_s", "training time (s)")):
        for r in results:
            c = r["curve"]
            ax.plot(c[x], c["eval_loss"], marker=".", label=r["name"])
        if cmp is not None:
            ax.axhline(cmp["full_best_loss"], color="grey", linestyle=":", linewidth=1,
                       label=f"full-rank best {cmp['full_best_loss']:.3f}")
            if cmp["lte_reaches_full_best"]:
                key = "lte_reach_samples" if x == "samples" else "lte_reach_train_s"
                ratio = cmp["sample_ratio"] if x == "samples" else cmp["time_ratio"]
                ax.axvline(cmp[key], color="tab:red", linestyle="--", linewidth=1,
                           label=f"LTE reaches it ({ratio:.2f}x full-rank's {x.replace('train_s', 'time')})")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_ylabel("eval loss (per token)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_report(report: dict, png_path: Path) -> None:
    results, host = report["runs"], report["machine"]
    what = ", ".join(f"{r['name']}: " + (f"{r['summary']['heads']} heads" if r["summary"]["heads"] else "full-rank")
                     for r in results)
    threads = f", {host['omp_num_threads']} thread(s)" if host.get("omp_num_threads") else ""
    plot(results, report["comparison"], png_path,
         f"{report['config']} ({report['preset']} preset{', dry run' if report['dry_run'] else ''}; {what}; "
         f"{host['device']}{threads})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--runs", default=None, help="comma-separated runs of the preset (default: full,lte)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--lte-set", action="append", default=[], metavar="KEY=VALUE", help="override for LTE runs")
    parser.add_argument("--lte-steps-factor", type=float, default=None,
                        help="LTE's step budget as a multiple of full-rank's (preset default)")
    parser.add_argument("--full-from", type=Path, default=None, metavar="RUN_DIR",
                        help="take the full-rank run from this finished run folder instead of running it")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, a few steps, CPU, no compile")
    parser.add_argument("--tag", default="", help="suffix of the output names")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=None, metavar="JSON",
                        help="the report's path (default: OUT_DIR/quality-<preset>[-tag].json); the PNG and "
                             "the runs' folders go beside it")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="redraw the PNG of a finished benchmark from its JSON, and stop")
    args = parser.parse_args()
    if args.replot is not None:
        plot_report(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    preset = PRESETS[args.preset]
    names = args.runs.split(",") if args.runs else preset["default_runs"]
    unknown = [n for n in names if n not in preset["runs"]]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; preset {args.preset} has {sorted(preset['runs'])}")
    common = [*preset["common"], *(DRY_RUN if args.dry_run else []), *args.set]
    config = str(ROOT / preset["config"])
    full_steps = load_config(config, common).train.steps
    factor = preset["lte_steps_factor"] if args.lte_steps_factor is None else args.lte_steps_factor
    stem = f"quality-{args.preset}{'-dryrun' if args.dry_run else ''}{'-' + args.tag if args.tag else ''}"
    json_path = args.out if args.out is not None else args.out_dir / f"{stem}.json"
    png_path, base = json_path.with_suffix(".png"), json_path.with_suffix("")

    results = []
    if args.full_from is not None:
        names = [n for n in names if n != "full"]
        summary = read_summary(args.full_from)
        results.append({"name": "full", "command": None, "from": str(args.full_from),
                        "curve": eval_curve(args.full_from), "summary": summary,
                        "samples_per_s_steady": summary["samples_per_s"]})
        full_steps = summary["steps"]
    for name in names:
        overrides = [*common, *preset["runs"][name]]
        if name.startswith("lte"):
            overrides += [f"train.steps={max(1, round(full_steps * factor))}", *args.lte_set]
        load_config(config, overrides)  # a bad override stops here, before any run
        results.append(run_one(name, config, overrides, base / name, args.timeout))
    by_name = {r["name"]: r for r in results}
    cmp = compare(by_name["full"], by_name["lte"]) if {"full", "lte"} <= set(by_name) else None

    report = {"benchmark": "quality", "preset": args.preset, "dry_run": args.dry_run, "config": preset["config"],
              "common_overrides": common, "lte_steps_factor": factor,
              "machine": machine("cpu" if args.dry_run else None), "comparison": cmp, "runs": results}
    write_json(json_path, report)
    plot_report(report, png_path)

    print(f"{'run':<14} {'steps':>6} {'best eval':>10} {'final eval':>10} {'samples/s':>10} {'train s':>8}")
    for r in results:
        s, c = r["summary"], r["curve"]
        print(f"{r['name']:<14} {s['steps']:>6} {min(c['eval_loss']):>10.4f} {c['eval_loss'][-1]:>10.4f} "
              f"{r['samples_per_s_steady']:>10,.0f} {s['train_s']:>8.1f}")
    if cmp is not None:
        if cmp["lte_reaches_full_best"]:
            print(f"LTE first reaches full-rank's best eval loss {cmp['full_best_loss']:.4f} after "
                  f"{cmp['lte_reach_samples']:,} samples: {cmp['sample_ratio']:.2f}x the {cmp['full_best_samples']:,} "
                  f"full-rank needed ({cmp['time_ratio'] or float('nan'):.2f}x its training time)")
        else:
            print(f"LTE did not reach full-rank's best eval loss {cmp['full_best_loss']:.4f} "
                  f"(its best: {cmp['lte_best_loss']:.4f})")
    print(f"-> {json_path}, {png_path}")


if __name__ == "__main__":
    main()
