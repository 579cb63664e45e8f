"""What comm.overlap buys in wall time on a slow link, and what it costs in quality: a parameter-server
run of a lowcomm config with and without overlap, each worker's link emulated at a few bandwidths
(dist.emulate_link_mbps: every message a worker sends or receives waits bytes / bandwidth).

    python benchmarks/overlap.py                                  # digits_lowcomm, no link and 0.25 Mbit/s
    python benchmarks/overlap.py --mbps 0,1,0.25 --steps 600      # more links, shorter runs
    python benchmarks/overlap.py --preset shakespeare --mbps 0,2  # the language model (5 processes, long)

The bandwidths are per worker and small because the digits model is: what carries over to a bigger
model is the ratio of a round's link time to its compute time, which the table gives ("link / compute").
A run already finished in --work is read back, not run again. Without overlap a round's exchange
waits out the link after the compute; with it, the exchange of round k runs during round k+1 and
only the last round (and checkpoint rounds: none here) waits. Quality: the eval metric of each run
(one round stale costs what it costs; benchmarks/comm_quality.py has the simulated runs at 1,500 steps).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, machine, run_train, train_command, write_json

PRESETS = {  # the lowcomm configs and their process counts (a server and the workers)
    "digits": {"config": "digits_lowcomm.yaml", "nproc": 3, "metric": "accuracy", "mbps": "0,0.25"},
    "shakespeare": {"config": "shakespeare_char_lowcomm.yaml", "nproc": 5, "metric": "loss", "mbps": "0,2"},
}
COMMON = ["train.device=cpu", "checkpoint.every=0"]


def run_one(config: Path, nproc: int, mbps: float, overlap: bool, steps: int | None, work: Path) -> dict:
    name = f"link{mbps:g}-{'overlap' if overlap else 'serial'}"
    out_dir = work / name
    overrides = [*COMMON, f"dist.emulate_link_mbps={mbps}", f"comm.overlap={str(overlap).lower()}",
                 f"out_dir={out_dir}", *([f"train.steps={steps}"] if steps else [])]
    print(f"{name} ...", flush=True)
    s = run_train(train_command("--config", config, *overrides, nproc=nproc), out_dir, log=work / f"{name}.log")
    workers = [r for r in s["comm"]["per_rank"] if r["rank"] >= s["comm"]["servers"]]
    moved = sum(r["bytes_sent"] + r["bytes_received"] for r in workers) / len(workers)
    rounds = s["merges"]
    return {"name": name, "link_mbps": mbps, "overlap": overlap, "wall_s": s["wall_s"], "rounds": rounds,
            "eval": s["eval"], "bytes_per_worker": moved, "compute_s_per_round": s["round_time"]["compute_s"],
            "link_s_per_round": moved * 8 / (mbps * 1e6) / rounds if mbps else 0.0}


def markdown(rows: list[dict], metric: str) -> str:
    lines = ["| link per worker | overlap | link / compute a round | wall s | vs serial | eval " + metric + " |",
             "|---|---|---:|---:|---:|---:|"]
    serial = {r["link_mbps"]: r["wall_s"] for r in rows if not r["overlap"]}
    for r in rows:
        link = f"{r['link_mbps']:g} Mbit/s" if r["link_mbps"] else "none (loopback)"
        ratio = r["link_s_per_round"] / r["compute_s_per_round"]
        gain = f"{serial[r['link_mbps']] / r['wall_s']:.2f}x" if r["link_mbps"] in serial else ""
        lines.append(f"| {link} | {'on' if r['overlap'] else 'off'} | {ratio:.2f} | {r['wall_s']:,.0f} | {gain} | "
                     f"{r['eval'][metric]:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="digits")
    parser.add_argument("--mbps", default=None, help="comma-separated link bandwidths per worker; 0: no emulation")
    parser.add_argument("--steps", type=int, default=None, help="train.steps (default: the config's)")
    parser.add_argument("--work", type=Path, default=None, help="the runs' out_dirs (default: benchmarks/results/)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON (default: benchmarks/results/overlap_<preset>.json; the table beside it)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    config = ROOT / "configs" / preset["config"]
    work = args.work or ROOT / "benchmarks" / "results" / f"overlap-{args.preset}"
    links = [float(v) for v in (args.mbps or preset["mbps"]).split(",")]
    rows = [run_one(config, preset["nproc"], mbps, overlap, args.steps, work) for mbps in links
            for overlap in (False, True)]
    out = write_json(args.out or ROOT / "benchmarks" / "results" / f"overlap_{args.preset}.json",
                     {"benchmark": "overlap", "config": preset["config"], "steps": args.steps,
                      "machine": machine("cpu"), "runs": rows})
    text = markdown(rows, preset["metric"])
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
