"""Progress on stdout, one JSON line per logged step in metrics.jsonl, and optionally wandb."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from ..errors import ConfigError


class RunLog:
    def __init__(self, out_dir: Path, config: dict, *, wandb: bool, wandb_project: str, wandb_mode: str):
        self.out_dir = out_dir
        self.metrics_path = out_dir / "metrics.jsonl"
        self._wandb = None
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise ConfigError("log.wandb is on but wandb is not installed: pip install 'lte[wandb]'") from None
            self._wandb = wandb_lib.init(project=wandb_project, mode=wandb_mode, dir=str(out_dir),
                                         config=config, name=out_dir.name)

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **metrics}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    @staticmethod
    def say(text: str) -> None:
        print(text, flush=True)

    def finish(self, summary: dict) -> None:
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
            self._wandb.finish()


def progress_line(step: int, steps: int, metrics: dict) -> str:
    parts = [f"step {step:>{len(str(steps))}}/{steps}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:,.0f} samples/s")
    if "merges" in metrics:
        parts.append(f"merges {metrics['merges']}")
    if "chunk_losses" in metrics:  # local chunks: each chunk's loss (per worker rank on a parameter server)
        losses = metrics["chunk_losses"]
        groups = losses.items() if isinstance(losses, dict) else [("", losses)]
        parts += [f"chunk losses{' rank ' + r if r else ''} " + "/".join(f"{v:.4f}" for v in ls) for r, ls in groups]
    for key in ("eval_loss", "eval_accuracy", "eval_perplexity"):
        if key in metrics:
            parts.append(f"{key.replace('_', ' ')} {metrics[key]:.4f}")
    return " | ".join(parts)


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process: CUDA allocator peak on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "cuda_max_allocated"}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"peak_memory_bytes": int(rss_kb * 1024 if sys.platform != "darwin" else rss_kb),
            "peak_memory_kind": "cpu_max_rss"}


class Throughput:
    """Samples per second over the steps since the last read (wall clock, after a device sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t0, self.samples = time.perf_counter(), 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def read(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        rate = self.samples / max(now - self.t0, 1e-9)
        self.t0, self.samples = now, 0
        return rate
