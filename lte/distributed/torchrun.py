"""mode=ps under torchrun (or lte-train --nproc-per-node): one process group over the server's
shards (ranks 0..dist.servers-1) and the workers, whose messages travel as counted collectives.

The start is a handshake (lte.distributed.handshake): every rank reports whether it could set
itself up, rank 0 says how the run starts, and every rank makes the groups of the rounds (per
shard, the exchange with the workers and a group per base format; lte.distributed.shards). A
round's uploads are a gather on each shard, its downloads a broadcast to each base format's group.
The workers' state reaches the server's checkpoints through a checkpoint upload and goes back to
them on a restart; with several shards each writes its own tensors (torch.distributed.checkpoint)
and rank 0's checkpoint file commits them. A worker with comm.overlap runs each round's exchange
in a background thread during the next round (lte.core.overlap).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from .. import core
from ..errors import UserError
from ..runtime.config import Config
from .comm import Exchange
from .env import DistEnv
from .handshake import DIGEST, HELLO, Control, hello
from .protocol import format_groups
from .server import Closing, ParameterServer, Progress, Uploads
from .shards import agree, load_shard, make_channels, save_shard, scatter_master
from .worker import Route, Worker


class TorchrunServer(ParameterServer):
    """Rank `env.rank` of the server: a shard of dist.servers (with one, the whole master).
    `exchange` is the default group's; a round runs over this shard's `toward` exchange."""

    def __init__(self, cfg: Config, env: DistEnv, exchange: Exchange):
        self.env, self.exchange = env, exchange
        self.error: UserError | None = None
        try:
            super().__init__(cfg, env.device, env.world - env.servers, backend=env.backend, shard=env.rank,
                             servers=env.servers)
        except UserError as exc:  # told to every rank in the handshake, then raised
            self.error = exc

    def run(self) -> dict | None:
        try:
            control = self.handshake()  # raises if this server or a worker could not set up
            if control.finished:  # the run directory has said so
                return self.start.finished
            summary = self.train(control.step, control.merges, control.resume)
            return summary if self.is_main else None
        finally:
            self.rundir.unlock()

    # start-up ----------------------------------------------------------------------------
    def handshake(self) -> Control:
        """Rank 0 hears from every other rank (the other shards, the workers) and says how the run
        starts; then every rank makes the groups of the rounds."""
        if not self.is_main:
            control = hello(self.exchange, self.error, 0, f"server rank {self.shard}")
        else:
            control = self.decide_start()
        if not control.finished:  # every rank makes the same groups at the same point
            channels = make_channels(self.exchange, self.servers, self.workers, self.format_members)
            self.toward, self.groups = channels.exchanges[self.shard], channels.format_groups[self.shard]
            self.shard_group = channels.servers
            if self.init_from_main:  # the other shards' init, from shard 0's whole model
                scatter_master(self.whole_init if self.is_main else self.master, self.specs, self.shard,
                               self.shard_group)
                self.whole_init = None
            download = self.cfg.comm.download_strategy()  # per format: the download sequence its workers hold
            self.streams = [download.stream(self.protos[m[0]].download.nbytes, self.protos[m[0]].download_values)
                            for m in self.by_format]
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

    # the transport -------------------------------------------------------------------------
    def open(self, progress: Progress) -> None:
        self.send(self.last_download, "the initial base download")

    def collect(self, progress: Progress) -> Uploads:
        if self.cfg.dist.sync_phases:  # wait out the workers' compute so upload_s is the transfer alone
            self.toward.barrier("the pre-upload barrier")
        t0 = time.perf_counter()
        bufs = self.toward.gather(None, [p.upload.nbytes for p in self.protos],
                                  f"the upload of round {progress.merges + 1}")
        seconds = time.perf_counter() - t0
        return self.uploads([p.upload.unpack(buf) for p, buf in zip(self.protos, bufs)], seconds)

    def deliver(self, uploads: Uploads, progress: Progress) -> None:
        self.send(self.last_download, f"the download of round {progress.merges}")

    def held_download(self, w: int) -> torch.Tensor:
        return self.streams[self.format_of(w)].holds(super().held_download(w))

    def send(self, downloads: list[torch.Tensor], what: str) -> None:
        """Each format's download to the workers that store it, through its download stream."""
        for buf, group, stream in zip(downloads, self.groups, self.streams):
            payload = stream.encode(buf)
            (self.toward.broadcast_sized if stream.sized else self.toward.broadcast)(payload, what, group=group)

    # checkpoints and the end -------------------------------------------------------------
    def resume(self, progress: Progress) -> None:
        """This shard's part of the checkpoint (with several shards, its own file: the master, the
        outer momenta, counters), then each worker's state back to it."""
        if self.servers == 1:
            state = self.start.state
            self.exchange.add(state["comm"])
            workers = [p.state.pack(w) for p, w in zip(self.protos, state["workers"])]
            for stream, held in zip(self.streams, state.get("downloads", [])):  # lossy downloads: the workers' copy
                stream.load_state_dict(held)
        else:
            saved = load_shard(self.rundir.shard_path(progress.step), self.shard_tensors(), self.shard,
                               self.shard_group)
            with torch.no_grad():
                for name, t in self.master.items():
                    t.copy_(saved[f"master.{name}"])
            if self.outer.active:
                self.outer.momenta = {n: saved[f"outer.{n}"].to(self.device) for n in self.outer_shapes()}
            self.exchange.add(saved["comm"])
            workers = [saved[f"worker{w}"] for w in range(self.workers)]
            for i, stream in enumerate(self.streams):
                if f"download{i}" in saved:
                    stream.load_state_dict({"previous": saved[f"download{i}"]})
        self.toward.scatter(workers, [p.state.nbytes for p in self.protos], "the checkpoint restore", checkpoint=True)

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
        if self.cfg.comm.download_strategy().lossy:  # what the workers of each format hold
            for i, (stream, members) in enumerate(zip(self.streams, self.by_format)):
                out[f"download{i}"] = (stream.holds(None) if states is not None
                                       else self.protos[members[0]].download.empty())
        return out

    def checkpoint_parts(self, progress: Progress, final: bool) -> dict:
        """The workers' state (gathered now) and the byte counters just before it was sent; with
        several shards every shard writes them to its own file and rank 0's checkpoint names them."""
        what = "the final checkpoint upload" if final else f"the checkpoint upload of round {progress.merges}"
        snapshot = self.exchange.snapshot()  # taken before the state upload, as the workers take theirs
        states = self.toward.gather(None, [p.state.nbytes for p in self.protos], what, checkpoint=True)
        if self.servers > 1:
            save_shard(self.rundir.shard_path(progress.step), self.shard_tensors(snapshot, states), self.shard,
                       self.shard_group)
            dist.barrier(group=self.shard_group)
            return {"servers": self.servers}
        workers = [{n: t.clone() for n, t in p.state.unpack(b).items()} for p, b in zip(self.protos, states)]
        downloads = ([s.state_dict() for s in self.streams] if self.cfg.comm.download_strategy().lossy else [])
        return {"comm": snapshot, "workers": workers, **({"downloads": downloads} if downloads else {})}

    def close(self, progress: Progress) -> Closing:
        mismatched = self.check_bases()
        parts = self.checkpoint_parts(progress, final=True)
        return Closing(mismatched, self.exchange.counters(), parts)

    def check_bases(self) -> list[int]:
        """Worker ranks whose final base differs from the server's last encoding in their format."""
        digests = [int(DIGEST.unpack(b)["digest"][0])
                   for b in self.toward.gather(None, DIGEST.nbytes, "the final base check")]
        match = agree(torch.tensor([int(d == self.expected_digest(w)) for w, d in enumerate(digests)]),
                      self.shard_group)
        return [w + 1 for w, ok in enumerate(match) if not ok]


class TorchrunWorker(Worker):
    """A worker rank of the process group: the handshake, then round after round with the server's
    shards, checkpoints included."""

    def __init__(self, cfg: Config, env: DistEnv, exchange: Exchange):
        super().__init__(cfg, env)
        self.exchange = exchange
        # comm.overlap: one thread runs a round's exchange while the next round computes
        self.background = ThreadPoolExecutor(1, "lte-overlap") if cfg.comm.overlap else None
        self.in_flight = None

    def hello(self) -> Control:
        size = (sum(protos[self.index].upload.nbytes for protos in self.shard_protos) if self.error is None else 0)
        control = hello(self.exchange, self.error, size, f"worker rank {self.env.worker}")
        if not control.finished:  # the server makes the same groups at the same point
            formats, members = format_groups(self.protos)
            channels = make_channels(self.exchange, self.env.servers, len(self.protos), members)
            mine = formats.index(self.proto.fmt.name)
            self.routes = [Route(ex, groups[mine], protos) for ex, groups, protos
                           in zip(channels.exchanges, channels.format_groups, self.shard_protos)]
        return control

    def run(self) -> None:
        control = self.hello()
        if control.finished:
            return  # the run in out_dir is done; the server says so
        self.begin(control)
        rounds = control.merges
        while self.engine.step < self.cfg.train.steps:
            rounds += 1
            loss, compute_s = self.train_round()
            if self.cfg.comm.overlap:
                self.overlapped(rounds, loss, compute_s)
            else:
                self.upload(rounds, loss, compute_s)
                self.start_next_round(self.receive_base(f"the download of round {rounds}"))
            if self.clock.checkpoints(self.engine.step):
                self.upload_state()
        self.send_digests()
        self.upload_state()  # for the final checkpoint, which a longer run continues from
        self.exchange.counters()

    def begin(self, control: Control) -> None:
        """The state of a resumed run, then the server's base (and replicas to start from)."""
        engine = self.engine
        if control.resume:
            self.load_state([ex.scatter(None, [p.state.nbytes for p in protos], "the checkpoint restore",
                                        checkpoint=True) for ex, _, protos in self.routes], control.step)
            core.set_merges_done(engine.model, control.merges)
        self.receive_base("the initial base download")
        if not control.resume:
            core.reset_heads(engine.model)  # replica copies start from the server's values
        engine.model.train()

    def overlapped(self, rounds: int, loss: float, compute_s: float) -> None:
        """The end of a round under comm.overlap (lte.core.overlap): this round's upload goes out, its
        heads carry it, the previous round's download is installed, and this round's exchange runs in
        the background during the next round; a round that settles (the clock's) waits for its own
        download instead and carries nothing."""
        earlier = self.in_flight.result() if self.in_flight is not None else None  # raises its PeerError
        self.in_flight = None
        accepted = earlier is None or self.accepted(earlier)
        bufs = self.encode_uploads(rounds, loss, compute_s)

        def exchange() -> list[torch.Tensor]:
            self.send_uploads(bufs, rounds)
            return self.receive_downloads(f"the download of round {rounds}")

        if self.clock.settles(self.engine.step):
            latest = exchange()
            self.carry.drop(self.engine.model)
            self.start_next_round(self.install_base(latest) and accepted)
            return
        self.carry.take(self.engine.model)
        if earlier is not None:
            self.install_base(earlier)
        self.start_next_round(accepted)
        self.in_flight = self.background.submit(exchange)

    # checkpoints -------------------------------------------------------------------------
    def upload_state(self) -> None:
        """This worker's state to each shard (its layers' part), for the server's checkpoint."""
        opt, heads = self.engine.optimizer, self.head_tensors()
        tensors = {**heads, **self.proto.optimizer_state(opt, heads), **core.option_state(self.engine.model)}
        if self.proto.codec.lossy:
            residuals = self.uploader.residuals
            tensors.update({f"{k}.residual": residuals.get(k, torch.zeros_like(heads[k])) for k in self.proto.uploaded})
        tensors["rng"] = torch.get_rng_state()
        tensors["comm"] = self.exchange.snapshot()
        for ex, _, protos in self.routes:  # each shard keeps its layers' part
            ex.gather(protos[self.index].state.pack(tensors), [p.state.nbytes for p in protos],
                      "the checkpoint upload", checkpoint=True)

    @torch.no_grad()
    def load_state(self, bufs: list[torch.Tensor], step: int) -> None:
        """The state each shard kept (its layers' part; the RNG and counters are in every part)."""
        views = {}
        for (_, _, protos), buf in zip(self.routes, bufs):
            views.update(protos[self.index].state.unpack(buf))
        heads = self.head_tensors()
        for k, t in {**heads, **core.option_state(self.engine.model)}.items():
            t.copy_(views[k])
        self.proto.load_optimizer_state(self.engine.optimizer, heads, views)
        if self.proto.codec.lossy:
            self.uploader.load_state_dict({k: views[f"{k}.residual"].clone() for k in self.proto.uploaded},
                                          self.env.device)
        torch.set_rng_state(views["rng"].clone())
        self.exchange.add(views["comm"])
        self.engine.seek(step)
