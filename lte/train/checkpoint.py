"""Checkpoints in out_dir: written atomically, read with weights_only=True, refused when they come
from a different model or a run whose heads would not line up."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ConfigError
from .config import Config


def identity(cfg: Config) -> dict:
    """The config values a checkpoint must agree with to be resumed (flat, primitives only)."""
    return {"mode": cfg.mode, "seed": cfg.seed, "model.name": cfg.model.name,
            "model.args": json.dumps(cfg.model.args, sort_keys=True), "data.name": cfg.data.name,
            "data.args": json.dumps(cfg.data.args, sort_keys=True), "lte.heads": cfg.lte.heads, "worker.heads": cfg.worker.heads,
            "lte.rank": cfg.lte.rank, "lte.alpha": cfg.lte.alpha, "lte.reset": cfg.lte.reset,
            "lte.other_params": cfg.lte.other_params, "lte.merge_every": cfg.lte.merge_every,
            "train.batch_size": cfg.train.batch_size, "worker.activations": cfg.worker.activations,
            "worker.velora_subtoken": cfg.worker.velora_subtoken, "worker.chunks": cfg.worker.chunks,
            "worker.per_rank": json.dumps(cfg.worker.per_rank, sort_keys=True, default=str)}


class Checkpoint:
    def __init__(self, out_dir: Path, cfg: Config, name: str = "checkpoint.pt"):
        self.out_dir, self.path = out_dir, out_dir / name
        self.identity = identity(cfg)

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "identity": self.identity}, tmp)
        os.replace(tmp, self.path)  # a crash mid-write leaves the previous checkpoint intact

    def load(self) -> dict:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which, do not trace back
            raise ConfigError(f"cannot read checkpoint {self.path}: {exc}") from None
        theirs = state.get("identity", {})
        differ = sorted(k for k in self.identity if theirs.get(k) != self.identity[k])
        if differ:
            detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs config {self.identity[k]!r}" for k in differ)
            raise ConfigError(f"checkpoint {self.path} was written by a different run ({detail}); "
                              "use another out_dir or checkpoint.resume=false")
        return state

    def load_model(self, model: torch.nn.Module, state_dict: dict) -> None:
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[:3]
            raise ConfigError(f"checkpoint {self.path} does not fit this model: {' '.join(first)}") from None

    def trim_metrics(self, step: int) -> None:
        """Drop metric rows logged after the checkpoint; the resumed run logs them again."""
        path = self.out_dir / "metrics.jsonl"
        if path.exists():
            rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(r + "\n" for r in rows))
