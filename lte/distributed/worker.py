"""A worker of the parameter-server mode: k local heads against a base in its worker.base_dtype.

It trains its heads for a round of lte.merge_every steps on its own batch streams (step by step,
or chunk by chunk with worker.chunks > 1), uploads the factors, and installs what the server
sends back: the re-quantized base, the merged replicas and, when the server rejected its update,
the order to restart its heads. Its options are worker.* with its worker.per_rank overrides.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import core, faults
from ..core.merge import key
from ..core.upload import Uploader
from ..data import build_data
from ..errors import UserError
from ..memory import check_runs_on
from ..train.clock import RoundClock
from ..train.config import Config
from ..train.engine import Engine
from .comm import Exchange
from .download import DeltaStream
from .env import DistEnv
from .handshake import DIGEST, Control, hello
from .protocol import format_groups, worker_protocols
from .shards import make_links, shard_specs


def master_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the merged tensors as the server holds them (original model shapes)."""
    spec, sd = core.state_of(model).spec, model.state_dict()
    shapes = {name: tuple(sd[name].shape) for name in spec.replicas}
    for path, layer in core.lte_layers(model):
        shapes[key(path, "weight")] = tuple(layer.export_shape)
    return shapes


class Worker:
    def __init__(self, cfg: Config, env: DistEnv, exchange: Exchange):
        self.cfg, self.env, self.exchange = cfg, env, exchange
        self.index = env.worker - 1                       # worker index (rank - dist.servers)
        self.options = cfg.worker_options(env.worker)
        k, n = cfg.worker.heads, cfg.lte.heads
        self.heads = range(self.index * k, (self.index + 1) * k)  # global head indices
        self.error: UserError | None = None
        self.clock = RoundClock.of(cfg)
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
        # comm.overlap: one thread runs a round's exchange while the next round computes
        self.background = ThreadPoolExecutor(1, "lte-overlap") if cfg.comm.overlap else None
        self.in_flight = None
        self.carry = core.Carry()  # what the heads keep of a round in flight (empty without overlap)
        self.deltas = ([DeltaStream(protos[self.index].download.nbytes) for protos in self.shard_protos]
                       if cfg.comm.download == "delta" else None)  # per shard: the download it holds

    def head_tensors(self) -> dict[str, torch.Tensor]:
        # looked up each time: local chunks move buffers between host and device
        return core.head_state(self.engine.model)

    # messages ----------------------------------------------------------------------------
    def hello(self) -> Control:
        size = sum(protos[self.index].upload.nbytes for protos in self.shard_protos) if self.error is None else 0
        control = hello(self.exchange, self.error, size, f"worker rank {self.env.worker}")
        if not control.finished:  # the server makes the same groups at the same point
            formats, members = format_groups(self.protos)
            links = make_links(self.exchange, self.env.servers, len(self.protos), members)
            mine = formats.index(self.proto.fmt.name)
            self.links = [(ex, groups[mine]) for ex, groups in zip(links.exchanges, links.format_groups)]
        return control

    def shards(self):
        """Per server shard: its exchange, the group of this worker's base format, and its messages."""
        return [(ex, group, protos) for (ex, group), protos in zip(self.links, self.shard_protos)]

    def receive_base(self, what: str) -> bool:
        """Install the server's base and merged replicas (each shard's part); whether this worker's
        last upload was accepted (the shards agree on it)."""
        return self.install_base(self.receive_downloads(what))

    def receive_downloads(self, what: str) -> list[torch.Tensor]:
        """Each shard's download as its layout lays it out (rebuilt from its change under comm.download=delta)."""
        out = []
        for k, (ex, group, protos) in enumerate(self.shards()):
            if self.deltas is None:
                out.append(ex.broadcast(protos[self.index].download.empty(), what, group=group))
            else:
                out.append(self.deltas[k].decode(ex.broadcast_sized(None, what, group=group)))
        return out

    def install_base(self, downloads: list[torch.Tensor]) -> bool:
        for buf, (_, _, protos) in zip(downloads, self.shards()):
            proto = protos[self.index]
            views = proto.download.unpack(buf)
            core.load_merged(self.engine.model, {path: proto.layer_payload(views, path) for path in proto.spec.layers},
                             {name: views[name] for name in proto.spec.replicas})
        return self.accepted(downloads)

    def accepted(self, downloads: list[torch.Tensor]) -> bool:
        """Whether the upload these downloads answer was merged (every shard says the same)."""
        proto = self.shard_protos[0][self.index]
        return bool(proto.download.unpack(downloads[0])["accepted"][self.index])

    def upload_state(self) -> None:
        opt, heads = self.engine.optimizer, self.head_tensors()
        tensors = dict(heads)
        for k in self.proto.trained:
            st = opt.state.get(heads[k], {})
            zeros = torch.zeros_like(heads[k])
            tensors[f"{k}.exp_avg"] = st.get("exp_avg", zeros)
            tensors[f"{k}.exp_avg_sq"] = st.get("exp_avg_sq", zeros)
            tensors[f"{k}.step"] = torch.as_tensor(st.get("step", 0.0), dtype=torch.float32)
        tensors.update(core.option_state(self.engine.model))
        if self.proto.codec.lossy:
            residuals = self.uploader.residuals
            tensors.update({f"{k}.residual": residuals.get(k, torch.zeros_like(heads[k])) for k in self.proto.uploaded})
        tensors["rng"] = torch.get_rng_state()
        tensors["comm"] = self.exchange.snapshot()
        for ex, _, protos in self.shards():  # each shard keeps its layers' part
            ex.gather(protos[self.index].state.pack(tensors), [p.state.nbytes for p in protos],
                      "the checkpoint upload", checkpoint=True)

    @torch.no_grad()
    def load_state(self, bufs: list[torch.Tensor], step: int) -> None:
        """The state each shard kept (its layers' part; the RNG and counters are in every part)."""
        views = {}
        for (_, _, protos), buf in zip(self.shards(), bufs):
            views.update(protos[self.index].state.unpack(buf))
        heads = self.head_tensors()
        for k, t in {**heads, **core.option_state(self.engine.model)}.items():
            t.copy_(views[k])
        opt = self.engine.optimizer
        fused = bool(opt.defaults.get("fused"))  # fused AdamW keeps its step counts on the device
        for k in self.proto.trained:
            p = heads[k]
            opt.state[p] = {"step": views[f"{k}.step"].clone().to(p.device if fused else "cpu"),
                            "exp_avg": views[f"{k}.exp_avg"].clone().to(p.device),
                            "exp_avg_sq": views[f"{k}.exp_avg_sq"].clone().to(p.device)}
        if self.proto.codec.lossy:
            self.uploader.load_state_dict({k: views[f"{k}.residual"].clone() for k in self.proto.uploaded},
                                          self.env.device)
        torch.set_rng_state(views["rng"].clone())
        self.exchange.add(views["comm"])
        self.engine.seek(step)

    # the loop ----------------------------------------------------------------------------
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
                self.install(rounds)
            if self.clock.checkpoints(self.engine.step):
                self.upload_state()
        self.finish()

    def begin(self, control: Control) -> None:
        """The state of a resumed run, then the server's base (and replicas to start from)."""
        engine = self.engine
        if control.resume:
            self.load_state([ex.scatter(None, [p.state.nbytes for p in protos], "the checkpoint restore",
                                        checkpoint=True) for ex, _, protos in self.shards()], control.step)
            core.set_merges_done(engine.model, control.merges)
        self.receive_base("the initial base download")
        if not control.resume:
            core.reset_heads(engine.model)  # replica copies start from the server's values
        engine.model.train()

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
        faults.before_upload(self.env.worker, rounds, {k: heads[k] for k in self.proto.uploaded})
        chunk_losses = engine.chunks.chunk_losses if engine.chunks is not None else []
        stats = torch.tensor([loss, compute_s, *chunk_losses], dtype=torch.float64)
        replicas = self.carry.references(engine.model)
        return [protos[self.index].upload.pack({**protos[self.index].encode_upload(heads, replicas, self.uploader),
                                                "stats": stats})
                for _, _, protos in self.shards()]

    def send_uploads(self, bufs: list[torch.Tensor], rounds: int) -> None:
        if self.cfg.dist.sync_phases:
            for ex, _, _ in self.shards():
                ex.barrier("the pre-upload barrier")
        for buf, (ex, _, protos) in zip(bufs, self.shards()):
            ex.gather(buf, [p.upload.nbytes for p in protos], f"the upload of round {rounds}")

    def install(self, rounds: int) -> None:
        """The merged base, then the heads for the next round."""
        self.start_next_round(self.receive_base(f"the download of round {rounds}"))

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
        for ex, _, protos in self.shards():
            digest = protos[self.index].base_digest(protos[self.index].worker_base(self.engine.model))
            ex.gather(DIGEST.pack({"digest": torch.tensor([digest])}), DIGEST.nbytes, "the final base check")

    def finish(self) -> None:
        self.send_digests()
        self.upload_state()  # for the final checkpoint, which a longer run continues from
        self.exchange.counters()
