"""A parameter server sharded over ranks 0..K-1 (dist.servers = K): who owns what, the groups
every rank builds, the master brought together for evaluation, and the shards' checkpoints.

Each shard owns whole master tensors (a layer's weight, a replicated parameter), assigned largest
first to the shard with the fewest bytes so far, and runs the whole protocol for them: a worker's
upload to shard k holds the factors of shard k's layers only, shard k merges them (with its part
of the outer optimizer's state) and sends back its layers' base. The shards agree on which
workers' updates they accept (an all-reduce of the masks), so a worker's heads go into every
shard's merge or into none. Shard 0 also holds the run directory, logs and writes the results.

No shard holds the whole master at any time, so a shard's memory is 1/K of the master and of the
outer optimizer's state plus one module's weights:
- every shard builds the model on the meta device and initialises only its own tensors, each drawn
  alone (lte.runtime.model.init_tensors; models whose init is not per tensor are built whole by
  shard 0 at the start, which gives the others their tensors and keeps its own: scatter_master);
- the shards evaluate together, each module's tensors brought from their owner as it runs and
  dropped after (materialized);
- shard 0 writes final.safetensors a tensor at a time as the owners send them (export_master).

Checkpoints: every shard writes its tensors (master, outer momenta, its part of each worker's
state, its byte counters) with torch.distributed.checkpoint into checkpoint-<step>.dcp/, then
shard 0 writes checkpoint-<step>.pt (the loop's state), which is what makes the checkpoint count:
a kill between the two leaves the previous checkpoint in force. A run resumes with the same K
(the config says so); out_dir must be on a file system every server rank sees.
"""
from __future__ import annotations

import contextlib
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


def owners(specs: list[MergeSpec]) -> dict[str, int]:
    """The shard that owns each master tensor."""
    return {name: k for k, spec in enumerate(specs) for name in spec.master_keys()}


def scatter_master(held: dict[str, torch.Tensor], specs: list[MergeSpec], shard: int,
                   servers: "dist.ProcessGroup | None") -> None:
    """Shard 0's init (a whole model built from the seed, for models whose init is not per tensor:
    lte.runtime.model.init_tensors) gives every other shard its own tensors, one message a tensor,
    straight from and into the tensors. `held`: shard 0's whole state, another shard's own tensors."""
    if servers is None:
        return
    for k in range(1, len(specs)):
        if shard not in (0, k):
            continue
        for n in specs[k].master_keys():
            if shard == 0:
                dist.send(_on_host(held[n]), dst=k, group=servers)
            else:
                _receive(held[n], src=0, servers=servers)


@contextlib.contextmanager
def materialized(model: torch.nn.Module, held: dict[str, torch.Tensor], specs: list[MergeSpec], shard: int,
                 servers: "dist.ProcessGroup"):
    """Every shard runs the same forward passes together on its model, whose master tensors are on
    the meta device: as a module starts, each of its own tensors comes from the shard owning it (a
    broadcast among the shards) and goes when it ends, so a shard holds its own tensors and one
    module's more (FSDP's all-gather per module, without the sharding of compute). A module's tensors
    must be used in its own forward (true of lte's models, timm's and transformers' untied ones)."""
    owner, handles = owners(specs), []
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        mine = [(attr, prefix + attr, t) for attr, t in [*module.named_parameters(recurse=False),
                                                          *module.named_buffers(recurse=False)]
                if prefix + attr in owner]
        if mine:
            handles.append(module.register_forward_pre_hook(_fetch(mine, owner, held, shard, servers)))
            handles.append(module.register_forward_hook(_restore(mine)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _fetch(mine, owner, held, shard, servers):
    def hook(module, args):
        for attr, name, t in mine:
            value = held[name] if owner[name] == shard else torch.empty(t.shape, dtype=t.dtype, device=_device(held))
            _broadcast(value, owner[name], servers)
            setattr(module, attr, torch.nn.Parameter(value, requires_grad=False)
                    if isinstance(t, torch.nn.Parameter) else value)
    return hook


def _restore(mine):
    def hook(module, args, output):
        for attr, _, t in mine:
            setattr(module, attr, t)
    return hook


def export_master(model: torch.nn.Module, held: dict[str, torch.Tensor], specs: list[MergeSpec], shard: int,
                  servers: "dist.ProcessGroup", write) -> None:
    """The model's final state (its state_dict's keys and order) streamed to shard 0 a tensor at a
    time, each from the shard owning it (shard 0's other entries, buffers, from its model), into
    `write(layout, tensors)` (RunDir.write_weights) on shard 0; every shard calls it together."""
    owner, state = owners(specs), model.state_dict(keep_vars=True)

    def tensors():
        for name, t in state.items():
            k = owner.get(name, 0)
            if k == 0:
                yield held[name] if name in owner else t
            else:
                yield _receive(torch.empty(t.shape, dtype=t.dtype), src=k, servers=servers)

    if shard == 0:
        write([(n, t.dtype, tuple(t.shape)) for n, t in state.items()], tensors())
        return
    for name in state:
        if owner.get(name) == shard:
            dist.send(_on_host(held[name]), dst=0, group=servers)


def _device(held: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(held.values())).device if held else torch.device("cpu")


def _on_host(t: torch.Tensor) -> torch.Tensor:
    """What Gloo sends: a contiguous host tensor (the tensor itself where it is one)."""
    t = t.detach()
    return t if t.device.type == "cpu" and t.is_contiguous() else t.cpu().contiguous()


def _receive(into: torch.Tensor, src: int, servers) -> torch.Tensor:
    """Receive a tensor from `src` into `into` (through a host buffer where it is not one)."""
    direct = into.device.type == "cpu" and into.is_contiguous()
    buf = into.detach() if direct else torch.empty(into.shape, dtype=into.dtype)
    dist.recv(buf, src=src, group=servers)
    if not direct:
        with torch.no_grad():
            into.copy_(buf)
    return into


def _broadcast(value: torch.Tensor, src: int, servers) -> None:
    """`value` from shard `src` to every shard, through the host where the group is Gloo's."""
    if value.device.type == "cpu" or dist.get_backend(servers) != "gloo":
        dist.broadcast(value, src=src, group=servers)
        return
    buf = value.cpu()
    dist.broadcast(buf, src=src, group=servers)
    value.copy_(buf)


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
