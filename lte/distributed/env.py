"""Process roles, device placement and the process group, from what torchrun (or lte-train's own
launcher) put in the environment.

Placement: rank 0 is the parameter server in mode=ps. With dist.ps_device=cpu (the default) it
keeps the fp32 master in host memory and talks to the workers over Gloo, so it needs no GPU and a
worker can use every GPU of the node: on the server's node worker local rank i takes GPU i-1, on
other nodes GPU i. With dist.ps_device=cuda the server takes GPU 0 of its node, the workers the
GPUs after it, and the exchange runs over NCCL. NCCL refuses two ranks on one GPU; with more
workers than GPUs, use dist.backend=gloo (or fewer processes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..runtime.config import Config


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device     # where this process computes (the server: where the master lives)
    backend: str             # of the default group, used for every exchange
    servers: int = 1         # mode=ps: ranks 0..servers-1 are the server's shards, the rest workers

    @property
    def worker(self) -> int:
        """This worker's number, 1.. (its rank with one server): worker.per_rank's keys, faults, logs."""
        return self.rank - self.servers + 1


def read_env(cfg: Config) -> tuple[int, int, int, int]:
    try:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    except KeyError:
        raise ConfigError(f"mode={cfg.mode} runs several processes: launch it with "
                          f"`torchrun --standalone --nproc_per_node=3 -m lte.train ... mode={cfg.mode}` or "
                          f"`lte-train --nproc-per-node 3 ... mode={cfg.mode}`") from None


def wants_cuda(cfg: Config) -> bool:
    """Whether this run's processes compute on GPUs (train.device), or a ConfigError."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())


def place(cfg: Config, rank: int, world: int, local_rank: int, local_world: int) -> tuple[torch.device, str]:
    """This process's device and the group backend."""
    ps = cfg.mode == "ps"
    servers = cfg.dist.servers if ps else 1
    if ps and world < servers + 1:
        raise ConfigError(f"mode=ps needs at least {servers + 1} processes ({servers} server rank(s) and a worker); "
                          f"launch with --nproc_per_node={servers + 2} for {servers} server rank(s) and two workers")
    want_cuda = wants_cuda(cfg)
    server = ps and rank < servers
    if not want_cuda or (server and cfg.dist.ps_device == "cpu"):
        device = torch.device("cpu")
    else:
        gpus = torch.cuda.device_count()
        on_server_node = rank - local_rank == 0
        index = local_rank - servers if ps and cfg.dist.ps_device == "cpu" and on_server_node else local_rank
        device = torch.device("cuda", index % gpus)
        if index >= gpus and _backend(cfg, want_cuda) == "nccl":
            raise ConfigError(f"{local_world} processes on this node need more than its {gpus} GPU(s) and NCCL "
                              "refuses two ranks on one GPU; launch fewer processes or set dist.backend=gloo")
    if ps and cfg.dist.ps_device == "cuda" and not want_cuda:
        raise ConfigError("dist.ps_device=cuda but the run is on CPU (no CUDA device, or train.device=cpu)")
    return device, _backend(cfg, want_cuda)


def _backend(cfg: Config, cuda: bool) -> str:
    ps_on_cpu = cfg.mode == "ps" and cfg.dist.ps_device == "cpu"
    if cfg.dist.backend == "nccl":
        if not cuda or ps_on_cpu:
            raise ConfigError("dist.backend=nccl needs every process on a GPU (with mode=ps also "
                              "dist.ps_device=cuda); use gloo or auto")
        return "nccl"
    if cfg.dist.backend == "gloo" or not cuda or ps_on_cpu:
        return "gloo"
    return "nccl"


def init(cfg: Config) -> DistEnv:
    rank, world, local_rank, local_world = read_env(cfg)
    device, backend = place(cfg, rank, world, local_rank, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == local_world:
        # Every peer is on this machine: keep the data sockets on loopback, not on the host's
        # interfaces (the rendezvous store is the launcher's business; see docs/distributed.md, "Listening sockets").
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    timeout = timedelta(seconds=cfg.dist.timeout_s)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    dist.init_process_group(backend, store=_store(rank, world, restart, timeout), rank=rank, world_size=world,
                            timeout=timeout, device_id=device if backend == "nccl" else None)
    return DistEnv(rank, world, local_rank, local_world, device, backend, cfg.dist.servers if cfg.mode == "ps" else 1)


def _store(rank: int, world: int, restart: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store, with a fresh key space per restart attempt.

    torchrun (and our launcher) serve one store for the whole run: without a per-attempt prefix a
    restarted process would read the previous attempt's Gloo addresses and dial dead peers.
    """
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except KeyError as exc:
        raise ConfigError(f"{exc.args[0]} is not set: launch with torchrun or lte-train --nproc-per-node") from None
    served = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the launcher hosts it
    store = dist.TCPStore(host, port, world, is_master=rank == 0 and not served, timeout=timeout,
                          wait_for_workers=False)
    return dist.PrefixStore(f"lte/attempt-{restart}/", store)


def shutdown(together: bool) -> None:
    """Leave the group. together: the run ended normally here, as it does on every rank; then no
    rank tears its connections down before every rank is past its last collective (a worker once
    died with SIGABRT, "terminate called without an active exception", at the end of a finished
    run). A rank that stops on an error leaves at once, so its peers' collectives fail fast."""
    if not dist.is_initialized():
        return
    if together:
        try:
            dist.barrier()
        except (RuntimeError, dist.DistError):
            pass  # a peer already gone: leave anyway
    dist.destroy_process_group()
