"""Time to a target eval loss per worker link speed, from a comm_quality report: when each run first
reached the target (its eval-loss curve), the compute it took to get there and the bytes a worker moved
until then, at 10 Gbit/s, 1 Gbit/s and 100 Mbit/s per worker.

    python benchmarks/time_to_target.py                             # the language model, DDP's final loss
    python benchmarks/time_to_target.py --preset shakespeare --target 1.75

A model on measured figures, not an emulated link: per worker, time = compute + bytes / link, with
no overlap of the two (and, as a bound, max(compute, bytes / link) with perfect overlap). Compute is
this machine's training time up to the target divided by the workers (ideal data parallelism):
the full-rank run's for DDP and DiLoCo (the same model and samples per rank), each LTE run's own
(its simulated heads, all in one process). Bytes are the report's bytes per worker, pro rata to the
steps (the first base download is spread over the run). Latency, the server's own link and any
straggling are left out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, write_json

LINKS = {"10 Gbit/s": 10e9, "1 Gbit/s": 1e9, "100 Mbit/s": 100e6}  # bits per second per worker
FULL_RANK_COMPUTE = ("full", "diloco")  # runs whose compute is the full-rank model's


def reached(run: dict, target: float) -> int | None:
    """The first step whose eval loss is at or below the target, or None."""
    return next((step for step, loss in run["curve"] if loss <= target), None)


def rows(report: dict, target: float) -> list[dict]:
    steps, workers = report["steps"], report["workers"]
    full = next(r for r in report["runs"] if r["name"] == "full")
    out = []
    for run in report["runs"]:
        step = reached(run, target)
        row = {"name": run["name"], "step": step, "bytes_per_worker": run["bytes_per_worker"]}
        if step is not None:
            share = step / steps
            train_s = full["train_s"] if run["name"].startswith(FULL_RANK_COMPUTE) else run["train_s"]
            compute, moved = train_s * share / workers, run["bytes_per_worker"] * share
            row.update(compute_s=compute, bytes=moved, links={
                link: {"serial_s": compute + moved * 8 / bps, "overlapped_s": max(compute, moved * 8 / bps)}
                for link, bps in LINKS.items()})
        out.append(row)
    return out


def markdown(report: dict, target: float, table: list[dict]) -> str:
    lines = [f"Time to an eval loss <= {target:.4g} per worker "
             f"({report['preset']}, {report['workers']} workers, {report['steps']} steps; compute measured on "
             f"{report['machine']['device']}; seconds, compute + transfer, in brackets with perfect overlap):", "",
             "| run | reached at step | compute s | MB moved | " + " | ".join(LINKS) + " |",
             "|---|---|---|---|" + "---|" * len(LINKS)]
    for r in table:
        name = "full-rank (DDP)" if r["name"] == "full" else r["name"]
        if r["step"] is None:
            lines.append(f"| {name} | not reached | | | " + " | ".join("—" for _ in LINKS) + " |")
            continue
        cells = " | ".join(f"{r['links'][k]['serial_s']:,.0f} ({r['links'][k]['overlapped_s']:,.0f})" for k in LINKS)
        lines.append(f"| {name} | {r['step']} | {r['compute_s']:,.0f} | {r['bytes'] / 1e6:,.1f} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare", help="the comm_quality report to read (its preset)")
    parser.add_argument("--report", type=Path, default=None,
                        help="a comm_quality JSON (default: benchmarks/figures/comm_quality_<preset>.json)")
    parser.add_argument("--target", type=float, default=None, help="eval loss (default: the full-rank run's final)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON (default: benchmarks/results/time_to_target_<preset>.json; the table beside it)")
    args = parser.parse_args()
    path = args.report or ROOT / "benchmarks" / "figures" / f"comm_quality_{args.preset}.json"
    report = json.loads(path.read_text())
    report.setdefault("preset", args.preset)
    full = next(r for r in report["runs"] if r["name"] == "full")
    target = args.target if args.target is not None else full["eval_loss"]
    table = rows(report, target)
    out = write_json(args.out or ROOT / "benchmarks" / "results" / f"time_to_target_{args.preset}.json",
                     {"benchmark": "time_to_target", "report": str(path.relative_to(ROOT)), "target_eval_loss": target,
                      "links_bits_per_s": LINKS, "rows": table})
    text = markdown(report, target, table)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
