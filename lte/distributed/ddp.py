"""mode=ddp: full-rank training of the same model and data with DistributedDataParallel on the
same ranks, the baseline LTE is compared to. Gradient all-reduce bytes are counted by a DDP
communication hook: a ring all-reduce of n bytes over W ranks sends and receives 2 (W-1)/W n
per rank."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ..data import build_data
from ..errors import UserError
from ..runtime.config import Config
from ..runtime.engine import Engine
from ..runtime.log import say
from ..runtime.rundir import RunDir, Start
from ..single.trainer import Trainer
from .comm import Exchange, bytes_per_step
from .env import DistEnv


def _counting_allreduce(exchange: Exchange, bucket):
    buf = bucket.buffer()
    wait_s = exchange.link_s(exchange.count_ring_all_reduce(buf.numel() * buf.element_size()))
    reduced = default_hooks.allreduce_hook(None, bucket)
    if not wait_s:
        return reduced

    def after_the_link(fut):  # runs on the process group's thread: backward goes on meanwhile, as with a real link
        time.sleep(wait_s)
        return fut.value()
    return reduced.then(after_the_link)


class DDPTrainer(Trainer):
    """A rank of a full-rank run over several processes, each on its own slice of every batch: DDP
    (gradients all-reduced every step), and the base of mode=diloco (lte.distributed.diloco)."""

    def __init__(self, cfg: Config, env: DistEnv, exchange: Exchange, rundir: RunDir | None):
        per_rank = cfg.train.split(env.world, f"over {env.world} {cfg.mode} ranks")
        data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
        engine = Engine(cfg, data, env.device, heads=None, streams=range(env.rank, env.rank + 1),
                        per_stream=per_rank, wrap=self.wrapper(env, exchange))
        super().__init__(cfg, engine, rundir)
        self.env, self.exchange = env, exchange

    def wrapper(self, env: DistEnv, exchange: Exchange):
        """DistributedDataParallel, its all-reduce counted."""
        def wrap(model):
            ddp = DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
            ddp.register_comm_hook(exchange, _counting_allreduce)
            return ddp
        return wrap

    def devices(self) -> int:
        return self.env.world

    def state(self) -> dict:
        # Every rank's counters are equal (a ring all-reduce is symmetric), so rank 0's stand for all.
        return {**super().state(), "comm": self.exchange.snapshot()}

    def restore(self, state: dict, path=None) -> None:
        super().restore(state, path)
        self.exchange.add(state["comm"])

    def summary_extra(self) -> dict:
        per_rank = self.exchange.counters()
        if per_rank is None:
            return {}
        return {"ranks": self.exchange.world,
                "comm": {"per_rank": per_rank, "bytes_per_step_per_worker": bytes_per_step(per_rank, self.step)}}


def run_ddp(cfg: Config, env: DistEnv, exchange: Exchange, trainer: type[DDPTrainer] = DDPTrainer) -> dict | None:
    """Rank 0 holds the run directory and decides how the run starts; every rank follows. Ranks
    other than 0 read the checkpoint rank 0 chose, so on several nodes out_dir must be shared."""
    rundir, decision, error = None, [None], None
    if env.rank == 0:
        rundir = RunDir(cfg)
        try:
            start = rundir.open(say=say)
            decision = [{"finished": start.finished, "path": None if start.path is None else str(start.path)}]
        except UserError as exc:
            error, decision = exc, [{"error": str(exc)}]
    dist.broadcast_object_list(decision, src=0)  # control, not payload: not counted
    try:
        if "error" in decision[0]:
            if error is not None:
                raise error
            raise UserError(f"rank {env.rank}: rank 0 stopped the run (see its error)")
        if decision[0]["finished"] is not None:
            return decision[0]["finished"] if env.rank == 0 else None
        if env.rank != 0:
            path = decision[0]["path"]
            start = Start() if path is None else Start(torch.load(path, map_location="cpu", weights_only=True),
                                                       Path(path))
        return trainer(cfg, env, exchange, rundir).run(start) or None
    finally:
        if rundir is not None:
            rundir.unlock()
