"""The engine every mode shares: the model one process trains, its batch streams, its optimizer and
its step, plus evaluating a model and picking the device.

The single-process trainer (lte.single.trainer), a DDP rank and a parameter-server worker
(lte.distributed) each hold one Engine; the server evaluates its master with `evaluate`.
The learning rate is a pure function of the step (cosine with warm-up), set on the optimizer's
param groups before every step: nothing about the schedule is saved, seeked or restored.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from .. import core
from ..data import EvalBatches, HeadBatches, TrainBatches
from ..models import stated_depth
from ..errors import ConfigError
from .chunks import LocalChunks
from .config import Config
from .log import Throughput, flops_per_token, peak_flops
from .model import build_model, load_model_state
from .recompute import recompute_blocks
from .tasks import Metrics, TrainingLoss


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


def eval_batches(cfg: Config, data, device: torch.device) -> EvalBatches:
    """The evaluation set of a run: eval.batches batches of eval.batch_size (all of it if null)."""
    e = cfg.eval
    return EvalBatches(data.eval, e.batch_size, None if e.batches is None else e.batches * e.batch_size,
                       workers=data.workers, device=device, transform=data.device_transform)


@torch.no_grad()
def evaluate(model: nn.Module, batches: EvalBatches, task: str, device: torch.device, precision: str) -> dict:
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


def adamw(params: list[torch.Tensor], *, lr: float, weight_decay: float, heads: bool) -> torch.optim.Optimizer:
    """The optimizer of a process: AdamW, fused (one kernel a step); over per-head tensors (`heads`),
    laid out in one buffer so that it and the per-head clip run over one tensor (core.HeadOptimizer)."""
    if heads:
        return core.HeadOptimizer(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


class TrainStep:
    """One optimizer step: forward and loss, backward, the clip (per head with heads > 1: with one
    head, per-head and global clipping are the same thing), the optimizer's step at the step's
    learning rate, and the gradients zeroed. `compile` (train.compile): the forward and backward
    compiled, and a HeadOptimizer's clip and step compiled as a second graph, both in torch.compile's
    `compile_mode` (train.compile_mode).

    With `accum` micro-batches (train.grad_accum_steps) the gradient is the mean of theirs: micro-batch
    j holds every head's j-th share of its own slice, so a head still sees only its own samples, and
    a DDP model all-reduces on the last only (no_sync on the others)."""

    def __init__(self, forward, loss_fn: TrainingLoss, params: list[torch.Tensor], optimizer, *, heads: int,
                 grad_clip: float, device: torch.device, precision: str, compile: bool = False, accum: int = 1,
                 compile_mode: str = "default"):
        self.forward = torch.compile(forward, mode=compile_mode) if compile else forward
        self.loss_fn, self.params, self.optimizer = loss_fn, params, optimizer
        self.heads, self.grad_clip, self.device, self.precision = heads, grad_clip, device, precision
        self.accum, self.micro_index = accum, 0
        self.compiled = compile
        self.bases = core.BaseCopies()  # the LTE layers' bases in bf16, kept between merges
        if compile and isinstance(optimizer, core.HeadOptimizer):
            optimizer.compile(compile_mode)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        loss = self.forward_backward(x, y)
        self.update(lr)
        return loss

    def loss_of(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch, with the graph backward will run through."""
        with autocast(self.device, self.precision), self.precast():  # the loss may run the output layer
            with self.loss_fn.forward_mode():
                outputs = self.forward(x)
            return self.loss_fn(outputs, y)

    def precast(self):
        """Under bf16, the head tensors cast for the forward by one op and the fp32 bases' casts kept
        between merges (core.precast); compiled, the graph fuses the casts itself. Inside a precast
        already (the step's), nothing more: the tensors do not change before the optimizer's step."""
        if self.precision != "bf16" or self.compiled or not isinstance(self.optimizer, core.HeadOptimizer) \
                or core.precasting():
            return contextlib.nullcontext()
        return core.precast(self.optimizer.compute_copies(torch.bfloat16), self.bases)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Every micro-batch's forward and backward; the step's mean loss. One precast covers them all,
        backward included, where recomputed activations (checkpointed blocks, the chunked loss's
        logits) run the layers again."""
        with self.precast():
            return self._forward_backward(x, y)

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = None
        for j in range(self.accum):
            self.micro_index = j
            sync = j == self.accum - 1 or not hasattr(self.forward, "no_sync")
            with contextlib.nullcontext() if sync else self.forward.no_sync():
                loss = self.loss_of(self.micro(x, j), self.micro(y, j))
                # Each head optimises the mean loss of its own slice: the sum of per-head means is N * mean
                # (and a micro-batch's mean is 1/accum of the step's).
                (loss * (self.heads / self.accum)).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total if self.accum == 1 else total / self.accum

    def micro(self, t: torch.Tensor, j: int) -> torch.Tensor:
        """Micro-batch j's part of a tensor laid out as the step's batch (heads' slices in order)."""
        return t if self.accum == 1 else t.unflatten(0, (self.heads, self.accum, -1))[:, j].flatten(0, 1)

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The step's batch again from its micro-batches' parts (the inverse of micro)."""
        if self.accum == 1:
            return parts[0]
        return torch.stack([p.unflatten(0, (self.heads, -1)) for p in parts], dim=1).flatten(0, 2)

    @torch.no_grad()
    def update(self, lr: float) -> None:
        if isinstance(self.optimizer, core.HeadOptimizer):
            self.optimizer.update(lr, self.grad_clip)  # clip, step and zero over one buffer
            return
        if self.grad_clip > 0:
            if self.heads > 1:
                core.clip_grad_norm_per_head_(self.params, self.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Engine:
    """What one process trains: its model (plain, or prepared with some of the run's heads), the
    batch streams that feed it, and its optimizer. Shared by every mode.

    heads:   global indices of the LTE heads this process holds, or None for full-rank training.
    lte:     the LTEConfig of those heads (their count, rank, memory options); None for full-rank.
    streams: the batch streams this process draws from, per_stream samples each per step; an LTE
             head's stream is its own global index, so a head sees the same batches everywhere.
    chunks:  local-chunk training (lte.runtime.chunks) in this many chunks; 1: off.
    wrap:    wraps the model for the forward pass (DDP's DistributedDataParallel); compiled after.
    lean:    the heads' base and replicas will come from a parameter server: build the model without
             its fp32 weights (lte.core.lean), unless some tensor would then be left unfilled.
    """

    def __init__(self, cfg: Config, data, device: torch.device, *, heads: range | None, streams: range,
                 per_stream: int, lte: core.LTEConfig | None = None, chunks: int = 1,
                 wrap: Callable[[nn.Module], nn.Module] | None = None, lean: bool = False):
        self.cfg, self.data, self.device = cfg, data, device
        self.heads = heads
        self.model, self.lean = self.build(lte, lean and heads is not None)
        self.recompute()
        self.batches = TrainBatches(data.train, HeadBatches(len(data.train), per_stream, cfg.seed, streams,
                                                            data.sampling),
                                    steps=cfg.train.steps, workers=data.workers, device=device,
                                    transform=data.device_transform)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        t = cfg.train
        self.base_lr = cfg.head_lr if heads is not None else t.lr
        # local chunks move single tensors (and their moments) between host and device: one tensor each
        self.optimizer = adamw(self.params, lr=self.lr_at(0), weight_decay=t.weight_decay,
                               heads=heads is not None and chunks == 1)
        forward = self.model if wrap is None else wrap(self.model)
        self.chunks = LocalChunks(self.model, chunks, self.params, self.optimizer, device) if chunks > 1 else None
        self.loss = TrainingLoss.of(data.task, self.model, t.logits_chunk_mb)
        self.step_function = TrainStep(forward, self.loss, self.params, self.optimizer,
                                       heads=1 if heads is None else len(heads), grad_clip=t.grad_clip, device=device,
                                       precision=t.precision, compile=t.compile, accum=t.grad_accum_steps,
                                       compile_mode=t.compile_mode)
        self.step = 0

    def build(self, lte: core.LTEConfig | None, lean: bool) -> tuple[nn.Module, bool]:
        """The model (prepared with the heads, if any), and whether it was built lean."""
        if lean:
            plain = build_model(self.cfg, self.data, None)
            self.model_params = sum(p.numel() for p in plain.parameters())
            model = core.prepare(plain, lte, first_head=self.heads.start)
            if not core.unfilled(model):
                core.materialize(model, self.device)
                return model, True
        model = build_model(self.cfg, self.data, self.device)
        self.model_params = sum(p.numel() for p in model.parameters())  # the model's own, before any heads
        if self.heads is not None:
            model = core.prepare(model, lte, first_head=self.heads.start)
        return model, False

    def throughput(self, devices: int = 1) -> Throughput:
        """The meter of this run's speed: samples/s, and for a language model tokens/s and MFU (the
        model's FLOPs, 6 N per token plus attention, over `devices` x the peak)."""
        t = self.cfg.train
        tokens = getattr(self.data.train, "block_size", 0) if self.data.task == "language_model" else 0
        layers, width = stated_depth(self.model)
        return Throughput(self.device, tokens, flops_per_token(self.model_params, layers, width, tokens),
                          peak_flops(self.device, t.precision, t.peak_flops), devices)

    def recompute(self) -> None:
        """train.activation_checkpointing: the chosen blocks recompute their activations in backward."""
        every = self.cfg.train.checkpoint_every()
        if every:
            recompute_blocks(self.model, every)

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based): train.schedule's (warm-up, then cosine or wsd)."""
        return self.base_lr * self.cfg.train.lr_factor(step)

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
        `advance` moves the step counter on (a local chunk before the last does not)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)  # a no-op for a fresh batch
        loss = self.step_function(x, y, self.lr_at(self.step if step is None else step))
        if advance:
            self.step += 1
        return loss

    @contextlib.contextmanager
    def resident(self):
        """Everything on the device (evaluation) even if local chunks keep most of it in host memory."""
        if self.chunks is not None:
            self.chunks.place(None)
        yield

    def seek(self, step: int) -> None:
        """Continue at `step`: the data streams and the learning rate are functions of the step alone."""
        self.step = step

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "rng": torch.get_rng_state()}

    def restore(self, state: dict, path=None) -> None:
        load_model_state(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        torch.set_rng_state(state["rng"])

    def final_weights(self) -> dict:
        """The trained model as a plain state_dict (merged weights for LTE)."""
        return core.export(self.model) if self.heads is not None else {
            k: v.detach().clone() for k, v in self.model.state_dict().items()}
