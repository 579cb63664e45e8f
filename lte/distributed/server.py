"""The parameter server (rank 0 of mode=ps): the fp32 master, the merge, evaluation, checkpoints and
the run's summary. It never trains.

Its master weights are the parameters of a plain instance of the user's model, so evaluating and
exporting the master is just using that model. A round (ParameterServer.round) is named steps:
collect_uploads (every worker's factors; a worker whose upload is not finite is left out), merge
(W += (s/N) sum_n B_n A_n over the heads kept, one matmul per layer, the function the simulated
trainer uses; replicas averaged), encode and send (re-quantized per format), log_round, and the
checkpoint the round clock asks for; the loop's state is one Progress object.
The server holds the run directory (lte.train.rundir): the workers' state reaches its checkpoints
through the checkpoint upload, and goes back to them on a restart. Workers may differ
(worker.per_rank): the merge takes every head's A and B the same way however its worker trained
(a LoRA-FA worker's A is re-drawn here), and the base is encoded once per format its workers
store and sent to each worker in its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import core
from ..core.merge import key
from ..data import build_data
from ..errors import UserError
from ..train.clock import RoundClock
from ..train.config import Config
from ..train.engine import build_model, eval_batches, evaluate
from ..train.log import RunLog, peak_memory, say
from ..train.rundir import RunDir, Start, load_model_state
from .comm import Exchange, bytes_per_step
from .download import DeltaStream
from .env import DistEnv
from .handshake import DIGEST, HELLO, Control, hello
from .protocol import STATS, format_groups, worker_protocols
from .shards import agree, gather_master, load_shard, make_links, save_shard, shard_specs

PHASES = ("compute_s", "upload_s", "merge_s", "download_s")


@dataclass
class Progress:
    """The server loop's state: where the run is, and what its checkpoints and summary report."""

    step: int
    merges: int
    rejected: int = 0             # heads whose update was not finite, over the whole run
    last_eval: dict = field(default_factory=dict)
    earlier: dict = field(default_factory=lambda: {"wall_s": 0.0, "attempts": 0})  # attempts before this one
    totals: dict = field(default_factory=lambda: {"rounds_timed": 0, **dict.fromkeys(PHASES, 0.0)})
    wall0: float = field(default_factory=time.perf_counter)
    round_end: float = 0.0        # when the previous round's download finished

    @classmethod
    def resumed(cls, control: Control, state: dict) -> Progress:
        earlier = state.get("totals", {"wall_s": 0.0, "attempts": 0, "rounds_timed": 0, **dict.fromkeys(PHASES, 0.0)})
        progress = cls(control.step, control.merges, state.get("rejected_heads", 0), state.get("last_eval", {}),
                       earlier={"wall_s": earlier["wall_s"], "attempts": earlier["attempts"]},
                       totals={k: v for k, v in earlier.items() if k not in ("wall_s", "attempts")})
        progress.round_end = progress.wall0
        return progress

    def wall_s(self) -> float:
        return self.earlier["wall_s"] + time.perf_counter() - self.wall0

    def running_totals(self) -> dict:
        """The totals a checkpoint keeps: phase times, and wall time and attempts so far."""
        return {**self.totals, "wall_s": self.wall_s(), "attempts": self.earlier["attempts"] + 1}


@dataclass
class Uploads:
    """One round's uploads, unpacked: every worker's tensors and whether its update was finite."""

    views: list[dict[str, torch.Tensor] | None]  # None: nothing arrived from that worker (an elastic run)
    accepted: torch.Tensor   # 1 per worker whose factors arrived and are all finite
    seconds: float           # the gather's wall time


class ParameterServer:
    """Rank `shard` of a server of dist.servers ranks (lte.distributed.shards); with one, the whole
    master. `exchange` is the default group's; a round runs over this shard's `link`."""

    def __init__(self, cfg: Config, env: DistEnv, exchange: Exchange):
        self.cfg, self.env, self.exchange = cfg, env, exchange
        self.shard, self.servers = env.rank, env.servers
        self.clock = RoundClock.of(cfg)
        self.workers = env.world - env.servers
        self.error: UserError | None = None
        self.rundir = RunDir(cfg)
        self.start = Start()
        try:
            if self.shard == 0:  # the run directory's keeper
                self.start = self.rundir.open(say=say)
                if self.start.finished is not None:
                    return  # nothing to build: the run in out_dir is done
            self.data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
            self.model = build_model(cfg, self.data, env.device)  # same seed: same init as the workers
            self.eval_set = eval_batches(cfg, self.data, env.device) if self.shard == 0 else None
            spec, _ = core.plan(self.model, cfg.lte_config())  # what a merge touches (no memory options)
            sd = self.model.state_dict(keep_vars=True)
            shapes = {k: tuple(sd[k].shape) for k in spec.master_keys()}
            self.specs = shard_specs(spec, shapes, self.servers)
            self.master = {k: sd[k] for k in self.specs[self.shard].master_keys()}  # views: merging updates the model
            self.all_protos = [worker_protocols(cfg, s, shapes, self.workers) for s in self.specs]
            self.protos = self.all_protos[self.shard]
            formats, members = format_groups(self.protos)
            self.format_members = members  # worker numbers (1..) storing each base format
            self.members = [[r - 1 for r in m] for m in members]  # worker indices storing each format
            self.outer = cfg.outer_optimizer()  # the merges' outer step (kind none: the plain merge)
            self.deltas = ([DeltaStream(self.protos[m[0]].download.nbytes) for m in self.members]
                           if cfg.comm.download == "delta" else None)  # per format: what the workers hold
            if self.start.state is not None and self.servers == 1:
                load_model_state(self.model, self.start.state["master"], self.start.path)
                self.outer.load_state_dict(self.start.state.get("outer"), env.device)
        except UserError as exc:
            self.error = exc

    # start-up ----------------------------------------------------------------------------
    def handshake(self) -> Control:
        """Rank 0 hears from every other rank (the other shards, the workers) and says how the run
        starts; then every rank makes the groups of the rounds."""
        if self.shard > 0:
            control = hello(self.exchange, self.error, 0, f"server rank {self.shard}")
        else:
            control = self.decide_start()
        if not control.finished:  # every rank makes the same groups at the same point
            self.links = make_links(self.exchange, self.servers, self.workers, self.format_members)
            self.link = self.links.exchanges[self.shard]
            self.groups = self.links.format_groups[self.shard]
        return control

    def decide_start(self) -> Control:
        statuses = self.exchange.gather(None, HELLO.nbytes, "the start-up handshake")
        problems = []
        for rank, buf in zip(self.exchange.peers, statuses):
            failed, size = (int(v) for v in HELLO.unpack(buf)["status"])
            w = rank - self.servers
            if failed:
                problems.append(f"{'server rank' if w < 0 else 'worker rank'} {rank if w < 0 else w + 1} could "
                                "not start (see its error)")
            elif w >= 0 and self.error is None and self.start.finished is None and size != self.upload_nbytes(w):
                problems.append(f"worker rank {w + 1} holds a different model (upload of {size} bytes, "
                                f"expected {self.upload_nbytes(w)}): every process must use the same config")
        state = self.start.state or {}
        control = Control(abort=bool(self.error or problems), resume=bool(state),
                          finished=self.start.finished is not None, step=state.get("step", 0),
                          merges=state.get("merges", 0))
        self.exchange.broadcast(control.pack(), "the start-up handshake")
        if self.error:
            raise self.error
        if problems:
            raise UserError("; ".join(problems))
        return control

    def upload_nbytes(self, w: int) -> int:
        """Worker w's upload of a round, to all the shards together."""
        return sum(protos[w].upload.nbytes for protos in self.all_protos)

    def download_nbytes(self, w: int) -> int:
        return sum(protos[w].download.nbytes for protos in self.all_protos)

    def encode(self, accepted: torch.Tensor) -> list[torch.Tensor]:
        """The download, encoded once per base format the workers store."""
        return [self.protos[members[0]].encode_base(self.master, accepted) for members in self.members]

    def send(self, downloads: list[torch.Tensor], what: str) -> None:
        """Each format's download to the workers that store it."""
        for i, (buf, group) in enumerate(zip(downloads, self.groups)):
            if self.deltas is None:
                self.link.broadcast(buf, what, group=group)
            else:
                self.link.broadcast_sized(self.deltas[i].encode(buf), what, group=group)

    def run(self) -> dict | None:
        try:
            control = self.handshake()  # raises if this server or a worker could not set up
            if control.finished:  # the run directory has said so
                return self.start.finished
            summary = self.train(control)
            return summary if self.shard == 0 else None
        finally:
            self.rundir.unlock()

    # the loop ----------------------------------------------------------------------------
    def train(self, control: Control) -> dict:
        progress = self.begin(control)
        while progress.step < self.cfg.train.steps:
            self.round(progress)
        return self.finish(progress)

    def begin(self, control: Control) -> Progress:
        """Restore a resumed run (the workers' state back to them), send the first base, say what runs."""
        state = self.start.state or {}
        if control.resume:
            workers = self.restore(control.step, state)
            self.link.scatter(workers, [p.state.nbytes for p in self.protos], "the checkpoint restore", checkpoint=True)
        self.last_download = self.encode(torch.ones(self.workers, dtype=torch.int64))
        self.send(self.last_download, "the initial base download")
        self.log = RunLog.for_run(self.cfg, self.rundir.path, start=control.step) if self.shard == 0 else None
        if control.resume and self.log:
            self.log.say(f"resumed from {self.start.path} at step {control.step}")
        if self.log:
            self.log.say(self.describe())
        return Progress.resumed(control, state)

    def restore(self, step: int, state: dict) -> list[torch.Tensor]:
        """This shard's part of the checkpoint of `step`: the master, the outer momenta and byte
        counters here, and each worker's state (packed) to send back."""
        if self.servers == 1:
            torch.set_rng_state(state["rng"])
            self.exchange.add(state["comm"])
            return [p.state.pack(w) for p, w in zip(self.protos, state["workers"])]
        saved = load_shard(self.rundir.shard_path(step), self.shard_tensors(), self.shard, self.links)
        with torch.no_grad():
            for name, t in self.master.items():
                t.copy_(saved[f"master.{name}"])
        if self.outer.active:
            self.outer.momenta = {n: saved[f"outer.{n}"].to(self.env.device) for n in self.outer_shapes()}
        self.exchange.add(saved["comm"])
        if self.shard == 0:
            torch.set_rng_state(state["rng"])
        return [saved[f"worker{w}"] for w in range(self.workers)]

    def outer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each outer momentum of this shard (a layer's out x in matrix)."""
        spec = self.specs[self.shard]
        shapes = {key(x, "weight"): spec.matrix_shape(x, tuple(self.master[key(x, "weight")].shape))
                  for x in spec.layers}
        return {**shapes, **{n: tuple(self.master[n].shape) for n in spec.replicas}}

    def shard_tensors(self, snapshot: torch.Tensor | None = None, states: list[torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        """What this shard writes into a sharded checkpoint: its byte counters as of `snapshot` and
        the workers' `states` (without them, a template shaped like the real thing, to load into)."""
        out = {f"master.{n}": t.detach() for n, t in self.master.items()}
        if self.outer.active:
            out.update({f"outer.{n}": self.outer.momenta.get(n, torch.zeros(shape))
                        for n, shape in self.outer_shapes().items()})
        out["comm"] = snapshot if snapshot is not None else torch.zeros_like(self.exchange.snapshot())
        for w, p in enumerate(self.protos):
            out[f"worker{w}"] = states[w] if states is not None else p.state.empty()
        return out

    def round(self, progress: Progress) -> None:
        """One round: collect the uploads, merge, encode and send, then log, evaluate, checkpoint."""
        steps = self.clock.round_steps(progress.step)
        if self.cfg.dist.sync_phases:  # wait out the workers' compute so upload_s is the transfer alone
            self.link.barrier("the pre-upload barrier")
        uploads = self.collect_uploads(progress.merges + 1)
        t1 = time.perf_counter()
        self.merge(uploads, progress)
        self.last_download = self.encode(uploads.accepted)
        t2 = time.perf_counter()
        self.send(self.last_download, f"the download of round {progress.merges + 1}")
        t3 = time.perf_counter()
        progress.step, progress.merges = progress.step + steps, progress.merges + 1
        times = {"upload_s": uploads.seconds, "merge_s": t2 - t1, "download_s": t3 - t2}
        if self.clock.evaluates(progress.step):
            gather_master(self.model.state_dict(keep_vars=True), self.specs, self.shard, self.links)
        if self.shard == 0:
            self.log_round(progress, uploads, times, steps, t3)
        if self.clock.checkpoints(progress.step):  # the last step's comes with the summary
            self.checkpoint(progress, *self.collect_state(f"the checkpoint upload of round {progress.merges}"))
        progress.round_end = time.perf_counter()

    def collect_uploads(self, round_no: int) -> Uploads:
        t0 = time.perf_counter()
        bufs = self.link.gather(None, [p.upload.nbytes for p in self.protos], f"the upload of round {round_no}")
        seconds = time.perf_counter() - t0
        views = [p.upload.unpack(buf) for p, buf in zip(self.protos, bufs)]
        accepted = agree(torch.tensor([int(p.finite(v)) for p, v in zip(self.protos, views)]), self.links)
        return Uploads(views, accepted, seconds)

    def merge(self, uploads: Uploads, progress: Progress) -> None:
        """W += (s/N) sum B A over the accepted workers' heads (the same merge as simulated heads)."""
        k, protos = self.cfg.worker.heads, self.protos
        kept = [p.factors(v, self.master, seed=self.cfg.seed, first_head=w * k, draw=progress.merges)
                for w, (p, v, ok) in enumerate(zip(protos, uploads.views, uploads.accepted)) if ok]
        if kept:
            heads = {n: torch.cat([v[n] for v in kept]).to(self.env.device) for n in protos[0].heads}
            core.merge_into(self.master, heads, protos[0].spec, outer=self.outer)
        bad = [w + 1 for w, (v, ok) in enumerate(zip(uploads.views, uploads.accepted)) if v is not None and not ok]
        if bad:
            progress.rejected += k * len(bad)
            if self.log:
                self.log.say(f"round {progress.merges + 1}: rejected the non-finite update of worker rank(s) "
                             f"{bad}; their heads restart")

    def log_round(self, progress: Progress, uploads: Uploads, times: dict, steps: int, now: float) -> None:
        """The round's row (loss and compute time as the accepted workers report them), with the
        evaluation the clock asks for."""
        views = [v for v, ok in zip(uploads.views, uploads.accepted) if ok]
        stats = (torch.stack([v["stats"][:len(STATS)] for v in views]) if views
                 else torch.full((1, len(STATS)), float("nan")))
        times = {"compute_s": stats[:, 1].mean().item(), **times}
        for name in PHASES:
            progress.totals[name] += times[name]
        progress.totals["rounds_timed"] += 1
        row = {"loss": stats[:, 0].mean().item(), "merges": progress.merges, "rejected_heads": progress.rejected,
               "samples_per_s": steps * self.cfg.train.batch_size / max(now - progress.round_end, 1e-9),
               **{f"round_{n}": times[n] for n in PHASES}}
        chunk_losses = {str(w + 1): v["stats"][len(STATS):].tolist()  # local chunks: each chunk's mean loss
                        for w, (p, v, ok) in enumerate(zip(self.protos, uploads.views, uploads.accepted))
                        if p.chunks > 1 and ok}
        if chunk_losses:
            row["chunk_losses"] = chunk_losses
        if self.clock.evaluates(progress.step):
            progress.last_eval = evaluate(self.model, self.eval_set, self.data.task, self.env.device,
                                          self.cfg.train.precision)
            row.update({f"eval_{n}": v for n, v in progress.last_eval.items()})
        logged = self.clock.logs(progress.step, since=progress.step - steps)
        if logged:
            self.log.log(progress.step, row)
        self.log.progress(progress.step, row if logged else {})

    # checkpoints and the end -------------------------------------------------------------
    def collect_state(self, what: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The workers' state for a checkpoint, and the byte counters just before it was sent."""
        snapshot = self.exchange.snapshot()  # taken before the state upload, as the workers take theirs
        return snapshot, self.link.gather(None, [p.state.nbytes for p in self.protos], what, checkpoint=True)

    def checkpoint(self, progress: Progress, snapshot: torch.Tensor, states: list[torch.Tensor], **extra) -> None:
        if self.servers > 1:  # every shard its tensors, then rank 0 the loop's state, which commits them
            save_shard(self.rundir.shard_path(progress.step), self.shard_tensors(snapshot, states), self.shard,
                       self.links)
            dist.barrier(group=self.links.servers)
            if self.shard == 0:
                state = {k: v for k, v in self.run_state(progress).items() if k not in ("master", "outer")}
                self.rundir.save_checkpoint({**state, "servers": self.servers, **extra}, progress.step)
            return
        workers = [{n: t.clone() for n, t in p.state.unpack(b).items()} for p, b in zip(self.protos, states)]
        self.rundir.save_checkpoint({**self.run_state(progress), "comm": snapshot, "workers": workers, **extra},
                                    progress.step)

    def run_state(self, progress: Progress) -> dict:
        """What a checkpoint keeps of the server itself: the master, its outer step, the loop's state."""
        return {"master": self.model.state_dict(), "merges": progress.merges, "rejected_heads": progress.rejected,
                "rng": torch.get_rng_state(), "totals": progress.running_totals(), "last_eval": progress.last_eval,
                "outer": self.outer.state_dict()}

    def format_of(self, w: int) -> int:
        """The index of worker w's base format (in self.members, self.last_download)."""
        return next(i for i, members in enumerate(self.members) if w in members)

    def expected_digest(self, w: int) -> int:
        """The digest of the base worker w should hold: the last download of its format."""
        p = self.protos[w]
        return p.base_digest(p.download.unpack(self.last_download[self.format_of(w)]))

    def check_bases(self) -> list[int]:
        """Worker ranks whose final base differs from the server's last encoding in their format."""
        digests = [int(DIGEST.unpack(b)["digest"][0])
                   for b in self.link.gather(None, DIGEST.nbytes, "the final base check")]
        match = agree(torch.tensor([int(d == self.expected_digest(w)) for w, d in enumerate(digests)]), self.links)
        return [w + 1 for w, ok in enumerate(match) if not ok]

    def finish(self, progress: Progress) -> dict | None:
        mismatched = self.check_bases()
        final_state = self.collect_state("the final checkpoint upload")
        gather_master(self.model.state_dict(keep_vars=True), self.specs, self.shard, self.links)
        per_rank = self.exchange.counters()
        if self.shard > 0:
            self.checkpoint(progress, *final_state)
            return None
        if mismatched:
            self.log.say(f"error: worker rank(s) {mismatched} ended with a base that differs from the server's")
        summary = self.summarize(progress, per_rank, mismatched)
        self.rundir.write_results(summary, self.model.state_dict(), self.model, self.data)
        self.checkpoint(progress, *final_state, finished=True, summary=summary)
        self.log.finish(summary)
        self.log.say(f"summary: eval {progress.last_eval}, {progress.merges} merges, {progress.rejected} rejected "
                     f"heads, {summary['comm']['bytes_per_step_per_worker']:,.0f} bytes per step per worker")
        return summary

    def summarize(self, progress: Progress, per_rank: list[dict], mismatched: list[int]) -> dict:
        cfg, step, workers = self.cfg, progress.step, range(self.workers)
        up, down = [self.upload_nbytes(w) for w in workers], [self.download_nbytes(w) for w in workers]
        batch, wall = cfg.train.batch_size, progress.wall_s()
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return {
            "mode": "ps", "steps": step, "samples_seen": step * batch, "merges": progress.merges,
            "eval": progress.last_eval, "wall_s": wall, "samples_per_s": step * batch / max(wall, 1e-9),
            "attempts": progress.earlier["attempts"] + 1, **peak_memory(self.env.device),
            "device": str(self.env.device), "heads": cfg.lte.heads, "workers": self.workers,
            "worker_heads": cfg.worker.heads, "base_dtype": cfg.worker.base_dtype,
            "worker_options": [self.worker_summary(w) for w in range(self.workers)],
            "rejected_heads": progress.rejected, "base_check": "mismatch" if mismatched else "match",
            "round_time": {n: progress.totals[n] / max(progress.totals["rounds_timed"], 1) for n in PHASES},
            "comm": {"per_rank": per_rank, "servers": self.servers,
                     "bytes_per_step_per_worker": bytes_per_step([r for r in per_rank if r["rank"] >= self.servers],
                                                                 step),
                     # per worker, averaged over the workers (they differ when worker.per_rank mixes options)
                     "upload_bytes_per_round": mean(up), "download_bytes_per_round": mean(down),
                     # per step once started: without the start-up handshake and first base download
                     "steady_bytes_per_step_per_worker": mean([u + d for u, d in zip(up, down)]) / cfg.lte.merge_every},
        }

    def worker_summary(self, w: int) -> dict:
        o = self.cfg.worker_options(w + 1)
        return {"rank": w + 1, "base_dtype": o.base_dtype, "activations": o.activation_option().describe(),
                "chunks": o.chunks, "upload_bytes_per_round": self.upload_nbytes(w),
                "download_bytes_per_round": self.download_nbytes(w)}

    def describe(self) -> str:
        cfg = self.cfg
        workers = [f"rank {w + 1}: {cfg.worker_options(w + 1).describe(base=True)}, upload {self.upload_nbytes(w):,} B "
                   f"and download {self.download_nbytes(w):,} B per round" for w in range(self.workers)]
        outer = "".join(f", {d}" for d in (self.outer.describe(), self.protos[0].codec.describe(), cfg.comm.describe())
                        if d)
        shards = f" in {self.servers} shards" if self.servers > 1 else ""
        return (f"parameter server{shards} on {self.env.device} ({self.env.backend}), {self.workers} workers x "
                f"{cfg.worker.heads} heads = {cfg.lte.heads} heads of rank {cfg.lte.rank}, merge every "
                f"{cfg.lte.merge_every} steps{outer}; {cfg.model.name} on {cfg.data.name}, "
                f"batch {cfg.train.batch_size}, {cfg.train.steps} steps; " + "; ".join(workers))
