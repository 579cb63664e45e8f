"""The single-process trainer: simulated LTE heads (mode=lte) or full-rank training (mode=full).

One loop serves both modes; they differ only in what is trained (the heads of a prepared model,
or every parameter of the plain model), how the gradient is clipped (per head, or one norm), and
what happens at the end of a round of lte.merge_every steps (a merge, or nothing). A round is
run by the Engine, step by step, or chunk by chunk with worker.chunks > 1 (lte.train.chunks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import torch

from .. import core
from ..data import EvalBatches, HeadBatches, TrainBatches, build_data
from ..errors import ConfigError
from ..models import create_model
from .chunks import LocalChunks
from .config import Config, WorkerCfg
from .log import RunLog, Throughput, peak_memory, progress_line
from .rundir import RunDir, Start, load_model_state
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
    check_fits(model, data)
    return model.to(device)


def check_fits(model: torch.nn.Module, data) -> None:
    """Refuse a model too small for its data, before anything trains: a vocabulary missing some of
    the data's token ids, or a position table shorter than the data's windows (models and data
    sets that state a vocab_size / block_size; others are not checked)."""
    vocab, model_vocab = data.model_args.get("vocab_size"), getattr(model, "vocab_size", None)
    if isinstance(vocab, int) and isinstance(model_vocab, int) and model_vocab < vocab:
        raise ConfigError(f"model.args.vocab_size: the model's vocabulary of {model_vocab} tokens is smaller than "
                          f"the data's ({vocab}); leave it unset to take the data's, or make it >= {vocab}")
    block, model_block = getattr(data.train, "block_size", None), getattr(model, "block_size", None)
    if isinstance(block, int) and isinstance(model_block, int) and block > model_block:
        raise ConfigError(f"data.args.block_size={block} is larger than the model's block_size={model_block} "
                          "(model.args.block_size)")


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
    options: the worker.* options of these heads (activations, velora_subtoken, chunks); the base
             is stored as `base`.
    """

    def __init__(self, cfg: Config, data, device: torch.device, *, heads: range | None, streams: range,
                 per_stream: int, base: str = "fp32", options: WorkerCfg | None = None):
        self.cfg, self.data, self.device = cfg, data, device
        self.model = build_model(cfg, data, device)
        options = options or WorkerCfg()
        if heads is not None:
            lte_cfg = dataclasses.replace(cfg.lte_config(), heads=len(heads))
            core.prepare(self.model, lte_cfg, first_head=heads.start, base=base, activations=options.activations,
                         velora_subtoken=options.velora_subtoken)
        self.heads = heads
        self.batches = TrainBatches(data.train, HeadBatches(len(data.train), per_stream, cfg.seed, streams,
                                                            data.sampling),
                                    steps=cfg.train.steps, workers=data.workers, device=device,
                                    transform=data.device_transform)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        t = cfg.train
        lr = cfg.head_lr if heads is not None else t.lr
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=t.weight_decay,
                                           fused=device.type == "cuda")  # one kernel per step on a GPU
        self.scheduler = core.cosine_schedule(self.optimizer, warmup=t.warmup_steps, total=t.steps,
                                              min_ratio=t.min_lr_ratio)
        self.forward = torch.compile(self.model) if t.compile else self.model
        self.chunks = (LocalChunks(self.model, options.chunks, self.params, self.optimizer, device)
                       if options.chunks > 1 else None)
        self.step = 0

    def train_round(self, steps: int):
        """Train one round of `steps` steps; yields each step's loss as its step completes (with
        local chunks: the last chunk's steps, every earlier chunk having run its steps by then)."""
        if self.chunks is None:
            for _ in range(steps):
                yield self.train_step()
        else:
            yield from self.chunks.round(self, steps)

    def train_step(self) -> torch.Tensor:
        return self.step_on(*self.batches.get(self.step))

    def step_on(self, x: torch.Tensor, y: torch.Tensor, step: int | None = None, advance: bool = True) -> torch.Tensor:
        """One optimizer step on (x, y) at the learning rate of `step` (default: the current step);
        `advance` moves the step counter and the schedule on (a local chunk before the last does not)."""
        t = self.cfg.train
        if step is not None:
            self._set_lr(step)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)  # a no-op for a fresh batch
        loss = optimizer_step(self.forward, self.params, self.optimizer, x, y, task=self.data.task,
                              heads=1 if self.heads is None else len(self.heads),
                              grad_clip=t.grad_clip, device=self.device, precision=t.precision)
        if advance:
            self.scheduler.step()
            self.step += 1
        return loss

    def _set_lr(self, step: int) -> None:
        sched = self.scheduler
        for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(step)

    @contextlib.contextmanager
    def resident(self):
        """Everything on the device (evaluation) even if local chunks keep most of it in host memory."""
        if self.chunks is not None:
            self.chunks.place(None)
        yield

    def seek(self, step: int) -> None:
        """Continue at `step`: the data streams and the LR schedule are functions of the step alone."""
        self.step = step
        sched = self.scheduler
        sched.last_epoch = step
        self._set_lr(step)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "rng": torch.get_rng_state()}

    def restore(self, state: dict, path=None) -> None:
        load_model_state(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        torch.set_rng_state(state["rng"])

    def final_weights(self) -> dict:
        """The trained model as a plain state_dict (merged weights for LTE)."""
        return core.export(self.model) if self.heads is not None else {
            k: v.detach().clone() for k, v in self.model.state_dict().items()}


class Trainer:
    """The loop of one process that trains: mode=lte, mode=full, and each DDP rank. The main
    process (the only one but in DDP, where it is rank 0) also logs, evaluates, checkpoints and
    writes the results into its run directory."""

    def __init__(self, cfg: Config, engine: Engine | None = None, rundir: RunDir | None = None):
        self.cfg, self.rundir = cfg, rundir
        self.is_main = rundir is not None
        if engine is None:
            device = resolve_device(cfg.train.device)
            data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
            lte_mode = cfg.mode == "lte"
            heads = range(cfg.lte.heads) if lte_mode else None
            streams = heads if lte_mode else range(1)
            engine = Engine(cfg, data, device, heads=heads, streams=streams,
                            per_stream=cfg.train.batch_size // len(streams), options=cfg.worker_options())
        self.engine = engine
        self.model, self.device, self.data = engine.model, engine.device, engine.data
        self.lte = engine.heads is not None
        self.eval_set = eval_batches(cfg, self.data, self.device)
        self.merges, self.train_s = 0, 0.0
        self.earlier = {"wall_s": 0.0, "attempts": 0}  # of the attempts before this one
        self.last_eval: dict = {}

    @property
    def step(self) -> int:
        return self.engine.step

    def steps(self):
        """Every remaining step's loss, round by round (a round ends at a multiple of lte.merge_every)."""
        T, total = self.cfg.lte.merge_every, self.cfg.train.steps
        while self.step < total:
            yield from self.engine.train_round(min(T - self.step % T, total - self.step))

    def end_round(self) -> None:
        if self.lte:
            core.merge(self.model, self.engine.optimizer)
            self.merges += 1

    def summary_extra(self) -> dict:
        return {}

    # the loop ----------------------------------------------------------------------------
    def run(self, start: Start) -> dict:
        cfg, t, engine = self.cfg, self.cfg.train, self.engine
        if start.state is not None:
            self.restore(start.state, start.path)
        log = None
        if self.is_main:
            log = RunLog(self.rundir.path, cfg.to_dict(), wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                         wandb_mode=cfg.log.wandb_mode)
            if start.state is not None:
                log.say(f"resumed from {start.path} at step {self.step}")
            log.say(self.describe())
        self.model.train()
        meter, pending = Throughput(self.device), []
        self.wall0 = t0 = time.perf_counter()
        for loss in self.steps():
            if self.is_main:  # only the logging process keeps the losses it will report
                pending.append(loss)
                meter.add(t.batch_size)
            end_of_round = self.step % cfg.lte.merge_every == 0 or self.step == t.steps
            if end_of_round:
                self.end_round()
            self.train_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            if not self.is_main:
                continue
            row = {}
            if end_of_round and engine.chunks is not None:
                row["chunk_losses"] = engine.chunks.chunk_losses
            if self.step % t.log_every == 0 or self.step == t.steps:
                row.update(loss=torch.stack(pending).mean().item(), lr=engine.scheduler.get_last_lr()[0],
                           samples_per_s=meter.read(), merges=self.merges)
                pending.clear()
            if end_of_round:
                rounds = -(-self.step // cfg.lte.merge_every)
                if self.step == t.steps or (cfg.eval.every and rounds % cfg.eval.every == 0):
                    with engine.resident():
                        self.last_eval = evaluate(self.model, self.eval_set, self.data.task, self.device,
                                                  t.precision)
                    row.update({f"eval_{k}": v for k, v in self.last_eval.items()})
                if cfg.checkpoint.every and rounds % cfg.checkpoint.every == 0 and self.step < t.steps:
                    self.rundir.save_checkpoint(self.state(), self.step)  # the last step's comes below
            if row:
                row["train_s"] = self.train_s  # training time so far, evaluation excluded
                log.log(self.step, row)
                log.say(progress_line(self.step, t.steps, row))
            t0 = time.perf_counter()
        extra = self.summary_extra()  # collectives that every rank must join
        if not self.is_main:
            return {}
        summary = {
            "mode": cfg.mode, "steps": self.step, "samples_seen": self.step * t.batch_size,
            "merges": self.merges, "eval": self.last_eval, "wall_s": self.wall_s(), "train_s": self.train_s,
            "samples_per_s": self.step * t.batch_size / max(self.train_s, 1e-9),
            "attempts": self.earlier["attempts"] + 1, **peak_memory(self.device), "device": str(self.device),
            "heads": len(engine.heads) if self.lte else 0,
            "trainable_params": sum(p.numel() for p in engine.params), **extra,
        }
        self.rundir.write_results(summary, engine.final_weights())
        self.rundir.save_checkpoint({**self.state(), "finished": True, "summary": summary}, self.step)
        log.finish(summary)
        log.say("summary: " + json.dumps({k: summary[k] for k in ("mode", "steps", "merges", "eval")}))
        return summary

    def wall_s(self) -> float:
        return self.earlier["wall_s"] + time.perf_counter() - self.wall0

    def describe(self) -> str:
        cfg, engine = self.cfg, self.engine
        what = (f"LTE, {len(engine.heads)} heads of rank {cfg.lte.rank}, merge every {cfg.lte.merge_every} steps"
                if self.lte else "full-rank")
        w = cfg.worker
        if self.lte and w.activations != "full":
            what += f", {w.activations}" + (f" (M={w.velora_subtoken})" if w.activations == "velora" else "")
        if engine.chunks is not None:
            what += f", {engine.chunks.count} local chunks"
        return (f"{cfg.model.name} on {cfg.data.name} ({len(self.data.train)} train / "
                f"{self.eval_set.samples} eval), {what}, {sum(p.numel() for p in engine.params):,} trainable "
                f"parameters, batch {cfg.train.batch_size}, {cfg.train.steps} steps on {self.device}")

    # checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {**self.engine.state(), "merges": self.merges, "train_s": self.train_s, "wall_s": self.wall_s(),
                "attempts": self.earlier["attempts"] + 1, "last_eval": self.last_eval}

    def restore(self, state: dict, path) -> None:
        self.engine.restore(state, path)
        self.merges, self.train_s = state["merges"], state["train_s"]
        self.earlier = {"wall_s": state["wall_s"], "attempts": state["attempts"]}
        self.last_eval = state.get("last_eval", {})


def refuse_several_processes(cfg: Config) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(f"mode={cfg.mode} runs in one process, but this is one of {world} processes started "
                          "by torchrun or --nproc-per-node; start it without them (mode=ps and mode=ddp use "
                          "several processes)")


def train(cfg: Config) -> dict:
    """Run mode=lte or mode=full in this process; the run's summary (that of the finished run
    already in out_dir, if there is one)."""
    refuse_several_processes(cfg)
    rundir = RunDir(cfg)
    try:
        start = rundir.open(say=RunLog.say)
        if start.finished is not None:
            return start.finished
        return Trainer(cfg, rundir=rundir).run(start)
    finally:
        rundir.unlock()
