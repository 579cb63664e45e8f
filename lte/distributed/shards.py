"""A parameter server sharded over ranks 0..K-1 (dist.servers = K): who owns what, the groups
every rank builds, the master brought together for evaluation, and the shards' checkpoints.

Each shard owns whole master tensors (a layer's weight, a replicated parameter), assigned largest
first to the shard with the fewest bytes so far, and runs the whole protocol for them: a worker's
upload to shard k holds the factors of shard k's layers only, shard k merges them (with its part
of the outer optimizer's state) and sends back its layers' base. The shards agree on which
workers' updates they accept (an all-reduce of the masks), so a worker's heads go into every
shard's merge or into none. Shard 0 also holds the run directory, logs, evaluates and writes the
results; it gathers the other shards' tensors when it evaluates and at the end. Only shard 0 builds
the whole model from the seed; the others build its shapes on the meta device and receive their own
tensors from shard 0 at the start (scatter_master), so a shard holds 1/K of the master and of the
outer optimizer's state.

Checkpoints: every shard writes its tensors (master, outer momenta, its part of each worker's
state, its byte counters) with torch.distributed.checkpoint into checkpoint-<step>.dcp/, then
shard 0 writes checkpoint-<step>.pt (the loop's state), which is what makes the checkpoint count:
a kill between the two leaves the previous checkpoint in force. A run resumes with the same K
(the config says so); out_dir must be on a file system every server rank sees.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from ..core.algebra import MergeSpec, key
from ..errors import ConfigError
from .comm import Exchange


def shard_specs(spec: MergeSpec, shapes: dict[str, tuple[int, ...]], servers: int) -> list[MergeSpec]:
    """The merge spec of each shard: whole tensors, largest first to the least loaded shard; each
    keeps the model's order. Every process computes it from the model alone."""
    if servers == 1:
        return [spec]
    sizes = {name: math.prod(shapes[name]) for name in spec.master_keys()}
    if servers > len(sizes):
        raise ConfigError(f"dist.servers={servers} is more than the model's {len(sizes)} master tensors")
    load, owner = [0] * servers, {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        k = min(range(servers), key=lambda i: (load[i], i))
        owner[name], load[k] = k, load[k] + sizes[name]
    return [dataclasses.replace(spec, layers=tuple(x for x in spec.layers if owner[key(x, "weight")] == k),
                                replicas=tuple(x for x in spec.replicas if owner[x] == k),
                                transposed=tuple(x for x in spec.transposed if owner[key(x, "weight")] == k))
            for k in range(servers)]


@dataclasses.dataclass
class Channels:
    """What a rank talks over: per shard, the Exchange between that shard and the workers and its
    groups per base format (worker ranks by format); `servers` the group of the shards (None: one)."""

    exchanges: list[Exchange]
    format_groups: list[list]
    servers: "dist.ProcessGroup | None"


def make_channels(exchange: Exchange, servers: int, workers: int, members: list[list[int]]) -> Channels:
    """Every rank calls this at the same point with the same arguments (new_group's rule);
    `members`: the worker numbers (1..) storing each base format. With one server, the default
    group and today's format groups, as before sharding."""
    worker_ranks = list(range(servers, servers + workers))
    by_format = [[servers - 1 + w for w in m] for m in members]
    exchanges, groups = [], []
    for k in range(servers):
        group = None if servers == 1 else dist.new_group([k, *worker_ranks], timeout=exchange.timeout)
        ex = exchange if servers == 1 else exchange.toward(k, worker_ranks, group)
        exchanges.append(ex)
        groups.append([None] if len(by_format) == 1 and servers == 1 else
                      [group] if len(by_format) == 1 else ex.groups(by_format))
    group = None if servers == 1 else dist.new_group(list(range(servers)), timeout=exchange.timeout)
    return Channels(exchanges, groups, group)


def agree(accepted: torch.Tensor, servers: "dist.ProcessGroup | None") -> torch.Tensor:
    """The workers every shard accepts (a worker non-finite on one shard is left out of all);
    `servers`: the group of the shards (None: one server)."""
    if servers is None:
        return accepted
    dist.all_reduce(accepted, op=dist.ReduceOp.MIN, group=servers)
    return accepted


def gather_master(held: dict[str, torch.Tensor], specs: list[MergeSpec], shard: int,
                  servers: "dist.ProcessGroup | None") -> None:
    """Bring every shard's master tensors into shard 0's copy of the model (for its evaluation and
    results): shard k sends its tensors in one buffer. `held`: shard 0's model state, another shard's
    own tensors. Server-internal traffic: not counted."""
    _between_shards(held, specs, shard, servers, to_main=True)


def scatter_master(held: dict[str, torch.Tensor], specs: list[MergeSpec], shard: int,
                   servers: "dist.ProcessGroup | None") -> None:
    """The reverse at the start: shard 0's model (built from the seed) gives every other shard its
    own tensors, so a shard never builds the whole model and starts from the workers' init."""
    _between_shards(held, specs, shard, servers, to_main=False)


def _between_shards(held: dict[str, torch.Tensor], specs: list[MergeSpec], shard: int,
                    servers: "dist.ProcessGroup | None", to_main: bool) -> None:
    """Shard k's tensors between shard k and shard 0, one message a tensor, straight from and into
    the tensors (a packed buffer would add 1/K of the master to a shard's peak memory)."""
    if servers is None:
        return
    for k in range(1, len(specs)):
        if shard not in (0, k):
            continue
        sends = (shard == k) == to_main
        peer = (0 if to_main else k) if sends else (k if to_main else 0)
        for n in specs[k].master_keys():
            t = held[n].detach()
            direct = t.device.type == "cpu" and t.is_contiguous()
            buf = t if direct else (t.cpu().contiguous() if sends else torch.empty(t.shape, dtype=t.dtype))
            if sends:
                dist.send(buf, dst=peer, group=servers)
            else:
                dist.recv(buf, src=peer, group=servers)
                if not direct:
                    with torch.no_grad():
                        t.copy_(buf)


def shard_peaks(mine: int, servers: "dist.ProcessGroup | None") -> list[int]:
    """Every shard's peak memory in bytes (lte.runtime.log.peak_memory), in shard order."""
    if servers is None:
        return [mine]
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(servers))]
    dist.all_gather(out, torch.tensor([mine], dtype=torch.int64), group=servers)
    return [int(t) for t in out]


def save_shard(path, tensors: dict[str, torch.Tensor], shard: int, servers: "dist.ProcessGroup") -> None:
    """Shard `shard`'s tensors into the checkpoint folder `path` (all shards call it together)."""
    import torch.distributed.checkpoint as dcp  # here: importing it costs most of a second, every process

    dcp.save({f"shard{shard}": tensors}, checkpoint_id=str(path), process_group=servers)


def load_shard(path, template: dict[str, torch.Tensor], shard: int, servers: "dist.ProcessGroup"
               ) -> dict[str, torch.Tensor]:
    """Shard `shard`'s tensors from `path`, into tensors shaped as `template`."""
    import torch.distributed.checkpoint as dcp  # here: importing it costs most of a second, every process

    state = {f"shard{shard}": {k: v.detach().clone() for k, v in template.items()}}
    dcp.load(state, checkpoint_id=str(path), process_group=servers)
    return state[f"shard{shard}"]
