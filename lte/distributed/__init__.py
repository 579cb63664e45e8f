"""LTE as a multi-process system: a parameter server and workers (mode=ps), and the DDP and DiLoCo
baselines (mode=ddp, mode=diloco), over torch.distributed, launched by torchrun or lte-train --nproc-per-node."""
from __future__ import annotations

import torch

from ..train.config import Config, resolve_heads
from . import env as dist_env
from .comm import Exchange, PeerError


def run_distributed(cfg: Config) -> dict | None:
    """Run this process's part of a mode=ps, ddp or diloco run; the summary on rank 0."""
    world = dist_env.read_env(cfg)[1]
    if cfg.mode == "ps" and world > cfg.dist.servers:  # fewer: init refuses it
        # Refused in every process alike before any joins the group: a process that leaves while
        # its peers are still connecting makes them fail with Gloo's traceback, not this message.
        cfg = resolve_heads(cfg, world - cfg.dist.servers)
    env = dist_env.init(cfg)
    device = env.device if env.backend == "nccl" else torch.device("cpu")
    exchange = Exchange(env.rank, env.world, device, cfg.dist.timeout_s, link_mbps=cfg.dist.emulate_link_mbps)
    broken = finished = False
    try:
        summary = _run_role(cfg, env, exchange)
        finished = True
        return summary
    except PeerError:
        broken = True  # tearing the group down could block on the dead peer
        raise
    finally:
        if not broken:
            dist_env.shutdown(together=finished)


def _run_role(cfg: Config, env, exchange: Exchange) -> dict | None:
    if cfg.mode == "ddp":
        from .ddp import run_ddp

        return run_ddp(cfg, env, exchange)
    if cfg.mode == "diloco":
        from .diloco import run_diloco

        return run_diloco(cfg, env, exchange)
    if env.rank < env.servers:
        from .server import ParameterServer

        return ParameterServer(cfg, env, exchange).run()
    from .worker import Worker

    Worker(cfg, env, exchange).run()
    return None


__all__ = ["run_distributed", "PeerError"]
