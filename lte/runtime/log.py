"""Progress on stdout (a progress bar on a terminal, one line per logged step otherwise), one JSON
line per logged step in metrics.jsonl, and optionally wandb."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from ..errors import ConfigError


def say(text: str) -> None:
    """A line of text on stdout (before a run has its RunLog)."""
    print(text, flush=True)


class RunLog:
    def __init__(self, out_dir: Path, config: dict, *, wandb: bool, wandb_project: str, wandb_mode: str,
                 steps: int, start: int = 0):
        self.out_dir = out_dir
        self.metrics_path = out_dir / "metrics.jsonl"
        self.steps = steps
        # a bar only where a person watches; logs and pipes get one line per logged step
        self._bar = _bar(steps, start) if sys.stdout.isatty() else None
        self._wandb = None
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise ConfigError("log.wandb is on but wandb is not installed: pip install 'lte[wandb]'") from None
            self._wandb = wandb_lib.init(project=wandb_project, mode=wandb_mode, dir=str(out_dir),
                                         config=config, name=out_dir.name)

    @classmethod
    def for_run(cls, cfg, out_dir: Path, start: int = 0) -> RunLog:
        """The log of a run with config `cfg` (lte.runtime.config.Config), resuming after `start` steps."""
        return cls(out_dir, cfg.to_dict(), wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                   wandb_mode=cfg.log.wandb_mode, steps=cfg.train.steps, start=start)

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **metrics}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def say(self, text: str) -> None:
        """A line of text, above the bar if there is one."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            say(text)

    def progress(self, step: int, row: dict) -> None:
        """Where the run is after `step` steps; `row` (maybe empty) is what was logged there."""
        if self._bar is None:
            if row:
                print(progress_line(step, self.steps, row), flush=True)
            return
        self._bar.update(step - self._bar.n)
        if row:
            self._bar.set_postfix_str(progress_line(step, self.steps, row).split(" | ", 1)[-1], refresh=False)
            if any(k.startswith("eval_") for k in row):  # evaluations stay on the screen
                self._bar.write(progress_line(step, self.steps, row))

    def finish(self, summary: dict) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
            self._wandb.finish()


def progress_line(step: int, steps: int, metrics: dict) -> str:
    parts = [f"step {step:>{len(str(steps))}}/{steps}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:,.0f} tokens/s")
    elif "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:,.0f} samples/s")
    if "mfu" in metrics:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
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


# Dense bf16 peak FLOP/s by GPU name (the vendors' figures, without sparsity), for MFU.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "L40": 181e12, "A10G": 70e12, "A10": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: torch.device, precision: str, configured: float) -> float | None:
    """The peak FLOP/s MFU is measured against: train.peak_flops, else a known GPU's bf16 peak (bf16
    runs only), else None."""
    if configured > 0:
        return configured
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def flops_per_token(params: int, layers: int | None, width: int | None, tokens: int) -> float:
    """A language model's training FLOPs per token, as nanoGPT counts them: 6 N for the weights'
    products forward and backward, plus 12 L d T for attention over T positions."""
    return 6 * params + (12 * layers * width * tokens if layers and width else 0)


class Throughput:
    """Samples per second over the steps since the last read (wall clock, after a device sync); for
    a language model also tokens per second and, where a peak is known, model-FLOPs utilisation
    (the model's FLOPs per token times tokens per second, over `devices` x the peak)."""

    def __init__(self, device: torch.device, tokens_per_sample: int = 0, flops_per_token: float = 0.0,
                 peak: float | None = None, devices: int = 1):
        self.device, self.tokens_per_sample = device, tokens_per_sample
        self.flops_per_token, self.peak, self.devices = flops_per_token, peak, devices
        self.t0, self.samples = time.perf_counter(), 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def read(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        rate = self.samples / max(now - self.t0, 1e-9)
        self.t0, self.samples = now, 0
        return self.rates(rate)

    def rates(self, samples_per_s: float) -> dict:
        out = {"samples_per_s": samples_per_s}
        if self.tokens_per_sample:
            out["tokens_per_s"] = tokens = samples_per_s * self.tokens_per_sample
            if self.peak and self.flops_per_token:
                out["mfu"] = tokens * self.flops_per_token / (self.peak * self.devices)
        return out


def _bar(steps: int, start: int):
    from tqdm import tqdm

    return tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stdout)
