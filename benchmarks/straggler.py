"""A straggler in an elastic run: late uploads dropped (dist.late=drop) or merged one round stale
(dist.late=stale), with the rounds each slot contributed and the final eval of each, over seeds.

    python benchmarks/straggler.py                      # digits, 3 slots x 2 heads, seeds 0,1,2
    python benchmarks/straggler.py --seeds 0 --steps 200

The server (lte-train serve) and 3 workers (lte-train join) are processes of their own on loopback.
Worker rank 3 sleeps `--sleep` seconds before every upload from round 3 to the second-last round, so
each of those uploads misses the round's deadline (dist.round_deadline_s) and arrives during the next
round: dropped, the slot's heads restart on the current base; stale, the upload goes into the next
merge as the change against the base it trained on. A run with no straggler gives the reference.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, child_env, machine, read_summary, write_json

CONFIG = ROOT / "configs" / "digits.yaml"
COMMON = ["mode=ps", "lte.heads=6", "worker.heads=2", "train.batch_size=60", "train.device=cpu",
          "checkpoint.every=0", "eval.every=0", "train.log_every=100"]


def run_one(name: str, seed: int, steps: int, overrides: list[str], straggler: dict, work: Path) -> dict:
    """One elastic run to its end: the server's summary. `straggler`: worker rank 3's environment."""
    out_dir = work / f"{name}-seed{seed}"
    args = ["--config", str(CONFIG), *COMMON, f"seed={seed}", f"train.steps={steps}", *overrides,
            f"out_dir={out_dir}"]
    if (out_dir / "summary.json").exists():
        return read_summary(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**child_env(), "OMP_NUM_THREADS": "1"}
    logs, procs = [], []

    def start(tag: str, extra: list[str], more_env: dict) -> subprocess.Popen:
        logs.append(work / f"{name}-seed{seed}-{tag}.log")
        procs.append(subprocess.Popen([sys.executable, "-m", "lte.train", *extra, *args], cwd=ROOT,
                                      env={**env, **more_env}, stdout=logs[-1].open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    print(f"{name} seed {seed} ...", flush=True)
    server = start("server", ["serve", "--port", "0"], {})
    try:
        address = None
        while address is None and server.poll() is None:
            time.sleep(0.2)
            found = re.search(r"listening on (127\.0\.0\.1:\d+)", logs[0].read_text())
            address = found and found.group(1)
        for slot in range(3):
            start(f"w{slot + 1}", ["join", "--server", address, "--slot", str(slot)], straggler if slot == 2 else {})
        if server.wait(timeout=1800) != 0:
            raise SystemExit(f"the server of {name} seed {seed} failed:\n{logs[0].read_text()[-3000:]}")
        for p in procs[1:]:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return read_summary(out_dir)


def row(name: str, summaries: list[dict]) -> dict:
    losses = [s["eval"]["loss"] for s in summaries]
    accs = [s["eval"]["accuracy"] for s in summaries]
    straggler = [s["elastic"][2] for s in summaries]
    return {"name": name, "eval_loss": losses, "eval_accuracy": accs,
            "mean_loss": sum(losses) / len(losses), "mean_accuracy": sum(accs) / len(accs),
            "merges": summaries[0]["merges"],
            "straggler_contributed": [r["rounds_contributed"] for r in straggler],
            "straggler_late": [r["rounds_late"] for r in straggler],
            "straggler_merged_stale": [r.get("rounds_merged_stale", 0) for r in straggler],
            "wall_s": [round(s["wall_s"], 1) for s in summaries]}


def markdown(rows: list[dict]) -> str:
    lines = ["| run | merges | straggler's rounds merged (late, of them stale) | eval loss: mean (per seed) "
             "| accuracy: mean | wall s |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        contributed = "/".join(map(str, r["straggler_contributed"]))
        late = "/".join(map(str, r["straggler_late"]))
        stale = "/".join(map(str, r["straggler_merged_stale"]))
        per_seed = " / ".join(f"{v:.3f}" for v in r["eval_loss"])
        lines.append(f"| {r['name']} | {r['merges']} | {contributed} ({late}, {stale}) | {r['mean_loss']:.3f} "
                     f"({per_seed}) | {r['mean_accuracy']:.3f} | {'/'.join(f'{w:.0f}' for w in r['wall_s'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300, help="at lte.merge_every=10: steps / 10 rounds")
    parser.add_argument("--deadline", type=float, default=2.0, help="dist.round_deadline_s")
    parser.add_argument("--sleep", type=float, default=2.5, help="seconds the straggler sleeps before uploading")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "straggler")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "straggler.json")
    a = parser.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    rounds = a.steps // 10
    sleepy = {"LTE_FAULT": f"sleep:rank=3:round=3:rounds={rounds - 4}:seconds={a.sleep}"}
    deadline = [f"dist.round_deadline_s={a.deadline}"]
    runs = {"no straggler": ([], {}),
            "straggler, late dropped": ([*deadline, "dist.late=drop"], sleepy),
            "straggler, late merged stale": ([*deadline, "dist.late=stale"], sleepy)}
    rows = []
    for name, (overrides, straggler) in runs.items():
        slug = name.replace(", ", "-").replace(" ", "_")
        rows.append(row(name, [run_one(slug, seed, a.steps, overrides, straggler, a.work) for seed in seeds]))
    table = markdown(rows)
    print(table)
    write_json(a.out, {"machine": machine("cpu"), "steps": a.steps, "deadline_s": a.deadline, "sleep_s": a.sleep,
                       "seeds": seeds, "rows": rows})
    a.out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
