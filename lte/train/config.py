"""The run config: a YAML file plus dotted `key=value` overrides, checked before anything runs.

Every key has a default here; a key that is not here is refused, and so is a value of the wrong
type or range, with a message that names the key.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..core.config import OTHER_PARAMS, RESETS, LTEConfig
from ..core.outer import OuterOptimizer
from ..core.upload import get_codec
from ..errors import ConfigError
from ..memory import FORMATS, check_reset, get_activations
from ..memory.activations import DEFAULT_VELORA_SUBTOKEN

MODES = ("lte", "full", "ps", "ddp", "diloco")
MULTI_PROCESS = ("ps", "ddp", "diloco")  # launched by torchrun or lte-train --nproc-per-node
MERGING = ("lte", "ps", "diloco")        # modes whose rounds end in a merge (lte.outer applies)
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ModelCfg:
    name: str = "vit_digits"
    args: dict = field(default_factory=dict)   # passed to the constructor (timm kwargs for timm names)


@dataclass
class DataCfg:
    name: str = "digits"
    args: dict = field(default_factory=dict)   # passed to the data set builder


@dataclass
class LTECfg:
    heads: typing.Optional[int] = 4  # total number of heads N (mode=ps: null = workers x worker.heads)
    rank: int = 8
    alpha: float = 64.0          # head scale s = alpha / rank
    merge_every: int = 10        # T: optimizer steps per head between merges (one round)
    reset: str = "b"             # b | none | ab (see lte.LTEConfig)
    other_params: str = "replica"
    embeddings: str = "replica"  # token embeddings: replica (a trained copy per head) | lte (an LTE layer)
    lr: typing.Optional[float] = None   # heads' learning rate; null = train.lr (the paper uses ~0.1x)
    outer: str = "none"          # the merge as an outer step: none | sgd | nesterov (lte.OuterOptimizer)
    outer_lr: float = 1.0
    outer_momentum: float = 0.0


@dataclass
class WorkerCfg:                 # what each worker process holds (mode=lte: the simulated heads, except base_dtype)
    heads: typing.Optional[int] = None  # mode=ps: local heads k; null = lte.heads / workers
    base_dtype: str = "nf4"      # mode=ps: storage of the frozen base: nf4 | fp4 | int8 (bitsandbytes) | bf16 | fp32
    activations: str = "full"    # what the heads keep for backward: full | lora_fa | velora
    velora_subtoken: int = DEFAULT_VELORA_SUBTOKEN  # VeLoRA's sub-token size M
    chunks: int = 1              # local-chunk training: the model's blocks in this many chunks (1 = off)
    per_rank: dict = field(default_factory=dict)  # mode=ps: {worker rank: {key: value}} overrides of the keys above

    def activation_option(self):
        return get_activations(self.activations, {"velora_subtoken": self.velora_subtoken})

    def describe(self, base: bool = False) -> str:
        """These options in a few words, for the run's first log line ("" when all are off)."""
        parts = [f"base {self.base_dtype}"] if base else []
        if self.activations != WorkerCfg.activations:
            parts.append(self.activation_option().describe())
        if self.chunks > 1:
            parts.append(f"{self.chunks} local chunks")
        return ", ".join(parts)


PER_RANK_KEYS = ("base_dtype", "activations", "velora_subtoken", "chunks")


@dataclass
class DistCfg:                   # mode=ps, ddp and diloco
    backend: str = "auto"        # auto: nccl between GPU processes, gloo otherwise
    timeout_s: float = 300.0     # a collective that waits longer ends the run with an error
    ps_device: str = "cpu"       # where the parameter server keeps the fp32 master: cpu | cuda
    sync_phases: bool = False    # barrier before each upload, so round timings separate compute from transfer
    servers: int = 1             # mode=ps: ranks 0..servers-1 each hold a slice of the master (whole tensors)
    round_deadline_s: float = 0.0  # lte-train serve: merge what arrived this long after a round began; 0 = wait for all
    min_workers: int = 0         # lte-train serve: workers to wait for before the first round; 0 = every slot
    emulate_link_mbps: float = 0.0  # benchmarks: each worker's messages wait bytes / this bandwidth; 0 = off


@dataclass
class TrainCfg:
    steps: int = 1000            # optimizer steps (per head, in LTE modes)
    batch_size: int = 64         # global batch; each head gets batch_size / lte.heads
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0    # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0       # max grad norm (per head in LTE modes); 0 = off
    precision: str = "fp32"      # fp32 | bf16 (autocast)
    compile: bool = False        # torch.compile the model
    logits_chunk_mb: float = 64.0  # language models: fp32 logits one chunk of the loss may hold; 0 = all at once
    device: str = "auto"         # auto | cpu | cuda
    log_every: int = 10          # steps between progress lines / metrics.jsonl rows


DOWNLOADS = ("full", "delta")  # lte.distributed.download


@dataclass
class CommCfg:                   # what a merge receives of the heads (mode=ps: what the workers send)
    upload: str = "fp32"         # fp32 | bf16 | int8 | int4 (blocks of 64 with a scale; error feedback)
    download: str = "full"       # mode=ps: full | delta (the change since the last download, deflated; exact)
    overlap: bool = False        # a round's upload, merge and download run during the next round (one round stale)

    def describe(self, downloads: bool = True) -> str:
        """The download (unless not `downloads`: one process downloads nothing) and overlap options in
        a few words ("" when off); the upload codec says its own (lte.core.upload.Uploader.describe)."""
        parts = ["downloads as deltas"] if downloads and self.download == "delta" else []
        return ", ".join(parts + (["rounds overlapped (one round stale)"] if self.overlap else []))


@dataclass
class EvalCfg:
    every: int = 0               # rounds (lte.merge_every steps) between evals; 0 = at the end only
    batch_size: int = 512
    batches: typing.Optional[int] = None  # evaluate this many batches, spread over the eval set; null = all of it


@dataclass
class CheckpointCfg:
    every: int = 0               # rounds between checkpoints in out_dir; 0 = only the final one
    resume: bool = True          # continue the run in out_dir; false: move it aside and start afresh
    keep: int = 2                # checkpoints kept; older ones are deleted once a newer one is on disk


@dataclass
class LogCfg:
    wandb: bool = False
    wandb_project: str = "lte"
    wandb_mode: str = "offline"  # offline needs no account; "online" syncs


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

    def lte_config(self, rank: int | None = None) -> LTEConfig:
        """The LTEConfig of the heads one process holds: rank None, mode=lte's simulated heads (all
        lte.heads, base fp32: that model holds the master it merges into); rank r, worker r of
        mode=ps (worker.heads heads, its worker.* options with its worker.per_rank overrides)."""
        o = self.worker_options(rank)
        heads = self.lte.heads if rank is None else self.worker.heads
        try:
            return LTEConfig(heads=heads if heads is not None else 1, rank=self.lte.rank, alpha=self.lte.alpha,
                             reset=self.lte.reset, other_params=self.lte.other_params,
                             embeddings=self.lte.embeddings, seed=self.seed,
                             base="fp32" if rank is None else o.base_dtype, activations=o.activations,
                             velora_subtoken=o.velora_subtoken, overlap=self.comm.overlap)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("LTEConfig.", "lte.")) from None

    def outer_optimizer(self) -> OuterOptimizer:
        """The outer optimizer of the run's merges (lte.outer, lte.outer_lr, lte.outer_momentum)."""
        try:
            return OuterOptimizer(self.lte.outer, self.lte.outer_lr, self.lte.outer_momentum)
        except ConfigError as exc:
            names = {"OuterOptimizer.kind": "lte.outer", "OuterOptimizer.lr": "lte.outer_lr",
                     "OuterOptimizer.momentum": "lte.outer_momentum"}
            message = str(exc)
            for old, new in names.items():
                message = message.replace(old, new)
            raise ConfigError(message) from None

    def worker_options(self, rank: int | None = None) -> WorkerCfg:
        """worker.* for one worker: its worker.per_rank overrides applied (rank None: worker.* itself)."""
        if rank is None:
            return self.worker
        overrides = {str(k).strip(): v for k, v in self.worker.per_rank.items()}.get(str(rank), {})
        return dataclasses.replace(self.worker, per_rank={}, **overrides)

    @property
    def head_lr(self) -> float:
        return self.train.lr if self.lte.lr is None else self.lte.lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply dotted overrides, check everything."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    return config_from_dict(raw, overrides)


def config_from_dict(raw: dict, overrides: list[str] = ()) -> Config:
    """A config from a nested mapping (as a YAML file holds it) and dotted overrides, checked."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({first})") from None
        _set_dotted(raw, key.strip(), value)
    cfg = _build(Config, raw, "")
    # one config file serves every mode without one mode's run refusing another's out_dir
    cfg.out_dir = cfg.out_dir.replace("{mode}", cfg.mode)
    validate(cfg)
    return cfg


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; "
                          f"{prefix.rstrip('.') or 'the top level'} takes {sorted(names)}")
    values = {}
    for name in names & set(raw):
        values[name] = _coerce(hints[name], raw[name], prefix + name)
    return cls(**values)


def _coerce(tp, value, key: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    if optional:
        if value is None:
            return None
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    raise TypeError(f"no coercion for {tp}")


def _check(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")


def validate(cfg: Config) -> None:
    _check(cfg.mode in MODES, "mode", f"must be one of {MODES}", cfg.mode)
    _check(cfg.seed >= 0, "seed", "must be >= 0", cfg.seed)
    _check(bool(cfg.out_dir), "out_dir", "must be a path", cfg.out_dir)
    t, lt = cfg.train, cfg.lte
    _check(t.steps >= 1, "train.steps", "must be >= 1", t.steps)
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1", t.batch_size)
    _check(t.lr > 0, "train.lr", "must be > 0", t.lr)
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0", t.weight_decay)
    _check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", t.warmup_steps)
    _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]", t.min_lr_ratio)
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 turns clipping off)", t.grad_clip)
    _check(t.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}", t.precision)
    _check(t.device in DEVICES, "train.device", f"must be one of {DEVICES}", t.device)
    _check(t.log_every >= 1, "train.log_every", "must be >= 1", t.log_every)
    _check(t.logits_chunk_mb >= 0, "train.logits_chunk_mb", "must be >= 0 (0: no chunks)", t.logits_chunk_mb)
    _check(lt.merge_every >= 1, "lte.merge_every", "must be >= 1", lt.merge_every)
    _check(lt.reset in RESETS, "lte.reset", f"must be one of {RESETS}", lt.reset)
    _check(lt.other_params in OTHER_PARAMS, "lte.other_params", f"must be one of {OTHER_PARAMS}",
           lt.other_params)
    _check(lt.lr is None or lt.lr > 0, "lte.lr", "must be > 0 or null", lt.lr)
    _check(cfg.eval.every >= 0, "eval.every", "must be >= 0", cfg.eval.every)
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1", cfg.eval.batch_size)
    _check(cfg.eval.batches is None or cfg.eval.batches >= 1, "eval.batches", "must be >= 1 or null", cfg.eval.batches)
    _check(cfg.dist.round_deadline_s >= 0, "dist.round_deadline_s", "must be >= 0 (0: wait for every worker)",
           cfg.dist.round_deadline_s)
    _check(cfg.dist.servers >= 1, "dist.servers", "must be >= 1", cfg.dist.servers)
    _check(cfg.dist.servers == 1 or cfg.mode == "ps", "dist.servers",
           "must be 1 outside mode=ps (it shards the server)", cfg.dist.servers)
    _check(cfg.dist.min_workers >= 0, "dist.min_workers", "must be >= 0 (0: every worker slot)", cfg.dist.min_workers)
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0", cfg.checkpoint.every)
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1", cfg.checkpoint.keep)
    _check(cfg.log.wandb_mode in ("offline", "online", "disabled"), "log.wandb_mode",
           "must be offline, online or disabled", cfg.log.wandb_mode)
    _check(lt.heads is not None or cfg.mode == "ps", "lte.heads", "must be set (it may be null only in mode=ps)",
           lt.heads)
    _check(cfg.worker.heads is None or cfg.worker.heads >= 1, "worker.heads", "must be >= 1 or null",
           cfg.worker.heads)
    _validate_worker(cfg)  # before lte_config(), which would name the worker's options lte.*
    cfg.lte_config()  # heads, rank, alpha ranges, named as lte.*
    cfg.outer_optimizer()
    _check(cfg.comm.download in DOWNLOADS, "comm.download", f"must be one of {DOWNLOADS}", cfg.comm.download)
    codec = get_codec(cfg.comm.upload)
    if codec.lossy and cfg.mode not in ("lte", "ps"):
        raise ConfigError(f"comm.upload={cfg.comm.upload} compresses the heads' uploads (mode=lte or ps); "
                          f"mode={cfg.mode} has none")
    if codec.lossy and lt.reset == "none":
        raise ConfigError(f"comm.upload={cfg.comm.upload} cannot run with lte.reset=none: that merge subtracts "
                          "the previous round's factors as the workers hold them, not as they were sent; use "
                          "lte.reset=b or ab")
    if lt.outer != "none" and cfg.mode not in MERGING:
        raise ConfigError(f"lte.outer={lt.outer} steps the merges of rounds (mode=lte, ps or diloco); "
                          f"mode={cfg.mode} has no merge")
    _check(cfg.dist.backend in ("auto", "gloo", "nccl"), "dist.backend", "must be auto, gloo or nccl",
           cfg.dist.backend)
    _check(cfg.dist.timeout_s > 0, "dist.timeout_s", "must be > 0", cfg.dist.timeout_s)
    _check(cfg.dist.emulate_link_mbps >= 0, "dist.emulate_link_mbps", "must be >= 0 (0: off)",
           cfg.dist.emulate_link_mbps)
    if cfg.dist.emulate_link_mbps and cfg.mode not in ("ps", "ddp", "diloco"):
        raise ConfigError(f"dist.emulate_link_mbps slows the links between processes (mode=ps, ddp or diloco); "
                          f"mode={cfg.mode} runs in one process")
    _validate_overlap(cfg)
    _check(cfg.dist.ps_device in ("cpu", "cuda"), "dist.ps_device", "must be cpu or cuda", cfg.dist.ps_device)
    if cfg.mode == "lte" and t.batch_size % lt.heads:
        raise ConfigError(f"train.batch_size={t.batch_size} does not split into lte.heads={lt.heads} "
                          "equal per-head batches; make it a multiple of lte.heads")


def _validate_overlap(cfg: Config) -> None:
    if not cfg.comm.overlap:
        return
    if cfg.mode not in ("lte", "ps"):
        raise ConfigError(f"comm.overlap runs a round's merge during the next round of LTE heads (mode=lte or ps); "
                          f"mode={cfg.mode} has none")
    if cfg.lte.reset == "none":
        raise ConfigError("comm.overlap cannot run with lte.reset=none: that merge subtracts the factors the heads "
                          "held at the last merge, which a one-round-stale round did not start from; use lte.reset=b "
                          "or ab")
    if cfg.dist.sync_phases:
        raise ConfigError("dist.sync_phases waits out the workers' compute before each upload, and comm.overlap "
                          "uploads during compute: set one of them")


def _check_worker_options(w: WorkerCfg, cfg: Config, prefix: str) -> None:
    _check(w.base_dtype in FORMATS, prefix + "base_dtype", f"must be one of {tuple(FORMATS)}", w.base_dtype)
    option = get_activations(w.activations, key=prefix + "activations")
    check_reset(option, cfg.lte.reset, key=prefix + "activations", reset_key="lte.reset")
    _check(w.velora_subtoken >= 1, prefix + "velora_subtoken", "must be >= 1", w.velora_subtoken)
    _check(w.chunks >= 1, prefix + "chunks", "must be >= 1 (1: no local chunks)", w.chunks)
    if cfg.comm.overlap and (w.activations != "full" or w.chunks > 1):
        raise ConfigError(f"comm.overlap runs with {prefix}activations=full and {prefix}chunks=1 only (the carried "
                          "factors of a round in flight are not built for the other options)")
    if w.chunks > 1 and cfg.train.compile:
        raise ConfigError(f"{prefix}chunks={w.chunks} cannot run with train.compile=true: a chunked round runs "
                          "a different part of the model for each chunk; compile is for whole-model steps")


def _validate_worker(cfg: Config) -> None:
    w = cfg.worker
    _check_worker_options(w, cfg, "worker.")
    lte_heads = cfg.mode in ("lte", "ps")
    if not lte_heads and (w.activations != WorkerCfg.activations or w.chunks != 1):
        raise ConfigError(f"worker.activations and worker.chunks apply to LTE heads (mode=lte or ps); "
                          f"mode={cfg.mode} trains full-rank")
    if w.per_rank and cfg.mode != "ps":
        raise ConfigError(f"worker.per_rank sets options per worker process of mode=ps; mode={cfg.mode} has none")
    normalized = {}
    for rank, overrides in w.per_rank.items():
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
            why = (" (every worker holds worker.heads heads)" if unknown[0] == "heads" else "")
            raise ConfigError(f"{key} cannot set {unknown[0]!r}{why}; it takes {list(PER_RANK_KEYS)}")
        hints = typing.get_type_hints(WorkerCfg)
        coerced = {k: _coerce(hints[k], v, f"{key}.{k}") for k, v in overrides.items()}
        _check_worker_options(dataclasses.replace(w, **coerced), cfg, key + ".")
        normalized[str(int(rank))] = coerced
    w.per_rank = normalized  # keys as strings, whether the YAML had 3 or "3"


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
    if cfg.train.batch_size % n:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split into lte.heads={n} "
                          "equal per-head batches; make it a multiple of lte.heads")
    return dataclasses.replace(cfg, lte=dataclasses.replace(cfg.lte, heads=n),
                               worker=dataclasses.replace(cfg.worker, heads=k))
