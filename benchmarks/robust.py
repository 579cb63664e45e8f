"""What dist.robust costs an honest run and what it saves an attacked one, on the digits.

    python benchmarks/robust.py                       # honest runs over seeds 0,1,2, the attack on seed 0
    python benchmarks/robust.py --seeds 0 --skip-attack

Honest: the embedded default (configs/digits.yaml: 4 simulated heads, 1,500 steps, rounds of 10)
with dist.robust none and clip (drop bounds a head exactly when clip does, so until then it is the
same run); the largest change / median the rule saw says how far honest heads stay from the bound
(dist.robust_ratio, 4). Attacked: 3 parameter-server workers x 2 heads, 300 steps, rank 2 sending
100x its change in rounds 3-5 (LTE_FAULT=scale), with each rule, against the same run's 6
simulated heads undisturbed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, machine, read_summary, run_train, train_command, write_json

CONFIG = ROOT / "configs" / "digits.yaml"
COMMON = ["train.device=cpu", "checkpoint.every=0"]
ATTACK = ["lte.heads=6", "train.batch_size=60", "train.steps=300", "worker.base_dtype=fp32", "eval.every=0"]
FAULT = "scale:rank=2:round=3:rounds=3:factor=100"


def run(name: str, overrides: list[str], work: Path, nproc: int | None = None, env: dict | None = None) -> dict:
    out_dir = work / name
    if (out_dir / "summary.json").exists():
        return read_summary(out_dir)
    print(f"{name} ...", flush=True)
    return run_train(train_command("--config", CONFIG, *COMMON, *overrides, f"out_dir={out_dir}", nproc=nproc),
                     out_dir, log=work / f"{name}.log", env=env)


def bounded(rows: list[dict]) -> int:
    return sum(h["rounds_clipped"] + h["rounds_dropped_outlier"] for h in rows)


def honest(seeds: list[int], rules: list[str], work: Path) -> list[dict]:
    rows = []
    for rule in rules:
        runs = [run(f"honest-{rule}-seed{s}", [f"seed={s}", f"dist.robust={rule}"], work) for s in seeds]
        rows.append({"rule": rule, "accuracy": [r["eval"]["accuracy"] for r in runs],
                     "loss": [r["eval"]["loss"] for r in runs],
                     "rounds_bounded": [bounded(r.get("robust", [])) for r in runs],
                     "worst_ratio": [r.get("robust_worst_ratio") for r in runs]})
    return rows


def attacked(work: Path) -> list[dict]:
    clean = run("attack-clean-simulated", [*ATTACK, "mode=lte"], work)
    rows = [{"rule": "undisturbed (simulated)", "loss": clean["eval"]["loss"], "accuracy": clean["eval"]["accuracy"]}]
    for rule in ("none", "clip", "drop"):
        s = run(f"attack-{rule}", [*ATTACK, "mode=ps", "worker.heads=2", f"dist.robust={rule}"], work, nproc=4,
                env={"LTE_FAULT": FAULT})
        bounded = {w["rank"]: w["rounds_clipped"] + w["rounds_dropped_outlier"] for w in s["worker_options"]}
        rows.append({"rule": rule, "loss": s["eval"]["loss"], "accuracy": s["eval"]["accuracy"],
                     "rounds_bounded_per_rank": bounded})
    return rows


def markdown(honest_rows: list[dict], attack_rows: list[dict]) -> str:
    fmt = lambda vs, f: " / ".join(format(v, f) for v in vs)  # noqa: E731
    lines = ["| honest run, dist.robust | accuracy: mean (per seed) | eval loss per seed | rounds bounded "
             "| largest change / median |", "|---|---:|---:|---:|---:|"]
    for r in honest_rows:
        worst = fmt(r["worst_ratio"], ".2f") if r["worst_ratio"][0] is not None else "-"
        lines.append(f"| {r['rule']} | {sum(r['accuracy']) / len(r['accuracy']):.4f} ({fmt(r['accuracy'], '.4f')}) "
                     f"| {fmt(r['loss'], '.4f')} | {fmt(r['rounds_bounded'], 'd')} | {worst} |")
    if attack_rows:
        lines += ["", "| rank 2 sends 100x in rounds 3-5, dist.robust | eval loss | accuracy "
                  "| rounds bounded per rank |", "|---|---:|---:|---|"]
        for r in attack_rows:
            lines.append(f"| {r['rule']} | {r['loss']:.4f} | {r['accuracy']:.4f} | "
                         f"{r.get('rounds_bounded_per_rank', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rules", default="none,clip", help="the honest runs' rules (drop fires when clip does)")
    parser.add_argument("--skip-attack", action="store_true")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "robust")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robust.json")
    a = parser.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    honest_rows = honest(seeds, a.rules.split(","), a.work)
    attack_rows = [] if a.skip_attack else attacked(a.work)
    table = markdown(honest_rows, attack_rows)
    print(table)
    write_json(a.out, {"machine": machine("cpu"), "seeds": seeds, "honest": honest_rows, "attacked": attack_rows})
    a.out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
