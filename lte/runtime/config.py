"""The run config: every key, its default, and what its value must be.

A run config is one Config of sections (model, data, lte, worker, dist, comm, train, eval,
checkpoint, log). Each section is a dataclass that checks its own keys (`check`, given the whole
config for the rules that involve another section, such as comm.upload against the mode), names
them in its errors, and describes itself for the log; the options a key names (base formats,
activation options and their settings, upload codecs, download strategies, outer optimizers) are
objects from their registries, asked what they allow. Reading YAML and dotted overrides into these
classes is the generic loader's (lte.runtime.loader).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import ClassVar

from ..core.config import LTEConfig
from ..core.download import Download, get_download
from ..core.optim import DECAY_SHAPES, SCHEDULES
from ..core.outer import OuterOptimizer
from ..core.robust import Robust, get_rule
from ..core.upload import UploadCodec, get_codec
from ..errors import ConfigError
from ..memory import SETTINGS, Activations, get_activations, with_settings
from .clock import round_lengths
from .loader import build, coerce, read_yaml, with_overrides


@dataclass(frozen=True)
class Mode:
    """What a mode is: whether it runs several processes, trains LTE heads, and ends rounds in a merge."""

    name: str
    several: bool   # launched by torchrun or lte-train --nproc-per-node
    heads: bool     # trains LTE heads (their options, uploads and overlap apply)
    merges: bool    # its rounds end in a merge (lte.outer applies)


MODES = {m.name: m for m in (Mode("lte", False, True, True), Mode("full", False, False, False),
                             Mode("ps", True, True, True), Mode("ddp", True, False, False),
                             Mode("diloco", True, False, True))}
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes

# Keys that may change between the attempts of one run: they change how long it runs, how it is
# observed or where it computes, not what it computes (a prefix ending in "." covers its section).
FREE_KEYS = ("out_dir", "train.steps", "train.log_every", "train.compile", "train.compile_mode", "train.device",
             "train.logits_chunk_mb", "train.activation_checkpointing", "train.peak_flops", "lte.product",
             "eval.", "checkpoint.",
             "log.", "dist.timeout_s", "dist.sync_phases", "dist.backend", "dist.ps_device", "dist.round_deadline_s",
             "dist.min_workers", "dist.emulate_link_mbps")


def require(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")


class Section:
    """A section of the run config: its key, and the rules of its keys."""

    key: ClassVar[str] = ""

    def check(self, run: Config) -> None:
        """Refuse a bad value of this section's keys (`run`: the whole config, for rules that
        involve another section's key)."""

    def name(self, field_name: str) -> str:
        return f"{self.key}.{field_name}"

    def at_least(self, field_name: str, minimum, rule: str = "") -> None:
        value = getattr(self, field_name)
        require(value >= minimum, self.name(field_name), rule or f"must be >= {minimum:g}", value)


@dataclass
class ModelCfg(Section):
    key = "model"
    name: str = "vit_digits"
    args: dict = field(default_factory=dict)   # passed to the constructor (timm kwargs for timm names)


@dataclass
class DataCfg(Section):
    key = "data"
    name: str = "digits"
    args: dict = field(default_factory=dict)   # passed to the data set builder


@dataclass
class LTECfg(Section):
    key = "lte"
    heads: typing.Optional[int] = 4  # total number of heads N (mode=ps: null = workers x worker.heads)
    rank: int = 8
    alpha: float = 64.0          # head scale s = alpha / rank
    merge_every: typing.Any = 10  # T: steps per round: an integer, [[step, T], ...] or {schedule: qsr, min, max}
    reset: str = "b"             # b | none | ab (see lte.LTEConfig)
    other_params: str = "replica"
    embeddings: str = "replica"  # token embeddings: replica (a trained copy per head) | lte (an LTE layer)
    product: str = "auto"        # how the heads run: auto | factored | merged (see lte.LTEConfig)
    lr: typing.Optional[float] = None   # heads' learning rate; null = train.lr (the paper uses ~0.1x)
    outer: str = "none"          # the merge as an outer step: none | sgd | nesterov (lte.OuterOptimizer)
    outer_lr: float = 1.0
    outer_momentum: float = 0.0

    def check(self, run):
        self.round_lengths(run.train)
        require(self.lr is None or self.lr > 0, "lte.lr", "must be > 0 or null", self.lr)
        require(self.heads is not None or run.mode == "ps", "lte.heads", "must be set (it may be null only in mode=ps)",
                self.heads)
        run.lte_config()  # heads, rank, alpha, reset, other_params, embeddings, named as lte.*
        if self.outer_optimizer().active and not run.mode_of.merges:
            raise ConfigError(f"lte.outer={self.outer} steps the merges of rounds (mode=lte, ps or diloco); "
                              f"mode={run.mode} has no merge")

    def round_lengths(self, train):
        """The rule of the rounds' lengths (lte.runtime.clock.round_lengths), against train.schedule."""
        return round_lengths(self.merge_every, train.lr_factor, train.warmup_steps)

    def outer_optimizer(self) -> OuterOptimizer:
        """The outer optimizer of the run's merges (lte.outer, lte.outer_lr, lte.outer_momentum)."""
        return OuterOptimizer(self.outer, self.outer_lr, self.outer_momentum,
                              names={"kind": "lte.outer", "lr": "lte.outer_lr", "momentum": "lte.outer_momentum"})


@dataclass
class WorkerCfg(Section):        # what each worker process holds (mode=lte: the simulated heads, except base_dtype)
    key = "worker"
    heads: typing.Optional[int] = None  # mode=ps: local heads k; null = lte.heads / workers
    base_dtype: str = "nf4"      # mode=ps: storage of the frozen base: nf4 | fp4 | int8 (bitsandbytes) | bf16 | fp32
    activations: str = "full"    # what the heads keep for backward: full | lora_fa | velora
    chunks: int = 1              # local-chunk training: the model's blocks in this many chunks (1 = off)
    per_rank: dict = field(default_factory=dict)  # mode=ps: {worker rank: {key: value}} overrides of PER_RANK_KEYS
    # and one key per setting the memory options declare (lte.memory.SETTINGS: velora_subtoken, VeLoRA's M)

    def __post_init__(self):
        checked = {rank: self._overrides(rank, o) for rank, o in self.per_rank.items()}
        self.per_rank = {str(int(rank)): o for rank, o in checked.items()}  # "3" whether the YAML had 3 or "3"

    def _overrides(self, rank, overrides) -> dict:
        key = f"worker.per_rank.{rank}"
        try:
            ok = int(rank) >= 1 and str(int(rank)) == str(rank).strip()
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"worker.per_rank keys are worker ranks (integers >= 1; rank 0 is the server), "
                              f"got {rank!r}")
        if not isinstance(overrides, dict):
            raise ConfigError(f"{key} must be a mapping of worker.* keys, got {overrides!r}")
        unknown = sorted(set(overrides) - set(PER_RANK_KEYS))
        if unknown:
            why = " (every worker holds worker.heads heads)" if unknown[0] == "heads" else ""
            raise ConfigError(f"{key} cannot set {unknown[0]!r}{why}; it takes {list(PER_RANK_KEYS)}")
        hints = typing.get_type_hints(type(self))
        return {k: coerce(hints[k], v, f"{key}.{k}") for k, v in overrides.items()}

    @property
    def settings(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in SETTINGS}

    def check(self, run):
        require(self.heads is None or self.heads >= 1, "worker.heads", "must be >= 1 or null", self.heads)
        self.check_options(run, None)
        if not run.mode_of.heads and (self.activations != WorkerCfg.activations or self.chunks != 1):
            raise ConfigError(f"worker.activations and worker.chunks apply to LTE heads (mode=lte or ps); "
                              f"mode={run.mode} trains full-rank")
        if self.per_rank and run.mode != "ps":
            raise ConfigError(f"worker.per_rank sets options per worker process of mode=ps; mode={run.mode} has none")
        for rank in self.per_rank:
            self.check_options(run, int(rank))

    def check_options(self, run: Config, rank: int | None) -> None:
        """The options of worker `rank` (None: worker.* itself), named as that worker's keys."""
        o, keys = run.worker_options(rank), run.worker_keys(rank)
        run.heads_config(o, 1, o.base_dtype, rank)  # base format, activations and their settings
        require(o.chunks >= 1, keys("chunks"), "must be >= 1 (1: no local chunks)", o.chunks)
        if run.comm.overlap and (o.activations != "full" or o.chunks > 1):
            raise ConfigError(f"comm.overlap runs with {keys('activations')}=full and {keys('chunks')}=1 only (the "
                              "carried factors of a round in flight are not built for the other options)")
        if o.chunks > 1 and run.train.compile:
            raise ConfigError(f"{keys('chunks')}={o.chunks} cannot run with train.compile=true: a chunked round runs "
                              "a different part of the model for each chunk; compile is for whole-model steps")

    def activation_option(self) -> Activations:
        return get_activations(self.activations, self.settings)

    def describe(self, base: bool = False) -> str:
        """These options in a few words, for the run's first log line ("" when all are off)."""
        parts = [f"base {self.base_dtype}"] if base else []
        if self.activations != WorkerCfg.activations:
            parts.append(self.activation_option().describe())
        if self.chunks > 1:
            parts.append(f"{self.chunks} local chunks")
        return ", ".join(parts)


WorkerCfg = with_settings(WorkerCfg, SETTINGS)  # noqa: F811  (the declared settings as keys)
PER_RANK_KEYS = ("base_dtype", "activations", *SETTINGS, "chunks")


@dataclass
class DistCfg(Section):          # mode=ps, ddp and diloco
    key = "dist"
    backend: str = "auto"        # auto: nccl between GPU processes, gloo otherwise
    # a collective that waits longer ends the run with an error; the server's wait for a round's uploads
    # spans the workers' whole round, so this must outlast the longest round's compute (qsr rounds grow
    # to hundreds of steps: 368 steps of the language model took over 300 s on 2 CPU cores)
    timeout_s: float = 1800.0
    ps_device: str = "cpu"       # where the parameter server keeps the fp32 master: cpu | cuda
    sync_phases: bool = False    # barrier before each upload, so round timings separate compute from transfer
    servers: int = 1             # mode=ps: ranks 0..servers-1 each hold a slice of the master (whole tensors)
    round_deadline_s: float = 0.0  # lte-train serve: merge what arrived this long after a round began; 0 = wait for all
    min_workers: int = 0         # lte-train serve: workers to wait for before the first round; 0 = every slot
    emulate_link_mbps: float = 0.0  # benchmarks: each worker's messages wait bytes / this bandwidth; 0 = off
    robust: str = "none"         # heads whose change is beyond robust_ratio x the round's median: none | clip | drop
    robust_ratio: float = 4.0
    late: str = "drop"           # lte-train serve: an upload one round late is dropped | merged stale (next merge)

    def check(self, run):
        self.at_least("round_deadline_s", 0, "must be >= 0 (0: wait for every worker)")
        self.at_least("servers", 1)
        require(self.servers == 1 or run.mode == "ps", "dist.servers",
                "must be 1 outside mode=ps (it shards the server)", self.servers)
        self.at_least("min_workers", 0, "must be >= 0 (0: every worker slot)")
        require(self.backend in ("auto", "gloo", "nccl"), "dist.backend", "must be auto, gloo or nccl", self.backend)
        require(self.timeout_s > 0, "dist.timeout_s", "must be > 0", self.timeout_s)
        self.at_least("emulate_link_mbps", 0, "must be >= 0 (0: off)")
        if self.emulate_link_mbps and not run.mode_of.several:
            raise ConfigError(f"dist.emulate_link_mbps slows the links between processes (mode=ps, ddp or diloco); "
                              f"mode={run.mode} runs in one process")
        require(self.ps_device in ("cpu", "cuda"), "dist.ps_device", "must be cpu or cuda", self.ps_device)
        require(self.late in ("drop", "stale"), "dist.late", "must be drop or stale", self.late)
        require(self.robust_ratio > 1, "dist.robust_ratio", "must be > 1 (the median head is never an outlier)",
                self.robust_ratio)
        if self.robust_rule().active and not run.mode_of.heads:
            raise ConfigError(f"dist.robust={self.robust} judges the heads a merge takes (mode=lte or ps); "
                              f"mode={run.mode} merges no heads")
        if self.robust_rule().active and self.servers > 1:
            raise ConfigError(f"dist.robust={self.robust} compares every tensor of a head's change, which a sharded "
                              "server (dist.servers > 1) holds in parts: use one server with it")

    def robust_rule(self) -> Robust:
        return get_rule(self.robust, self.robust_ratio)


@dataclass
class TrainCfg(Section):
    key = "train"
    steps: int = 1000            # optimizer steps (per head, in LTE modes)
    batch_size: int = 64         # global batch; each head gets batch_size / lte.heads
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0    # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0       # max grad norm (per head in LTE modes); 0 = off
    precision: str = "fp32"      # fp32 | bf16 (autocast)
    compile: bool = False        # torch.compile the step (forward + backward; the heads' clip + AdamW apart)
    compile_mode: str = "default"  # with compile: default | reduce-overhead (CUDA graphs) | max-autotune
    logits_chunk_mb: float = 64.0  # language models: fp32 logits a chunk of the loss holds (at least the output
    # layer's trainable values: lte.runtime.tasks); 0 = all at once
    device: str = "auto"         # auto | cpu | cuda
    log_every: int = 10          # steps between progress lines / metrics.jsonl rows
    schedule: str = "cosine"     # cosine | wsd (warmup, constant, decay over the last decay_fraction of the steps)
    decay_fraction: float = 0.2  # wsd: the share of the steps its decay takes
    decay_shape: str = "linear"  # wsd: linear | 1-sqrt
    grad_accum_steps: int = 1    # micro-batches an optimizer step is the mean of (each batch_size / this)
    activation_checkpointing: str = "none"  # none | blocks | blocks:K (every K-th block): recompute in backward
    peak_flops: float = 0.0      # the device's peak FLOP/s for MFU; 0: a GPU's known bf16 dense peak, else no MFU

    def check(self, run):
        self.at_least("steps", 1)
        self.at_least("batch_size", 1)
        require(self.lr > 0, "train.lr", "must be > 0", self.lr)
        self.at_least("weight_decay", 0)
        self.at_least("warmup_steps", 0)
        require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        self.at_least("grad_clip", 0, "must be >= 0 (0 turns clipping off)")
        require(self.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}", self.precision)
        require(self.device in DEVICES, "train.device", f"must be one of {DEVICES}", self.device)
        require(self.compile_mode in COMPILE_MODES, "train.compile_mode", f"must be one of {COMPILE_MODES}",
                self.compile_mode)
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"train.compile_mode={self.compile_mode} is a mode of torch.compile: "
                              "set train.compile=true with it")
        self.at_least("log_every", 1)
        self.at_least("logits_chunk_mb", 0, "must be >= 0 (0: no chunks)")
        require(self.schedule in SCHEDULES, "train.schedule", f"must be one of {tuple(SCHEDULES)}", self.schedule)
        require(0 < self.decay_fraction <= 1, "train.decay_fraction", "must be in (0, 1]", self.decay_fraction)
        require(self.decay_shape in DECAY_SHAPES, "train.decay_shape", f"must be one of {tuple(DECAY_SHAPES)}",
                self.decay_shape)
        if self.schedule != "wsd" and (self.decay_fraction != TrainCfg.decay_fraction
                                       or self.decay_shape != TrainCfg.decay_shape):
            raise ConfigError(f"train.decay_fraction and train.decay_shape shape the wsd schedule; "
                              f"train.schedule={self.schedule} has no such decay: set train.schedule=wsd or leave them")
        self.at_least("grad_accum_steps", 1)
        self.checkpoint_every()
        self.at_least("peak_flops", 0, "must be >= 0 (0: a GPU's known peak, else no MFU)")
        if run.mode == "lte":
            self.per_head(run.lte.heads)

    def split(self, parts: int, how: str) -> int:
        """Each part's share of a step's batch when it is cut into `parts` (`how`, for the error: how
        it is cut), each share into train.grad_accum_steps micro-batches, or a ConfigError."""
        k = self.grad_accum_steps
        if self.batch_size % parts:
            raise ConfigError(f"train.batch_size={self.batch_size} does not split {how}")
        if self.batch_size % (parts * k):
            raise ConfigError(f"train.batch_size={self.batch_size} does not split {how} of "
                              f"train.grad_accum_steps={k} micro-batches each; make it a multiple of {parts * k}")
        return self.batch_size // parts

    def per_head(self, heads: int) -> int:
        return self.split(heads, f"into lte.heads={heads} equal per-head batches; make it a multiple of lte.heads")

    def lr_factor(self, step: int) -> float:
        """The learning rate of step `step` (0-based) over train.lr: a pure function of the step."""
        return SCHEDULES[self.schedule](step, warmup=self.warmup_steps, total=self.steps, min_ratio=self.min_lr_ratio,
                                        decay_fraction=self.decay_fraction, decay_shape=self.decay_shape)

    def checkpoint_every(self) -> int:
        """Activation checkpointing: every how many blocks one is recomputed in backward (0: none)."""
        value, key = self.activation_checkpointing, "train.activation_checkpointing"
        if value == "none":
            return 0
        if value == "blocks":
            return 1
        name, _, every = value.partition(":")
        if name != "blocks" or not every.isdigit() or int(every) < 1:
            raise ConfigError(f"{key} must be none, blocks or blocks:K (every K-th block, K >= 1), got {value!r}")
        return int(every)


@dataclass
class CommCfg(Section):          # what a merge receives of the heads (mode=ps: what the workers send)
    key = "comm"
    upload: str = "fp32"         # fp32 | bf16 | int8 | int4 | int2 (blocks of 64 with a scale; error feedback)
    download: str = "full"       # mode=ps: full | delta (the change since the last download, deflated; exact)
    overlap: bool = False        # a round's upload, merge and download run during the next round (one round stale)

    def codec(self) -> UploadCodec:
        return get_codec(self.upload, key="comm.upload")

    def download_strategy(self) -> Download:
        return get_download(self.download, key="comm.download")

    def check(self, run):
        self.download_strategy()
        if self.codec().lossy and not run.mode_of.heads:
            raise ConfigError(f"comm.upload={self.upload} compresses the heads' uploads (mode=lte or ps); "
                              f"mode={run.mode} has none")
        if self.codec().lossy and run.lte.reset == "none":
            raise ConfigError(f"comm.upload={self.upload} cannot run with lte.reset=none: that merge subtracts "
                              "the previous round's factors as the workers hold them, not as they were sent; use "
                              "lte.reset=b or ab")
        if not self.overlap:
            return
        if not run.mode_of.heads:
            raise ConfigError(f"comm.overlap runs a round's merge during the next round of LTE heads (mode=lte or ps); "
                              f"mode={run.mode} has none")
        if run.lte.reset == "none":
            raise ConfigError("comm.overlap cannot run with lte.reset=none: that merge subtracts the factors the "
                              "heads held at the last merge, which a one-round-stale round did not start from; use "
                              "lte.reset=b or ab")
        if run.dist.sync_phases:
            raise ConfigError("dist.sync_phases waits out the workers' compute before each upload, and comm.overlap "
                              "uploads during compute: set one of them")

    def describe(self, downloads: bool = True) -> str:
        """The download (unless not `downloads`: one process downloads nothing) and overlap options in
        a few words ("" when off); the upload codec says its own (lte.core.upload.Uploader.describe)."""
        parts = [self.download_strategy().describe()] if downloads else []
        return ", ".join(filter(None, parts + (["rounds overlapped (one round stale)"] if self.overlap else [])))


@dataclass
class EvalCfg(Section):
    key = "eval"
    every: int = 0               # rounds (lte.merge_every steps) between evals; 0 = at the end only
    batch_size: int = 512
    batches: typing.Optional[int] = None  # evaluate this many batches, spread over the eval set; null = all of it

    def check(self, run):
        self.at_least("every", 0)
        self.at_least("batch_size", 1)
        require(self.batches is None or self.batches >= 1, "eval.batches", "must be >= 1 or null", self.batches)


@dataclass
class CheckpointCfg(Section):
    key = "checkpoint"
    every: int = 0               # rounds between checkpoints in out_dir; 0 = only the final one
    resume: bool = True          # continue the run in out_dir; false: move it aside and start afresh
    keep: int = 2                # checkpoints kept; older ones are deleted once a newer one is on disk

    def check(self, run):
        self.at_least("every", 0)
        self.at_least("keep", 1)


@dataclass
class LogCfg(Section):
    key = "log"
    wandb: bool = False
    wandb_project: str = "lte"
    wandb_mode: str = "offline"  # offline needs no account; "online" syncs

    def check(self, run):
        require(self.wandb_mode in ("offline", "online", "disabled"), "log.wandb_mode",
                "must be offline, online or disabled", self.wandb_mode)


@dataclass
class Config:
    mode: str = "lte"            # lte: simulated heads | full: full-rank | ps: parameter server + workers | ddp
    #                              | diloco: full-rank workers averaging every lte.merge_every steps (baseline)
    seed: int = 0
    out_dir: str = "runs/default"    # "{mode}" in it is replaced by the run's mode
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    lte: LTECfg = field(default_factory=LTECfg)
    worker: WorkerCfg = field(default_factory=WorkerCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    comm: CommCfg = field(default_factory=CommCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    log: LogCfg = field(default_factory=LogCfg)

    def check(self) -> None:
        """Refuse a config that cannot run, naming the first bad key."""
        require(self.mode in MODES, "mode", f"must be one of {tuple(MODES)}", self.mode)
        require(self.seed >= 0, "seed", "must be >= 0", self.seed)
        require(bool(self.out_dir), "out_dir", "must be a path", self.out_dir)
        for section in (self.lte, self.worker, self.train, self.eval, self.dist, self.checkpoint, self.log, self.comm):
            section.check(self)

    @property
    def mode_of(self) -> Mode:
        return MODES[self.mode]

    def lte_config(self, rank: int | None = None) -> LTEConfig:
        """The LTEConfig of the heads one process holds: rank None, mode=lte's simulated heads (all
        lte.heads, base fp32: that model holds the master it merges into); rank r, worker r of
        mode=ps (worker.heads heads, its worker.* options with its worker.per_rank overrides)."""
        o = self.worker_options(rank)
        heads = self.lte.heads if rank is None else self.worker.heads
        return self.heads_config(o, heads if heads is not None else 1, "fp32" if rank is None else o.base_dtype, rank)

    def heads_config(self, options: WorkerCfg, heads: int, base: str, rank: int | None) -> LTEConfig:
        """An LTEConfig of `heads` heads with worker `rank`'s `options` and base, its errors naming
        the keys this config holds them under."""
        keys = self.worker_keys(rank)
        names = {"seed": "seed", "overlap": "comm.overlap", "base": keys("base_dtype"),
                 "activations": keys("activations"), "heads": "lte.heads" if rank is None else "worker.heads",
                 **{k: f"lte.{k}" for k in ("rank", "alpha", "reset", "other_params", "embeddings", "product")},
                 **{k: keys(k) for k in SETTINGS}}
        lt = self.lte
        return LTEConfig(heads=heads, rank=lt.rank, alpha=lt.alpha, reset=lt.reset, other_params=lt.other_params,
                         embeddings=lt.embeddings, product=lt.product, seed=self.seed, base=base,
                         activations=options.activations, overlap=self.comm.overlap, **options.settings, names=names)

    def worker_options(self, rank: int | None = None) -> WorkerCfg:
        """worker.* for one worker: its worker.per_rank overrides applied (rank None: worker.* itself)."""
        if rank is None:
            return self.worker
        return dataclasses.replace(self.worker, per_rank={}, **self.worker.per_rank.get(str(rank), {}))

    def worker_keys(self, rank: int | None):
        """How worker `rank`'s option keys are named: worker.per_rank.<rank>.<key> for the ones its
        overrides set, worker.<key> for the rest."""
        overrides = {} if rank is None else self.worker.per_rank.get(str(rank), {})
        return lambda k: f"worker.per_rank.{rank}.{k}" if k in overrides else f"worker.{k}"

    def outer_optimizer(self) -> OuterOptimizer:
        return self.lte.outer_optimizer()

    @property
    def head_lr(self) -> float:
        return self.train.lr if self.lte.lr is None else self.lte.lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply dotted overrides, check everything."""
    return config_from_dict(read_yaml(path) if path is not None else {}, overrides)


def config_from_dict(raw: dict, overrides: list[str] = ()) -> Config:
    """A config from a nested mapping (as a YAML file holds it) and dotted overrides, checked."""
    cfg = build(Config, with_overrides(raw, overrides))
    # one config file serves every mode without one mode's run refusing another's out_dir
    cfg.out_dir = cfg.out_dir.replace("{mode}", cfg.mode)
    cfg.check()
    return cfg


def resolve_heads(cfg: Config, workers: int) -> Config:
    """mode=ps: fill in lte.heads (N) and worker.heads (k) so that N = workers x k, or refuse."""
    n, k = cfg.lte.heads, cfg.worker.heads
    if n is None and k is None:
        raise ConfigError("mode=ps needs lte.heads (total heads) or worker.heads (heads per worker)")
    if n is None:
        n = workers * k
    if k is None:
        if n % workers:
            raise ConfigError(f"lte.heads={n} does not split over {workers} workers; set worker.heads "
                              f"or make lte.heads a multiple of {workers}")
        k = n // workers
    if n != workers * k:
        raise ConfigError(f"lte.heads={n} must equal workers x worker.heads = {workers} x {k} = {workers * k}")
    beyond = sorted(int(r) for r in cfg.worker.per_rank if int(r) > workers)
    if beyond:
        raise ConfigError(f"worker.per_rank names worker rank {beyond[0]}, but this run's workers are ranks "
                          f"1..{workers}")
    cfg.train.per_head(n)
    return dataclasses.replace(cfg, lte=dataclasses.replace(cfg.lte, heads=n),
                               worker=dataclasses.replace(cfg.worker, heads=k))
