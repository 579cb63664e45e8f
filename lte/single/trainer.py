"""The single-process trainer: simulated LTE heads (mode=lte) or full-rank training (mode=full),
and the loop of each DDP and DiLoCo rank (lte.distributed.ddp, diloco).

One loop serves these modes; they differ only in what is trained (the heads of a prepared model,
or every parameter of the plain model), how the gradient is clipped (per head, or one norm), and
what happens at the end of a round of lte.merge_every steps (a merge, or nothing). The steps are
run by the Engine (lte.runtime.engine); when to merge, evaluate, checkpoint and log is the round
clock's (lte.runtime.clock); the run ends as every run does (lte.runtime.finish).
"""
from __future__ import annotations

import contextlib
import os
import time

import torch

from .. import core
from ..core.robust import Record
from ..core.upload import Uploader
from ..data import build_data
from ..errors import ConfigError
from ..runtime.clock import RoundClock
from ..runtime.config import Config
from ..runtime.engine import Engine, eval_batches, evaluate, resolve_device
from ..runtime.finish import Totals, finish_run, summary
from ..runtime.log import RunLog, Throughput, say
from ..runtime.rundir import RunDir, Start


class Trainer:
    """The loop of one process that trains: mode=lte, mode=full, and each DDP rank. The main
    process (the only one but in DDP, where it is rank 0) also logs, evaluates, checkpoints and
    writes the results into its run directory."""

    def __init__(self, cfg: Config, engine: Engine | None = None, rundir: RunDir | None = None):
        self.cfg, self.rundir, self.clock = cfg, rundir, RoundClock.of(cfg)
        self.is_main = rundir is not None
        if engine is None:
            data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
            heads = range(cfg.lte.heads) if cfg.mode == "lte" else None
            streams = heads or range(1)
            engine = Engine(cfg, data, resolve_device(cfg.train.device), heads=heads, streams=streams,
                            per_stream=cfg.train.batch_size // len(streams),
                            lte=cfg.lte_config() if heads else None, chunks=cfg.worker.chunks)
        self.engine = engine
        self.model, self.device, self.data = engine.model, engine.device, engine.data
        self.lte = engine.heads is not None
        self.outer = cfg.outer_optimizer()  # the merges' outer step (kind none: the plain merge)
        self.uploader = Uploader(cfg.comm.codec())  # the merge sees the heads as ps workers send them
        self.overlapped = core.OverlappedMerge() if cfg.comm.overlap and self.lte else None  # one round stale
        self.robust = cfg.dist.robust_rule()  # outlier heads in a merge (none: every head as it is)
        self.outliers = Record(len(engine.heads) if self.lte else 0)
        self.eval_set = eval_batches(cfg, self.data, self.device)
        self.merges, self.train_s = 0, 0.0
        self.totals = Totals()
        self.last_eval: dict = {}
        self.log: RunLog | None = None

    @property
    def step(self) -> int:
        return self.engine.step

    def steps(self):
        """Every remaining step's loss, round by round."""
        while self.step < self.cfg.train.steps:
            yield from self.engine.train_round(self.clock.round_steps(self.step))

    def end_round(self) -> None:
        if not self.lte:
            return
        if self.overlapped is not None:
            outcome = self.overlapped.merge(self.model, self.engine.optimizer, self.outer, self.uploader,
                                            settle=self.clock.settles(self.step), robust=self.robust)
        else:
            outcome = core.merge(self.model, self.engine.optimizer, outer=self.outer, upload=self.uploader,
                                 robust=self.robust)
        self.merges += 1
        for line in self.outliers.note(outcome, list(range(len(self.engine.heads))), self.merges, self.robust.name,
                                       "head(s)"):
            if self.log is not None:
                self.log.say(line)

    def newest(self):
        """The model as the merges left it (with comm.overlap the base trails them by one)."""
        return self.overlapped.newest(self.model) if self.overlapped is not None else contextlib.nullcontext()

    def summary_extra(self) -> dict:
        return {}

    def devices(self) -> int:
        """The devices a step's samples are spread over (for MFU): one here, a DDP rank's world there."""
        return 1

    # the loop ----------------------------------------------------------------------------
    def run(self, start: Start) -> dict:
        self.begin(start)
        self.model.train()
        meter, pending = self.engine.throughput(self.devices()), []
        t0 = time.perf_counter()
        for loss in self.steps():
            if self.is_main:  # only the logging process keeps the losses it will report
                pending.append(loss)
                meter.add(self.cfg.train.batch_size)
            if self.clock.ends_round(self.step):
                self.end_round()
            self.train_s += time.perf_counter() - t0
            if self.is_main:
                self.report(pending, meter)
            t0 = time.perf_counter()
        extra = self.summary_extra()  # collectives that every rank must join
        return self.finish(extra) if self.is_main else {}

    def begin(self, start: Start) -> None:
        self.totals = Totals.resumed(start.state)  # this attempt's clock starts here
        if start.state is not None:
            self.restore(start.state, start.path)
        if self.is_main:
            self.log = RunLog.for_run(self.cfg, self.rundir.path, start=self.step)
            if start.state is not None:
                self.log.say(f"resumed from {start.path} at step {self.step}")
            self.log.say(self.describe())

    def report(self, pending: list[torch.Tensor], meter: Throughput) -> None:
        """What the main process does after a step: the progress row, and at a round's end the
        evaluation and the checkpoint the clock asks for."""
        step, clock, engine = self.step, self.clock, self.engine
        row = {}
        if clock.ends_round(step) and engine.chunks is not None:
            row["chunk_losses"] = engine.chunks.chunk_losses
        if clock.logs(step):
            row.update(loss=torch.stack(pending).mean().item(), lr=engine.lr_at(step - 1), **meter.read(),
                       merges=self.merges)
            pending.clear()
        if clock.evaluates(step):
            with engine.resident(), self.newest():
                self.last_eval = evaluate(self.model, self.eval_set, self.data.task, self.device,
                                          self.cfg.train.precision)
            row.update({f"eval_{k}": v for k, v in self.last_eval.items()})
        if clock.checkpoints(step):
            self.rundir.save_checkpoint(self.state(), step)
        if row:
            row["train_s"] = self.train_s  # training time so far, evaluation excluded
            self.log.log(step, row)
        self.log.progress(step, row)

    def finish(self, extra: dict) -> dict:
        return finish_run(self.rundir, self.log, {**self.summary(), **extra}, self.engine.final_weights(), self.model,
                          self.data, lambda marks: self.rundir.save_checkpoint({**self.state(), **marks}, self.step))

    def summary(self) -> dict:
        engine = self.engine
        return {**summary(self.cfg, steps=self.step, merges=self.merges, last_eval=self.last_eval, totals=self.totals,
                          device=self.device, seconds=self.train_s),
                "train_s": self.train_s, "heads": len(engine.heads) if self.lte else 0,
                "trainable_params": sum(p.numel() for p in engine.params),
                **({"robust": [{"head": h, **self.outliers.row(h)} for h in range(len(engine.heads))],
                    **self.outliers.totals()} if self.robust.active else {})}

    def describe(self) -> str:
        cfg, engine = self.cfg, self.engine
        what = (f"LTE, {len(engine.heads)} heads of rank {cfg.lte.rank}, {self.clock.describe_rounds}"
                if self.lte else "full-rank")
        options = ", ".join(filter(None, [cfg.worker.describe(), self.outer.describe(), self.uploader.describe(),
                                          cfg.comm.describe(downloads=False), self.robust.describe()])) \
            if self.lte else ""
        return (f"{cfg.model.name} on {cfg.data.name} ({len(self.data.train)} train / "
                f"{self.eval_set.samples} eval), {what}{', ' + options if options else ''}, "
                f"{sum(p.numel() for p in engine.params):,} trainable parameters, batch {cfg.train.batch_size}, "
                f"{cfg.train.steps} steps on {self.device}")

    # checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {**self.engine.state(), "merges": self.merges, "train_s": self.train_s, "totals": self.totals.state(),
                "last_eval": self.last_eval, "outer": self.outer.state_dict(),
                "upload_residuals": self.uploader.state_dict(), "outliers": self.outliers.state_dict()}

    def restore(self, state: dict, path) -> None:
        self.engine.restore(state, path)
        self.outer.load_state_dict(state.get("outer"), self.device)
        self.uploader.load_state_dict(state.get("upload_residuals"), self.device)
        self.outliers.load_state_dict(state.get("outliers"))
        self.merges, self.train_s = state["merges"], state["train_s"]
        self.last_eval = state.get("last_eval", {})


def refuse_several_processes(cfg: Config) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(f"mode={cfg.mode} runs in one process, but this is one of {world} processes started "
                          "by torchrun or --nproc-per-node; start it without them (mode=ps, ddp and diloco use "
                          "several processes)")


def train(cfg: Config) -> dict:
    """Run mode=lte or mode=full in this process; the run's summary (that of the finished run
    already in out_dir, if there is one)."""
    refuse_several_processes(cfg)
    rundir = RunDir(cfg)
    try:
        start = rundir.open(say=say)
        if start.finished is not None:
            return start.finished
        return Trainer(cfg, rundir=rundir).run(start)
    finally:
        rundir.unlock()
