"""The single-process trainer: simulated LTE heads (mode=lte) or full-rank training (mode=full).

One loop serves both modes; they differ only in what is trained (the heads of a prepared model,
or every parameter of the plain model), how the gradient is clipped (per head, or one norm), and
what happens at the end of a round of lte.merge_every steps (a merge, or nothing).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch

from .. import core
from ..data import EvalBatches, HeadBatches, TrainBatches, build_data
from ..errors import ConfigError
from ..models import create_model
from .checkpoint import Checkpoint
from .config import Config
from .log import RunLog, Throughput, peak_memory, progress_line
from .tasks import Metrics, loss as task_loss


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(cfg: Config, data, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)  # the base weights are the same in every mode and process
    model = create_model(cfg.model.name, data.model_args, **cfg.model.args)
    return model.to(device)


def eval_batches(cfg: Config, data, device: torch.device) -> EvalBatches:
    """The evaluation set of a run: eval.batches batches of eval.batch_size (all of it if null)."""
    e = cfg.eval
    return EvalBatches(data.eval, e.batch_size, None if e.batches is None else e.batches * e.batch_size,
                       workers=data.workers, device=device, transform=data.device_transform)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: EvalBatches, task: str, device: torch.device, precision: str) -> dict:
    """The task's metrics over the evaluation batches, with the merged weights only."""
    was_training = model.training
    model.eval()
    metrics = Metrics(task)
    for x, y in batches:  # already on the device
        with autocast(device, precision):
            outputs = model(x)
        metrics.add(outputs, y)
    model.train(was_training)
    return metrics.result()


def optimizer_step(forward, params, optimizer, x, y, *, task: str, heads: int, grad_clip: float,
                   device: torch.device, precision: str) -> torch.Tensor:
    """Forward, backward, clip and step. With heads > 1 (a prepared model) the clip is per head;
    with one head, per-head and global clipping are the same thing."""
    with autocast(device, precision):
        outputs = forward(x)
    loss = task_loss(task, outputs, y)
    # Each head optimises the mean loss of its own slice: the sum of per-head means is N * mean.
    (loss * heads).backward()
    if grad_clip > 0:
        if heads > 1:
            core.clip_grad_norm_per_head_(params, grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


class Engine:
    """What one process trains: its model (plain, or prepared with some of the run's heads), the
    batch streams that feed it, and its optimizer. Shared by every mode.

    heads:   global indices of the LTE heads this process holds, or None for full-rank training.
    streams: the batch streams this process draws from, per_stream samples each per step; an LTE
             head's stream is its own global index, so a head sees the same batches everywhere.
    """

    def __init__(self, cfg: Config, data, device: torch.device, *, heads: range | None, streams: range,
                 per_stream: int, base: str = "fp32"):
        self.cfg, self.data, self.device = cfg, data, device
        self.model = build_model(cfg, data, device)
        if heads is not None:
            lte_cfg = dataclasses.replace(cfg.lte_config(), heads=len(heads))
            core.prepare(self.model, lte_cfg, first_head=heads.start, base=base)
        self.heads = heads
        self.batches = TrainBatches(data.train, HeadBatches(len(data.train), per_stream, cfg.seed, streams,
                                                            data.sampling),
                                    steps=cfg.train.steps, workers=data.workers, device=device,
                                    transform=data.device_transform)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        t = cfg.train
        lr = cfg.head_lr if heads is not None else t.lr
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=t.weight_decay)
        self.scheduler = core.cosine_schedule(self.optimizer, warmup=t.warmup_steps, total=t.steps,
                                              min_ratio=t.min_lr_ratio)
        self.forward = torch.compile(self.model) if t.compile else self.model
        self.step = 0

    def train_step(self) -> torch.Tensor:
        t = self.cfg.train
        x, y = self.batches.get(self.step)  # on the device
        loss = optimizer_step(self.forward, self.params, self.optimizer, x, y, task=self.data.task,
                              heads=1 if self.heads is None else len(self.heads),
                              grad_clip=t.grad_clip, device=self.device, precision=t.precision)
        self.scheduler.step()
        self.step += 1
        return loss

    def seek(self, step: int) -> None:
        """Continue at `step`: the data streams and the LR schedule are functions of the step alone."""
        self.step = step
        sched = self.scheduler
        sched.last_epoch = step
        for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(step)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "rng": torch.get_rng_state()}

    def restore(self, state: dict, checkpoint: Checkpoint) -> None:
        checkpoint.load_model(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        torch.set_rng_state(state["rng"])

    def final_weights(self) -> dict:
        """The trained model as a plain state_dict (merged weights for LTE)."""
        return core.export(self.model) if self.heads is not None else {
            k: v.detach().clone() for k, v in self.model.state_dict().items()}


class Trainer:
    """The loop of one process that trains and also logs: mode=lte, mode=full, and each DDP rank."""

    is_main = True  # this process logs, evaluates, checkpoints and writes the summary

    def __init__(self, cfg: Config, engine: Engine | None = None):
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if engine is None:
            device = resolve_device(cfg.train.device)
            data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
            lte_mode = cfg.mode == "lte"
            heads = range(cfg.lte.heads) if lte_mode else None
            streams = heads if lte_mode else range(1)
            engine = Engine(cfg, data, device, heads=heads, streams=streams,
                            per_stream=cfg.train.batch_size // len(streams))
        self.engine = engine
        self.model, self.device, self.data = engine.model, engine.device, engine.data
        self.lte = engine.heads is not None
        self.eval_set = eval_batches(cfg, self.data, self.device)
        self.checkpoint = Checkpoint(self.out_dir, cfg)
        self.merges, self.train_s = 0, 0.0
        self.last_eval: dict = {}

    @property
    def step(self) -> int:
        return self.engine.step

    def end_round(self) -> None:
        if self.lte:
            core.merge(self.model, self.engine.optimizer)
            self.merges += 1

    def summary_extra(self) -> dict:
        return {}

    # the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, t, engine = self.cfg, self.cfg.train, self.engine
        resumed = cfg.checkpoint.resume and self.checkpoint.exists()
        if resumed:
            self.restore(self.checkpoint.load())
        log = None
        if self.is_main:
            log = RunLog(self.out_dir, cfg.to_dict(), wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                         wandb_mode=cfg.log.wandb_mode, resume=resumed)
            if resumed:
                self.checkpoint.trim_metrics(self.step)
                log.say(f"resumed from {self.checkpoint.path} at step {self.step}")
            log.say(self.describe())
        self.model.train()
        meter, pending = Throughput(self.device), []
        wall0 = time.perf_counter()
        while self.step < t.steps:
            t0 = time.perf_counter()
            loss = engine.train_step()
            if self.is_main:  # only the logging process keeps the losses it will report
                pending.append(loss)
                meter.add(t.batch_size)
            end_of_round = self.step % cfg.lte.merge_every == 0 or self.step == t.steps
            if end_of_round:
                self.end_round()
            self.train_s += time.perf_counter() - t0
            if not self.is_main:
                continue
            row = {}
            if self.step % t.log_every == 0 or self.step == t.steps:
                row.update(loss=torch.stack(pending).mean().item(), lr=engine.scheduler.get_last_lr()[0],
                           samples_per_s=meter.read(), merges=self.merges)
                pending.clear()
            if end_of_round:
                rounds = -(-self.step // cfg.lte.merge_every)
                if self.step == t.steps or (cfg.eval.every and rounds % cfg.eval.every == 0):
                    self.last_eval = evaluate(self.model, self.eval_set, self.data.task, self.device,
                                              t.precision)
                    row.update({f"eval_{k}": v for k, v in self.last_eval.items()})
                if cfg.checkpoint.every and rounds % cfg.checkpoint.every == 0:
                    self.checkpoint.save(self.state())
            if row:
                log.log(self.step, row)
                log.say(progress_line(self.step, t.steps, row))
        if not self.is_main:
            self.summary_extra()  # collectives that every rank must join
            return {}
        summary = {
            "mode": cfg.mode, "steps": self.step, "samples_seen": self.step * t.batch_size,
            "merges": self.merges, "eval": self.last_eval, "wall_s": time.perf_counter() - wall0,
            "train_s": self.train_s, "samples_per_s": self.step * t.batch_size / max(self.train_s, 1e-9),
            **peak_memory(self.device), "device": str(self.device),
            "heads": len(engine.heads) if self.lte else 0,
            "trainable_params": sum(p.numel() for p in engine.params), **self.summary_extra(),
        }
        torch.save(engine.final_weights(), self.out_dir / "final.pt")
        log.finish(summary)
        log.say("summary: " + json.dumps({k: summary[k] for k in ("mode", "steps", "merges", "eval")}))
        return summary

    def describe(self) -> str:
        cfg, engine = self.cfg, self.engine
        what = (f"LTE, {len(engine.heads)} heads of rank {cfg.lte.rank}, merge every {cfg.lte.merge_every} steps"
                if self.lte else "full-rank")
        return (f"{cfg.model.name} on {cfg.data.name} ({len(self.data.train)} train / "
                f"{self.eval_set.samples} eval), {what}, {sum(p.numel() for p in engine.params):,} trainable "
                f"parameters, batch {cfg.train.batch_size}, {cfg.train.steps} steps on {self.device}")

    # checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {**self.engine.state(), "merges": self.merges, "train_s": self.train_s}

    def restore(self, state: dict) -> None:
        self.engine.restore(state, self.checkpoint)
        self.merges, self.train_s = state["merges"], state["train_s"]


def train(cfg: Config) -> dict:
    return Trainer(cfg).run()
