"""A parameter-server worker's core: k local heads against a base in its worker.base_dtype, whatever
carries its messages.

It trains its heads for a round of lte.merge_every steps on its own batch streams (step by step,
or chunk by chunk with worker.chunks > 1), uploads the factors, and installs what the server sends
back: the re-quantized base, the merged replicas and, when the server did not merge its update,
the order to restart its heads. Its options are worker.* with its worker.per_rank overrides.

It talks to each server shard over a Route: something with the worker's side of an Exchange
(gather: send to the server; broadcast, broadcast_sized: receive from it), the group of its base
format, and the messages of that shard. The transports (lte.distributed.torchrun, elastic) make
the routes and run the loop.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch

from .. import core, faults
from ..core.algebra import key
from ..core.upload import Uploader
from ..data import build_data
from ..errors import UserError
from ..memory import check_runs_on
from ..runtime.clock import RoundClock
from ..runtime.config import Config
from ..runtime.engine import Engine
from .env import DistEnv
from .handshake import DIGEST
from .protocol import Protocol, worker_protocols
from .shards import shard_specs


def master_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the merged tensors as the server holds them (original model shapes)."""
    spec, sd = core.state_of(model).spec, model.state_dict()
    shapes = {name: tuple(sd[name].shape) for name in spec.replicas}
    for path, layer in core.lte_layers(model):
        shapes[key(path, "weight")] = tuple(layer.export_shape)
    return shapes


class Route(NamedTuple):
    """The way to one server shard: its exchange (or link), the group of this worker's base format,
    and every worker's messages with that shard."""

    exchange: object
    group: object
    protos: list[Protocol]


class Worker:
    """What every ps worker does. `self.routes` (one per server shard) is the transport's to set."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.index = env.worker - 1                       # worker index (rank - dist.servers)
        self.options = cfg.worker_options(env.worker)
        k, n = cfg.worker.heads, cfg.lte.heads
        self.heads = range(self.index * k, (self.index + 1) * k)  # global head indices
        self.error: UserError | None = None
        self.clock = RoundClock.of(cfg)
        self.routes: list[Route] = []
        try:
            heads_cfg = cfg.lte_config(env.worker)
            check_runs_on(heads_cfg.base_format(), env.device)
            data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
            self.engine = Engine(cfg, data, env.device, heads=self.heads, streams=self.heads,
                                 per_stream=cfg.train.batch_size // n, lte=heads_cfg, chunks=self.options.chunks,
                                 lean=True)  # the base and the replicas come from the server
        except UserError as exc:
            self.error = exc
            return
        model = self.engine.model
        # every worker's messages: sizes differ when worker.per_rank mixes options
        spec, shapes, workers = core.state_of(model).spec, master_shapes(model), env.world - env.servers
        self.protos = worker_protocols(cfg, spec, shapes, workers)
        self.proto = self.protos[self.index]
        # the same, per server shard: what goes to and comes from each (with one server, the above)
        self.shard_protos = [worker_protocols(cfg, s, shapes, workers) if env.servers > 1 else self.protos
                             for s in shard_specs(spec, shapes, env.servers)]
        self.uploader = Uploader(self.proto.codec)  # its error-feedback residuals, with comm.upload < fp32
        self.carry = core.CarriedRound()  # what the heads keep of a round in flight (empty without overlap)
        download = cfg.comm.download_strategy()  # per shard: the download sequence this worker holds
        self.streams = [download.stream(protos[self.index].download.nbytes, protos[self.index].download_values)
                        for protos in self.shard_protos]

    def head_tensors(self) -> dict[str, torch.Tensor]:
        # looked up each time: local chunks move buffers between host and device
        return core.head_state(self.engine.model)

    # the downloads -----------------------------------------------------------------------
    def receive_base(self, what: str) -> bool:
        """Install the server's base and merged replicas (each shard's part); whether this worker's
        last upload was accepted (the shards agree on it)."""
        return self.install_base(self.receive_downloads(what))

    def receive_downloads(self, what: str) -> list[torch.Tensor]:
        """Each shard's download as its layout lays it out (decoded by this worker's download stream)."""
        out = []
        for (ex, group, protos), stream in zip(self.routes, self.streams):
            payload = (ex.broadcast_sized(None, what, group=group) if stream.sized
                       else ex.broadcast(protos[self.index].download.empty(), what, group=group))
            out.append(stream.decode(payload))
        return out

    def install_base(self, downloads: list[torch.Tensor]) -> bool:
        for buf, (_, _, protos) in zip(downloads, self.routes):
            proto = protos[self.index]
            views = proto.download.unpack(buf)
            core.load_merged(self.engine.model, {path: proto.layer_payload(views, path) for path in proto.spec.layers},
                             {name: views[name] for name in proto.spec.replicas})
        return self.accepted(downloads)

    def accepted(self, downloads: list[torch.Tensor]) -> bool:
        """Whether the upload these downloads answer was merged (every shard says the same)."""
        proto = self.shard_protos[0][self.index]
        return bool(proto.download.unpack(downloads[0])["accepted"][self.index])

    # a round -----------------------------------------------------------------------------
    def train_round(self) -> tuple[float, float]:
        """A round of training: its mean loss and its compute seconds."""
        engine, t0 = self.engine, time.perf_counter()
        losses = list(engine.train_round(self.clock.round_steps(engine.step)))
        loss = torch.stack(losses).mean().item()  # waits for the device
        return loss, time.perf_counter() - t0

    def upload(self, rounds: int, loss: float, compute_s: float) -> None:
        self.send_uploads(self.encode_uploads(rounds, loss, compute_s), rounds)

    def encode_uploads(self, rounds: int, loss: float, compute_s: float) -> list[torch.Tensor]:
        """This round's upload to each shard (its layers' factors), against the base the round trained on."""
        heads, engine = self.head_tensors(), self.engine
        replicas = self.carry.references(engine.model)
        faults.before_upload(self.env.worker, rounds, {k: heads[k] for k in self.proto.uploaded}, replicas)
        chunk_losses = engine.chunks.chunk_losses if engine.chunks is not None else []
        stats = torch.tensor([loss, compute_s, *chunk_losses], dtype=torch.float64)
        return [protos[self.index].upload.pack({**protos[self.index].encode_upload(heads, replicas, self.uploader),
                                                "stats": stats})
                for _, _, protos in self.routes]

    def send_uploads(self, bufs: list[torch.Tensor], rounds: int) -> None:
        if self.cfg.dist.sync_phases:
            for ex, _, _ in self.routes:
                ex.barrier("the pre-upload barrier")
        for buf, (ex, _, protos) in zip(bufs, self.routes):
            ex.gather(buf, [p.upload.nbytes for p in protos], f"the upload of round {rounds}")

    def start_next_round(self, accepted: bool) -> None:
        """After a merge: the heads reset, or restarted if the server did not merge this worker's upload."""
        engine = self.engine
        core.finish_merge(engine.model, engine.optimizer)
        self.carry.restart(engine.model)
        if not accepted:
            self.carry.drop(engine.model)
            core.restart_heads(engine.model, list(range(len(self.heads))), engine.optimizer)
            self.uploader.residuals.clear()  # what an update that was not merged left behind

    def send_digests(self) -> None:
        """The digest of the base this worker holds, to each shard (its part), for the final check."""
        for ex, _, protos in self.routes:
            digest = protos[self.index].base_digest(protos[self.index].worker_base(self.engine.model))
            ex.gather(DIGEST.pack({"digest": torch.tensor([digest])}), DIGEST.nbytes, "the final base check")
