"""LTE as a multi-process system: a parameter server and workers (mode=ps), and the DDP and DiLoCo
baselines (mode=ddp, mode=diloco), over torch.distributed, launched by torchrun or lte-train --nproc-per-node;
and elastic parameter-server runs (lte-train serve / join: elastic).

The parameter server's core (server) and a worker's (worker) are the same whatever carries their
messages; a transport supplies that: torchrun (one process group, collectives, a sharded server)
or elastic (a link per worker through the server's door: membership). The messages both sides
derive from the model are in protocol (and handshake), counted collectives and byte layouts in comm."""
from __future__ import annotations

import torch

from ..runtime.config import Config, resolve_heads
from . import env as dist_env
from .comm import Exchange, PeerError
from .ddp import run_ddp
from .diloco import run_diloco
from .torchrun import TorchrunServer, TorchrunWorker


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
        return run_ddp(cfg, env, exchange)
    if cfg.mode == "diloco":
        return run_diloco(cfg, env, exchange)
    if env.rank < env.servers:
        return TorchrunServer(cfg, env, exchange).run()
    TorchrunWorker(cfg, env, exchange).run()
    return None


__all__ = ["run_distributed", "PeerError"]
