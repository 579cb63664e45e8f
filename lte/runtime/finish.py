"""The end of a run, the same for every mode: its totals over attempts, its summary, and the one
sequence that finishes it (the results, the final checkpoint, the log, the summary line).

The single-process trainer (also each DDP and DiLoCo rank's loop) and both parameter servers keep
a Totals, build their summary on `summary`'s keys and end with `finish_run`.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .log import RunLog, peak_memory
from .rundir import RunDir


@dataclass
class Totals:
    """A run's wall time and attempts over its attempts: those before this one (from its checkpoint)
    and this one since it began."""

    wall_s_before: float = 0.0
    attempts_before: int = 0
    began: float = field(default_factory=time.perf_counter)

    @classmethod
    def resumed(cls, state: dict | None) -> Totals:
        """The totals of a run resuming from a checkpoint's state (None or {}: a fresh start)."""
        saved = (state or {}).get("totals", {"wall_s": 0.0, "attempts": 0})
        return cls(saved["wall_s"], saved["attempts"])

    def wall_s(self) -> float:
        return self.wall_s_before + time.perf_counter() - self.began

    @property
    def attempts(self) -> int:
        """The attempts so far, this one included."""
        return self.attempts_before + 1

    def state(self) -> dict:
        """What a checkpoint keeps of them (under "totals")."""
        return {"wall_s": self.wall_s(), "attempts": self.attempts}


def summary(cfg, *, steps: int, merges: int, last_eval: dict, totals: Totals, device: torch.device,
            seconds: float) -> dict:
    """The keys every run's summary.json has; `seconds` is the time its samples per second count."""
    samples = steps * cfg.train.batch_size
    return {"mode": cfg.mode, "steps": steps, "samples_seen": samples, "merges": merges, "eval": last_eval,
            "wall_s": totals.wall_s(), "samples_per_s": samples / max(seconds, 1e-9), "attempts": totals.attempts,
            **peak_memory(device), "device": str(device)}


HEADLINE = ("mode", "steps", "merges", "eval", "rejected_heads")  # what the summary line shows of a summary


def summary_line(summary: dict) -> str:
    """The run's last line of output: the headline of its summary, and its traffic if it had any."""
    line = "summary: " + json.dumps({k: summary[k] for k in HEADLINE if k in summary})
    comm = summary.get("comm")
    if comm:
        line += f", {comm['bytes_per_step_per_worker']:,.0f} bytes per step per worker"
    if "elastic" in summary:
        line += ", merges contributed: " + ", ".join(f"rank {r['rank']}: {r['rounds_contributed']}"
                                                     for r in summary["elastic"])
    return line


def finish_run(rundir: RunDir, log: RunLog, summary: dict, weights: dict, model: torch.nn.Module, data,
               checkpoint: Callable[[dict], None]) -> dict:
    """Write the results, then the final checkpoint (`checkpoint(marks)` writes the run's state with
    `marks` added, which say it finished and carry the summary), close the log and say the summary."""
    rundir.write_results(summary, weights, model, data)
    checkpoint({"finished": True, "summary": summary})
    log.finish(summary)
    log.say(summary_line(summary))
    return summary
