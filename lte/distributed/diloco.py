"""mode=diloco: the DiLoCo baseline (Douillard et al., 2023) in the same tool, on the same data.

Full-rank workers, one per rank, each on its own slice of every batch: lte.merge_every (H) local
AdamW steps, then the ranks average what the round changed (one all-reduce of the model, counted
as a ring like DDP's), and an outer optimizer (lte.outer, lte.outer_lr, lte.outer_momentum; DiLoCo
uses nesterov, 0.7, 0.9) steps the shared weights with it as the negated pseudo-gradient; every rank
then continues from the shared weights with its own inner optimizer state. With lte.outer=none the
ranks simply average their weights.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..runtime.config import Config
from .comm import Exchange
from .ddp import DDPTrainer, run_ddp
from .env import DistEnv


class DiLoCoTrainer(DDPTrainer):
    def __init__(self, cfg: Config, env: DistEnv, exchange: Exchange, rundir):
        super().__init__(cfg, env, exchange, rundir)
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.names = [names[id(p)] for p in self.engine.params]
        self.shared = [p.detach().clone() for p in self.engine.params]  # the weights of the last sync
        self.local_states: list[dict] | None = None  # every rank's inner state, gathered for a checkpoint

    def wrapper(self, env: DistEnv, exchange: Exchange):
        return None  # no gradient all-reduce: ranks train apart for a round

    @torch.no_grad()
    def end_round(self) -> None:
        params = self.engine.params
        if self.outer.active:
            flat = torch.cat([(p - s).flatten() for p, s in zip(params, self.shared)])
        else:
            flat = torch.cat([p.flatten() for p in params])
        self.exchange.all_reduce_mean(flat, f"the outer sync of round {self.merges + 1}")
        offset = 0
        for name, p, shared in zip(self.names, params, self.shared):
            mean = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if self.outer.active:
                self.outer.apply(name, shared, mean)
            else:
                shared.copy_(mean)
            p.copy_(shared)
        self.merges += 1
        if self.clock.checkpoints(self.step) or self.step == self.cfg.train.steps:
            self.local_states = self.gather_local_states()

    def describe(self) -> str:
        outer = self.outer.describe() or "plain averaging"
        return (f"DiLoCo: {self.env.world} full-rank workers averaging their local steps, "
                f"{self.clock.describe_rounds}, {outer}; " + super().describe())

    def gather_local_states(self) -> list[dict] | None:
        """Each rank's inner optimizer and RNG state, on rank 0 (checkpoint traffic, not counted)."""
        mine = {"optimizer": self.engine.optimizer.state_dict(), "rng": torch.get_rng_state()}
        out = [None] * self.env.world if self.env.rank == 0 else None
        dist.gather_object(mine, out, dst=0)
        return out

    def state(self) -> dict:
        return {**super().state(), "local_states": self.local_states}

    def restore(self, state: dict, path=None) -> None:
        super().restore(state, path)
        local = state["local_states"][self.env.rank]
        self.engine.optimizer.load_state_dict(local["optimizer"])
        torch.set_rng_state(local["rng"])
        self.shared = [p.detach().clone() for p in self.engine.params]  # a checkpoint is taken at a sync


def run_diloco(cfg: Config, env: DistEnv, exchange: Exchange) -> dict | None:
    return run_ddp(cfg, env, exchange, DiLoCoTrainer)
