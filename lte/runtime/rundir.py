"""The run directory (out_dir) and the rules that keep a run from losing what it produced.

What a run keeps in out_dir:
  config.json              the run's whole config (tools such as lte.sample rebuild the model from it)
  metrics.jsonl            one row per logged step
  checkpoint-<step>.pt     the newest `checkpoint.keep` checkpoints; the last one of a finished run is
                           marked finished and carries the run's summary
  checkpoint-<step>.dcp/   a sharded parameter server's tensors of that checkpoint (dist.servers > 1)
  summary.json, final.pt   the result (over all attempts) and the trained model's plain state_dict
  final.safetensors        the same weights as safetensors (python -m lte.export writes it for older runs)
  hf/                      a transformers model's save_pretrained folder (from_pretrained loads it)
  .lock                    held by the process writing the directory while it runs

Every file is replaced atomically (temporary file, fsync, rename, fsync of the directory), so a
kill at any moment leaves the old file or the new one. A checkpoint is deleted only after a newer
one is on disk; one that cannot be read is reported and the previous one is used. A finished run
is not trained again: running the same command prints its summary and writes nothing; a larger
train.steps continues it. A directory that holds a run of another configuration is refused, naming
the first key that differs, unless checkpoint.resume=false, which moves the old run aside (and says
where) before starting afresh.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import faults
from ..errors import ConfigError, UserError
from ..models.hf import is_transformers_model
from .config import FREE_KEYS, Config
from .results import read_safetensors, safetensors_bytes, safetensors_chunks, save_hf_folder

CHECKPOINT = re.compile(r"^checkpoint-(\d+)\.pt$")
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "final.pt", "final.safetensors", "hf")

class RunInUse(UserError):
    """Another process holds the run directory."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, fault_step: int | None = None) -> None:
    """Replace `path` with `data`: temporary file in the same directory, fsync, rename, fsync dir."""
    atomic_write_chunks(path, [data], fault_step)


def atomic_write_chunks(path: Path, chunks: Iterable, fault_step: int | None = None) -> None:
    """atomic_write_bytes of the concatenated `chunks` (bytes-like), written as they come, so the
    whole never needs to be in memory at once."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        for data in chunks:
            if fault_step is not None:
                faults.during_write(fault_step, f, data)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj, path: Path, fault_step: int | None = None) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue(), fault_step)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("args", "per_rank"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def first_difference(theirs: dict, ours: dict) -> tuple[str, object, object] | None:
    """The first config key (in the order of ours) whose value differs, ignoring FREE_KEYS."""
    a, b = flatten(theirs), flatten(ours)
    for key in list(b) + [k for k in a if k not in b]:
        if key.startswith(FREE_KEYS) or key in FREE_KEYS:
            continue
        if json.dumps(a.get(key), sort_keys=True) != json.dumps(b.get(key), sort_keys=True):
            return key, a.get(key), b.get(key)
    return None


@dataclass
class Start:
    """How a run starts: afresh (state None), from a checkpoint, or not at all (finished)."""

    state: dict | None = None
    path: Path | None = None
    finished: dict | None = None   # the summary of a run that has nothing left to do

    @property
    def step(self) -> int:
        return 0 if self.state is None else int(self.state["step"])


class RunDir:
    def __init__(self, cfg: Config):
        self.cfg, self.path = cfg, Path(cfg.out_dir)
        self._lock = None

    # the lock --------------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold out_dir for this process (released when the process ends, however it ends)."""
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunInUse(f"out_dir {self.path} is in use by another run ({holder}); wait for it to end or "
                           "use another out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # deciding how to start -----------------------------------------------------------------
    def open(self, say=print) -> Start:
        """Lock the directory and decide how this attempt starts (saying so when the run is already
        finished); write the config of the run."""
        self.lock()
        cfg = self.cfg.to_dict()
        held = self.holds_a_run()
        start = Start()
        if held and not self.cfg.checkpoint.resume:
            moved = self.move_aside()
            say(f"checkpoint.resume=false: moved the previous run in {self.path} to {moved}")
        elif held:
            stored = self.stored_config()
            diff = first_difference(stored, cfg) if stored is not None else None
            if diff:
                key, theirs, ours = diff
                raise ConfigError(f"out_dir {self.path} holds a run with another configuration (first difference: "
                                  f"{key} is {theirs!r} there, {ours!r} here); use another out_dir, or "
                                  "checkpoint.resume=false to move that run aside and start afresh")
            start = self.newest_checkpoint(say)
            if start.state is not None and start.state.get("finished") and start.step >= self.cfg.train.steps:
                start.finished = start.state["summary"]
                say(finished_line(self.path, start.finished))
                return start
            if start.state is not None:
                self.trim_metrics(start.step)
            else:
                self.clear_results()
        atomic_write_text(self.path / "config.json", json.dumps(cfg, indent=2) + "\n")
        return start

    def holds_a_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_FILES) or bool(self.checkpoints())

    def stored_config(self) -> dict | None:
        path = self.path / "config.json"
        try:
            return json.loads(path.read_text()) if path.exists() else None
        except (OSError, ValueError):
            return None  # unreadable: the checkpoints' own configs are still checked

    def move_aside(self) -> Path:
        dest = self.path / time.strftime("replaced-%Y%m%d-%H%M%S")
        n = 1
        while dest.exists():
            n += 1
            dest = self.path / time.strftime(f"replaced-%Y%m%d-%H%M%S-{n}")
        dest.mkdir()
        for item in ([self.path / name for name in RUN_FILES] + [p for _, p in self.checkpoints()]
                     + list(self.path.glob("checkpoint-*.dcp"))):
            if item.exists():
                os.replace(item, dest / item.name)
        _fsync_dir(self.path)
        return dest

    def clear_results(self) -> None:
        """A run that left no checkpoint starts afresh: its metrics and results would mislead."""
        for name in ("metrics.jsonl", "summary.json", "final.pt", "final.safetensors"):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "hf", ignore_errors=True)

    # checkpoints ---------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint in out_dir, newest first."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := CHECKPOINT.match(p.name))]
        return sorted(found, reverse=True)

    def newest_checkpoint(self, say=print) -> Start:
        """The newest checkpoint that can be read; unreadable ones are reported and skipped."""
        for step, path in self.checkpoints():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # truncated, corrupt or foreign: the previous one may still serve
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                say(f"warning: checkpoint {path} cannot be read ({detail[:200]}); trying the previous one")
                continue
            diff = first_difference(state.get("config", {}), self.cfg.to_dict())
            if diff:
                key, theirs, ours = diff
                raise ConfigError(f"checkpoint {path} was written by a run with another configuration (first "
                                  f"difference: {key} is {theirs!r} there, {ours!r} here); use another out_dir "
                                  "or checkpoint.resume=false")
            return Start(state=state, path=path)
        return Start()

    def save_checkpoint(self, state: dict, step: int) -> Path:
        """Write checkpoint-<step>.pt atomically, then drop all but the newest checkpoint.keep."""
        path = self.path / f"checkpoint-{step:09d}.pt"
        atomic_torch_save({**state, "step": step, "config": self.cfg.to_dict()}, path,
                          fault_step=step)
        for old_step, old in self.checkpoints()[self.cfg.checkpoint.keep:]:
            old.unlink(missing_ok=True)
            shutil.rmtree(self.shard_path(old_step), ignore_errors=True)
        return path

    def shard_path(self, step: int) -> Path:
        """The folder of a sharded server's checkpoint of `step` (torch.distributed.checkpoint's
        files), which checkpoint-<step>.pt commits."""
        return self.path / f"checkpoint-{step:09d}.dcp"

    # results -------------------------------------------------------------------------------
    def trim_metrics(self, step: int) -> None:
        """Drop metric rows logged after the checkpoint; the resumed run logs them again."""
        path = self.path / "metrics.jsonl"
        if path.exists():
            rows = [line for line in path.read_text().splitlines() if line.strip()]
            kept = []
            for line in rows:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError):
                    break  # a torn last line: everything before it is kept
            atomic_write_text(path, "".join(r + "\n" for r in kept))

    def write_results(self, summary: dict, weights: dict | None, model: torch.nn.Module, data) -> None:
        """The run's results; `model` (the model the process trained) and `data` say whether and how
        to write a transformers model's save_pretrained folder too. `weights` None: final.safetensors
        is written already, a tensor at a time (write_weights; a sharded server), and no final.pt."""
        if weights is not None:
            # host tensors: final.pt loads on any machine, whatever device trained it
            weights = {k: v.detach().cpu() for k, v in weights.items()}
            atomic_torch_save(weights, self.path / "final.pt")
            atomic_write_bytes(self.path / "final.safetensors", safetensors_bytes(weights))
        if is_transformers_model(model):
            save_hf_folder(self.cfg, data, weights if weights is not None else
                           read_safetensors(self.path / "final.safetensors", torch.device("cpu")), self.path / "hf")
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")

    def write_weights(self, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors: Iterable) -> None:
        """final.safetensors from `tensors` (one per entry of `layout`, in its order) as they come, so
        the whole state never needs to be in this process's memory (a sharded server's shard 0);
        the previous run's final.pt goes, as it would no longer match."""
        (self.path / "final.pt").unlink(missing_ok=True)
        atomic_write_chunks(self.path / "final.safetensors", safetensors_chunks(layout, tensors))


def finished_line(path: Path, summary: dict) -> str:
    brief = {k: summary.get(k) for k in ("mode", "steps", "merges", "eval")}
    return (f"{path} already holds a finished run of {summary.get('steps')} steps (train.steps larger continues "
            f"it); its summary: {json.dumps(brief)}")
