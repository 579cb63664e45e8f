"""mode=ddp: full-rank training of the same model and data with DistributedDataParallel on the
same ranks, the baseline LTE is compared to. Gradient all-reduce bytes are counted by a DDP
communication hook: a ring all-reduce of n bytes over W ranks sends and receives 2 (W-1)/W n
per rank."""
from __future__ import annotations

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ..data import build_data
from ..errors import ConfigError
from ..train.config import Config
from ..train.trainer import Engine, Trainer
from .comm import Exchange
from .env import DistEnv


def _counting_allreduce(exchange: Exchange, bucket):
    buf = bucket.buffer()
    share = int(2 * (exchange.world - 1) / exchange.world * buf.numel() * buf.element_size())
    exchange.sent += share
    exchange.received += share
    return default_hooks.allreduce_hook(None, bucket)


class DDPTrainer(Trainer):
    def __init__(self, cfg: Config, env: DistEnv, exchange: Exchange):
        if cfg.train.batch_size % env.world:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split over {env.world} DDP ranks")
        data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
        engine = Engine(cfg, data, env.device, heads=None, streams=range(env.rank, env.rank + 1),
                        per_stream=cfg.train.batch_size // env.world)
        ddp = DistributedDataParallel(engine.model, device_ids=[env.device] if env.device.type == "cuda" else None)
        ddp.register_comm_hook(exchange, _counting_allreduce)
        engine.forward = torch.compile(ddp) if cfg.train.compile else ddp
        super().__init__(cfg, engine)
        self.exchange, self.is_main = exchange, env.rank == 0

    def summary_extra(self) -> dict:
        per_rank = self.exchange.counters()
        if per_rank is None:
            return {}
        steps = max(self.step, 1)
        return {"ranks": self.exchange.world, "comm": {
            "per_rank": per_rank,
            "bytes_per_step_per_worker": sum(r["bytes_sent"] + r["bytes_received"] for r in per_rank)
            / len(per_rank) / steps}}
