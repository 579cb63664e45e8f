"""What the benchmarks share: the repository's place, the machine a result was measured on, the load
on it, timing a step, writing a report, and running `lte-train` in a process of its own.

Benchmarks run as scripts (`python benchmarks/x.py`), so their own folder is sys.path[0] and
`from common import ...` finds this module. Importing it puts the repository first on sys.path, so a
benchmark measures this checkout's lte even where another copy is installed (an editable install of
another worktree); a benchmark imports it before lte for that reason.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages; None where the system has no /proc/loadavg. Timings on a
    machine shared with other work are only read next to them."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name for a CUDA device, else the host's CPU (device None: CUDA where there is one)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core {platform.processor() or platform.machine()} CPU"


def machine(device: torch.device | str | None = None) -> dict:
    """The machine a result comes from; `device` is what the benchmark ran on (see device_name)."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg": loadavg(),
            "device": device_name(device), "gpus": torch.cuda.device_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip()
    return info


def write_json(path: str | Path, obj) -> Path:
    """A report as indented JSON; its folder is made if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA calls return before their kernels finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(fn, device: torch.device, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls of fn after `warmup` untimed ones (compilation, allocator
    growth), the device synchronised around every call."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def child_env() -> dict:
    """The environment of a benchmark's subprocesses: output unbuffered, so a process cut off by its
    time limit still shows its last lines; this checkout first on PYTHONPATH, so the processes a
    launcher starts import the lte being measured too."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def train_command(*args, nproc: int | None = None) -> list[str]:
    """`lte-train ARGS` run by this interpreter; nproc: that many processes through lte's launcher."""
    return [sys.executable, "-m", "lte.train", *(["--nproc-per-node", str(nproc)] if nproc else []),
            *map(str, args)]


def read_summary(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per logged step."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def run_train(cmd: list[str], out_dir: str | Path, *, log: str | Path | None = None,
              timeout: float | None = None, env: dict | None = None) -> dict:
    """Run an lte-train command (train_command) from the repository to its end and return the
    summary.json it wrote in out_dir. Its output goes to the file `log`, else is captured; a run that
    fails stops the benchmark with the end of that output. `env`: variables added (LTE_FAULT)."""
    env = {**child_env(), **(env or {})}
    if log is None:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    else:
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        tail = f"(all of it in {log})\n{log.read_text()[-3000:]}"
    if proc.returncode:
        raise SystemExit(f"lte-train in {out_dir} failed (exit {proc.returncode}): {' '.join(cmd[1:])}\n{tail}")
    return read_summary(out_dir)
