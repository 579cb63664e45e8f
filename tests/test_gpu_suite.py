"""The GPU suite's dry run: every step of benchmarks/gpu_suite.py on tiny shapes on the CPU, so the
suite is known to work before a GPU session spends its minutes on it."""
import json
import sys

from helpers import run_command


def test_gpu_suite_dry_run_runs_every_step(tmp_path):
    code, out = run_command([sys.executable, "benchmarks/gpu_suite.py", "--dry-run", "--results", str(tmp_path)],
                            timeout=900)
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    statuses = {s["name"]: s["status"] for s in report["steps"]}
    assert code == 0, (statuses, out[-6000:])
    for name in ("throughput-eager", "throughput-compiled", "layer", "comm", "train-lte", "train-full", "train-ps",
                 "train-ddp", "memory", "quality", "vision-throughput"):
        assert statuses[name] == "ok", (name, statuses)
    steps = {s["name"]: s for s in report["steps"]}
    full, lte = steps["throughput-compiled"]["result"]["results"]
    assert full["mode"] == "full" and lte["mode"] == "lte" and lte["images_per_s"] > 0
    assert steps["comm"]["result"]["ps"]["comm"]["bytes_per_step_per_worker"] > 0
    for mode in ("lte", "full", "ps", "ddp"):
        assert steps[f"train-{mode}"]["result"]["steps"] == 4, mode
    assert "leanest LTE" in steps["memory"]["headline"] and "full-rank best loss" in steps["quality"]["headline"]
    assert [r["mode"] for r in steps["vision-throughput"]["result"]["results"]] == ["full", "lte"]
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "| train-ps | ok |" in table and "(dry run)" in table
