"""The parameter server's core: everything a server does, whatever carries its messages.

A server holds the fp32 master (the parameters of a plain instance of the user's model, so
evaluating and exporting the master is just using that model), merges the workers' heads into it,
encodes the base for them, and logs, evaluates, checkpoints and summarises the run; it never
trains. A round (ParameterServer.round) is named steps: collect (every worker's upload; a worker
whose upload is not finite is left out), merge (W += (s/N) sum_n B_n A_n over the heads kept, one
matmul per layer, the function the simulated trainer uses; replicas averaged), encode (the base
re-quantized once per format the workers store), deliver, log_round, and the checkpoint the round
clock asks for; the loop's state is one Progress object. Workers may differ (worker.per_rank): the
merge takes every head's A and B the same way however its worker trained (a LoRA-FA worker's A is
re-drawn here), and each worker gets the base in its own format.

What a transport supplies, and nothing else (lte.distributed.torchrun: one process group of server
shards and workers, collectives; lte.distributed.elastic: a link per worker, workers that come and
go): how uploads arrive (`collect`), how downloads leave (`deliver`), how the first round opens
(`open`), what its checkpoints add and restore (`checkpoint_parts`, `resume`) and how the run
closes (`close`: every worker's final base checked, the last checkpoint's parts, the byte counts).
The server holds the run directory (lte.runtime.rundir) and ends the run as every mode does
(lte.runtime.finish).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from .. import core
from ..core.algebra import key
from ..data import build_data
from ..core.robust import Record
from ..runtime.clock import RoundClock
from ..runtime.config import Config
from ..runtime.engine import eval_batches, evaluate
from ..runtime.finish import Totals, finish_run, summary
from ..runtime.log import RunLog, Throughput, peak_memory, say
from ..runtime.model import buffers_to, build_model, init_tensors, load_model_state
from ..runtime.rundir import RunDir, Start
from .comm import bytes_per_step
from .protocol import STATS, format_groups, worker_protocols
from .shards import agree, export_master, materialized, shard_peaks, shard_specs

PHASES = ("compute_s", "upload_s", "merge_s", "download_s")


@dataclass
class Progress:
    """The server loop's state: where the run is, and what its checkpoints and summary report."""

    step: int
    merges: int
    totals: Totals
    rejected: int = 0             # heads whose update was not finite, over the whole run
    last_eval: dict = field(default_factory=dict)
    phases: dict = field(default_factory=lambda: {"rounds_timed": 0, **dict.fromkeys(PHASES, 0.0)})
    round_end: float = 0.0        # when the previous round's download finished

    @classmethod
    def resumed(cls, state: dict, step: int, merges: int) -> Progress:
        progress = cls(step, merges, Totals.resumed(state), state.get("rejected_heads", 0), state.get("last_eval", {}))
        progress.phases.update(state.get("phases", {}))
        return progress

    def advance(self, steps: int) -> None:
        self.step, self.merges = self.step + steps, self.merges + 1

    def add_times(self, times: dict) -> None:
        for name in PHASES:
            self.phases[name] += times[name]
        self.phases["rounds_timed"] += 1

    def round_time(self) -> dict:
        return {n: self.phases[n] / max(self.phases["rounds_timed"], 1) for n in PHASES}

    def state(self) -> dict:
        return {"merges": self.merges, "rejected_heads": self.rejected, "totals": self.totals.state(),
                "phases": dict(self.phases), "last_eval": self.last_eval}


@dataclass
class Uploads:
    """One round's uploads, unpacked: every worker's tensors and whether its update was finite."""

    views: list[dict[str, torch.Tensor] | None]  # None: nothing arrived from that worker (an elastic run)
    accepted: torch.Tensor   # 1 per worker whose factors arrived and are all finite
    seconds: float           # how long they took to arrive
    # uploads one round late, merged into this merge (elastic, dist.late=stale): (worker, view, the
    # merge count of the base it trained on), its replicas already as values against this master
    stale: list[tuple[int, dict[str, torch.Tensor], int]] = field(default_factory=list)


@dataclass
class Closing:
    """How a transport closed the run: the worker ranks whose final base differs from the server's,
    every rank's byte counters, the last checkpoint's parts and what the summary adds."""

    mismatched: list[int]
    per_rank: list[dict] | None
    parts: dict
    summary: dict = field(default_factory=dict)


class ParameterServer(ABC):
    """Shard `shard` of a server of `servers` ranks (lte.distributed.shards) for `workers` workers;
    with one shard, the whole master. Only shard 0 keeps the run directory, logs and evaluates."""

    def __init__(self, cfg: Config, device: torch.device, workers: int, *, backend: str, shard: int = 0,
                 servers: int = 1):
        self.cfg, self.device, self.workers, self.backend = cfg, device, workers, backend
        self.shard, self.servers, self.is_main = shard, servers, shard == 0
        self.clock = RoundClock.of(cfg)
        self.rundir, self.start, self.log = RunDir(cfg), Start(), None
        self.shard_group = None  # the group of the shards, with several (a transport makes it)
        if self.is_main:  # the run directory's keeper
            self.start = self.rundir.open(say=say)
            if self.start.finished is not None:
                return  # nothing to build: the run in out_dir is done
        self.data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
        # one server holds the whole model; several hold it on the meta device, each with its own
        # master tensors (lte.distributed.shards), and evaluate it together
        self.model = (build_model(cfg, self.data, device) if servers == 1 else
                      buffers_to(build_model(cfg, self.data, None), device))
        self.eval_set = eval_batches(cfg, self.data, device) if self.is_main or servers > 1 else None
        lm = self.data.task == "language_model"  # its rounds' rows give tokens/s too
        self.speed = Throughput(device, getattr(self.data.train, "block_size", 0) if lm else 0)
        spec, _ = core.plan(self.model, cfg.lte_config())  # what a merge touches (no memory options)
        sd = self.model.state_dict(keep_vars=True)
        shapes = {k: tuple(sd[k].shape) for k in spec.master_keys()}
        self.specs = shard_specs(spec, shapes, servers)
        # shard 0's whole initial state where the other shards' init must come from it (scatter_master)
        self.init_from_main, self.whole_init = False, None
        self.master = self.own_master(sd)
        self.all_protos = [worker_protocols(cfg, s, shapes, workers) for s in self.specs]
        self.protos = self.all_protos[shard]
        self.format_members = format_groups(self.protos)[1]  # worker numbers (1..) storing each base format
        self.by_format = [[r - 1 for r in m] for m in self.format_members]  # worker indices, the same
        self.outer = cfg.outer_optimizer()  # the merges' outer step (kind none: the plain merge)
        self.robust, self.outliers = cfg.dist.robust_rule(), Record(workers)  # outlier heads, per worker
        if self.start.state is not None:
            self.outliers.load_state_dict(self.start.state.get("outliers"))
        if self.start.state is not None and servers == 1:  # several shards keep these in their own files
            load_model_state(self.model, self.start.state["master"], self.start.path)
            self.outer.load_state_dict(self.start.state.get("outer"), device)

    def own_master(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This shard's master tensors: with one server, views into its model (merging updates it);
        with several, each drawn alone where the model's init is per tensor, or else shard 0's from a
        whole model it builds, the others' empty until shard 0 sends them (scatter_master)."""
        own = self.specs[self.shard].master_keys()
        if self.servers == 1:
            return {k: sd[k] for k in own}
        mine = init_tensors(self.model, own, self.cfg.seed, self.device)
        if mine is not None:
            return mine
        self.init_from_main = True
        if not self.is_main:
            return {k: torch.empty(sd[k].shape, dtype=sd[k].dtype, device=self.device) for k in own}
        self.whole_init = build_model(self.cfg, self.data, self.device).state_dict()  # dropped once sent
        return {k: self.whole_init[k] for k in own}

    # what a transport supplies -----------------------------------------------------------
    @abstractmethod
    def collect(self, progress: Progress) -> Uploads:
        """This round's uploads, as they arrive (self.uploads makes them Uploads)."""

    @abstractmethod
    def deliver(self, uploads: Uploads, progress: Progress) -> None:
        """Send the round's downloads (self.last_download) to the workers it answers."""

    @abstractmethod
    def open(self, progress: Progress) -> None:
        """Start the first round of this attempt (its base is self.last_download)."""

    @abstractmethod
    def resume(self, progress: Progress) -> None:
        """Restore what this transport's checkpoints added (a run that resumes)."""

    @abstractmethod
    def checkpoint_parts(self, progress: Progress, final: bool) -> dict:
        """What a checkpoint of this transport adds to the server's state (and writes elsewhere)."""

    @abstractmethod
    def close(self, progress: Progress) -> Closing:
        """End the run with the workers: check their final bases, collect the last checkpoint's parts
        and the byte counters."""

    # the loop ----------------------------------------------------------------------------
    def train(self, step: int, merges: int, resume: bool) -> dict | None:
        """The run from `step` (after `merges` merges) to train.steps; its summary on shard 0."""
        progress = self.begin(step, merges, resume)
        while progress.step < self.cfg.train.steps:
            self.round(progress)
        return self.finish(progress)

    def begin(self, step: int, merges: int, resume: bool) -> Progress:
        """Restore a resumed run, say what runs, open the first round."""
        state = self.start.state or {}
        progress = Progress.resumed(state, step, merges)
        if state:
            torch.set_rng_state(state["rng"])
        if resume:
            self.resume(progress)
        self.last_download = self.encode(torch.ones(self.workers, dtype=torch.int64))
        if self.is_main:
            self.log = RunLog.for_run(self.cfg, self.rundir.path, start=step)
            if resume:
                self.log.say(f"resumed from {self.start.path} at step {step}")
            self.log.say(self.describe())
        self.open(progress)
        progress.round_end = time.perf_counter()
        return progress

    def round(self, progress: Progress) -> None:
        """One round: collect the uploads, merge, encode and deliver, then log, evaluate, checkpoint."""
        steps = self.clock.round_steps(progress.step)
        uploads = self.collect(progress)
        t1 = time.perf_counter()
        self.merge(uploads, progress)
        self.last_download = self.encode(uploads.accepted)
        t2 = time.perf_counter()
        progress.advance(steps)
        self.deliver(uploads, progress)
        t3 = time.perf_counter()
        if self.clock.evaluates(progress.step):
            progress.last_eval = self.evaluate()
        if self.is_main:
            self.log_round(progress, uploads, {"upload_s": uploads.seconds, "merge_s": t2 - t1, "download_s": t3 - t2},
                           steps, t3)
        if self.clock.checkpoints(progress.step):  # the last step's comes with the summary
            self.save_checkpoint(progress, self.checkpoint_parts(progress, final=False))
        progress.round_end = time.perf_counter()

    def uploads(self, views: list[dict[str, torch.Tensor] | None], seconds: float) -> Uploads:
        """Uploads of what arrived: every worker whose upload came and is finite is accepted (by every shard)."""
        finite = [int(v is not None and p.finite(v)) for p, v in zip(self.protos, views)]
        return Uploads(views, agree(torch.tensor(finite), self.shard_group), seconds)

    def merge(self, uploads: Uploads, progress: Progress) -> None:
        """W += (s/N) sum B A over the accepted workers' heads (the same merge as simulated heads)."""
        k, protos = self.cfg.worker.heads, self.protos
        entries = [(w, uploads.views[w], progress.merges) for w, ok in enumerate(uploads.accepted) if ok]
        entries += uploads.stale
        kept = [protos[w].factors(view, self.master, seed=self.cfg.seed, first_head=w * k, draw=draw)
                for w, view, draw in entries]
        if kept:
            heads = {n: torch.cat([v[n] for v in kept]).to(self.device) for n in protos[0].heads}
            outcome = core.merge_into(self.master, heads, protos[0].spec, outer=self.outer, robust=self.robust)
            self.note_outliers(outcome, [w for w, _, _ in entries for _ in range(k)], progress)
        bad = [w + 1 for w, (v, ok) in enumerate(zip(uploads.views, uploads.accepted)) if v is not None and not ok]
        if bad:
            progress.rejected += k * len(bad)
            if self.log:
                self.log.say(f"round {progress.merges + 1}: rejected the non-finite update of worker rank(s) "
                             f"{bad}; their heads restart")

    def note_outliers(self, outcome, units: list[int], progress: Progress) -> None:
        """Count (and name in the log) the workers whose heads the robust rule clipped or dropped."""
        for line in self.outliers.note(outcome, units, progress.merges + 1, self.robust.name, "worker rank(s)",
                                       label=lambda w: w + 1):
            if self.log:
                self.log.say(line)

    def encode(self, accepted: torch.Tensor) -> list[torch.Tensor]:
        """The download, encoded once per base format the workers store."""
        return [self.protos[members[0]].encode_base(self.master, accepted) for members in self.by_format]

    def evaluate(self) -> dict | None:
        """The master's metrics (None on shards other than 0): several shards evaluate together, each
        module's tensors brought from the shard that owns them as it runs (shards.materialized)."""
        args = (self.model, self.eval_set, self.data.task, self.device, self.cfg.train.precision)
        if self.servers == 1:
            return evaluate(*args)
        with materialized(self.model, self.master, self.specs, self.shard, self.shard_group):
            metrics = evaluate(*args)
        return metrics if self.is_main else None

    def log_round(self, progress: Progress, uploads: Uploads, times: dict, steps: int, now: float) -> None:
        """The round's row (loss and compute time as the accepted workers report them), with the
        evaluation the clock asks for."""
        views = [v for v, ok in zip(uploads.views, uploads.accepted) if ok]
        stats = (torch.stack([v["stats"][:len(STATS)] for v in views]) if views
                 else torch.full((1, len(STATS)), float("nan")))
        times = {"compute_s": stats[:, 1].mean().item(), **times}
        progress.add_times(times)
        rate = steps * self.cfg.train.batch_size / max(now - progress.round_end, 1e-9)
        row = {"loss": stats[:, 0].mean().item(), "merges": progress.merges, "rejected_heads": progress.rejected,
               **self.speed.rates(rate), **{f"round_{n}": times[n] for n in PHASES}}
        chunk_losses = {str(w + 1): v["stats"][len(STATS):].tolist()  # local chunks: each chunk's mean loss
                        for w, (p, v, ok) in enumerate(zip(self.protos, uploads.views, uploads.accepted))
                        if p.chunks > 1 and ok}
        if chunk_losses:
            row["chunk_losses"] = chunk_losses
        if self.clock.evaluates(progress.step):
            row.update({f"eval_{n}": v for n, v in progress.last_eval.items()})
        logged = self.clock.logs(progress.step, since=progress.step - steps)
        if logged:
            self.log.log(progress.step, row)
        self.log.progress(progress.step, row if logged else {})

    # checkpoints and the end -------------------------------------------------------------
    def run_state(self, progress: Progress) -> dict:
        """What a checkpoint keeps of the server itself: the loop's state and, with one shard, the
        master and its outer step (several shards write theirs with torch.distributed.checkpoint)."""
        state = {**progress.state(), "rng": torch.get_rng_state(), "outliers": self.outliers.state_dict()}
        if self.servers == 1:
            state.update(master=self.model.state_dict(), outer=self.outer.state_dict())
        return state

    def save_checkpoint(self, progress: Progress, parts: dict, **marks) -> None:
        """Shard 0 writes the checkpoint of this step: the server's state, the transport's parts, `marks`."""
        if self.is_main:
            self.rundir.save_checkpoint({**self.run_state(progress), **parts, **marks}, progress.step)

    def finish(self, progress: Progress) -> dict | None:
        closing = self.close(progress)
        weights = self.final_weights()
        peaks = shard_peaks(peak_memory(self.device)["peak_memory_bytes"], self.shard_group)  # after the export
        if not self.is_main:
            return None
        if closing.mismatched:
            self.log.say(f"error: worker rank(s) {closing.mismatched} ended with a base that differs from the server's")
        result = {**self.summarize(progress, closing.per_rank, closing.mismatched), **closing.summary,
                  **({"server_peak_memory_bytes": peaks} if self.servers > 1 else {})}
        return finish_run(self.rundir, self.log, result, weights, self.model, self.data,
                          lambda marks: self.save_checkpoint(progress, closing.parts, **marks))

    def final_weights(self) -> dict | None:
        """One server: its model's state, for the results. Several: the shards stream it into shard 0's
        final.safetensors now, a tensor at a time (None: written)."""
        if self.servers == 1:
            return self.model.state_dict()
        write = self.rundir.write_weights if self.is_main else None
        export_master(self.model, self.master, self.specs, self.shard, self.shard_group, write)
        return None

    def format_of(self, w: int) -> int:
        """The index of worker w's base format (in self.by_format, self.last_download)."""
        return next(i for i, members in enumerate(self.by_format) if w in members)

    def held_download(self, w: int) -> torch.Tensor:
        """The download buffer worker w holds: the last one of its format (a transport whose download
        stream is lossy answers with the stream's copy of what the worker holds)."""
        return self.last_download[self.format_of(w)]

    def expected_digest(self, w: int) -> int:
        """The digest of the base worker w should hold."""
        p = self.protos[w]
        return p.base_digest(p.download.unpack(self.held_download(w)))

    def upload_nbytes(self, w: int) -> int:
        """Worker w's upload of a round, to all the shards together."""
        return sum(protos[w].upload.nbytes for protos in self.all_protos)

    def download_nbytes(self, w: int) -> int:
        return sum(protos[w].download.nbytes for protos in self.all_protos)

    def summarize(self, progress: Progress, per_rank: list[dict], mismatched: list[int]) -> dict:
        cfg, step, workers = self.cfg, progress.step, range(self.workers)
        up, down = [self.upload_nbytes(w) for w in workers], [self.download_nbytes(w) for w in workers]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return {
            **summary(cfg, steps=step, merges=progress.merges, last_eval=progress.last_eval, totals=progress.totals,
                      device=self.device, seconds=progress.totals.wall_s()),
            "heads": cfg.lte.heads, "workers": self.workers,
            "worker_heads": cfg.worker.heads, "base_dtype": cfg.worker.base_dtype,
            "worker_options": [self.worker_summary(w) for w in workers],
            "rejected_heads": progress.rejected, "base_check": "mismatch" if mismatched else "match",
            **(self.outliers.totals() if self.robust.active else {}),
            "round_time": progress.round_time(),
            "comm": {"per_rank": per_rank, "servers": self.servers,
                     "bytes_per_step_per_worker": bytes_per_step([r for r in per_rank if r["rank"] >= self.servers],
                                                                 step),
                     # per worker, averaged over the workers (they differ when worker.per_rank mixes options)
                     "upload_bytes_per_round": mean(up), "download_bytes_per_round": mean(down),
                     # per step once started: without the start-up handshake and first base download
                     "steady_bytes_per_step_per_worker": (mean([u + d for u, d in zip(up, down)])
                                                          / self.clock.mean_round())},
        }

    def worker_summary(self, w: int) -> dict:
        o = self.cfg.worker_options(w + 1)
        return {"rank": w + 1, "base_dtype": o.base_dtype, "activations": o.activation_option().describe(),
                "chunks": o.chunks, "upload_bytes_per_round": self.upload_nbytes(w),
                "download_bytes_per_round": self.download_nbytes(w), **self.outliers.row(w)}

    def describe(self) -> str:
        cfg = self.cfg
        workers = [f"rank {w + 1}: {cfg.worker_options(w + 1).describe(base=True)}, upload {self.upload_nbytes(w):,} B "
                   f"and download {self.download_nbytes(w):,} B per round" for w in range(self.workers)]
        options = "".join(f", {d}" for d in (self.outer.describe(), self.protos[0].codec.describe(),
                                             cfg.comm.describe(), self.robust.describe()) if d)
        shards = f" in {self.servers} shards" if self.servers > 1 else ""
        return (f"parameter server{shards} on {self.device} ({self.backend}), {self.workers} workers x "
                f"{cfg.worker.heads} heads = {cfg.lte.heads} heads of rank {cfg.lte.rank}, "
                f"{self.clock.describe_rounds}{options}; {cfg.model.name} on {cfg.data.name}, "
                f"batch {cfg.train.batch_size}, {cfg.train.steps} steps; " + "; ".join(workers))

    def outer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each outer momentum of this shard (a layer's out x in matrix)."""
        spec = self.specs[self.shard]
        shapes = {key(x, "weight"): spec.matrix_shape(x, tuple(self.master[key(x, "weight")].shape))
                  for x in spec.layers}
        return {**shapes, **{n: tuple(self.master[n].shape) for n in spec.replicas}}
