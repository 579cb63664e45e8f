"""Counted collectives between the parameter server (rank 0) and the workers, and byte packing.

Every message is one flat uint8 buffer packed from named tensors of mixed dtypes (a Layout that
both sides derive from the model, so nothing but the bytes travel). Byte counts are the logical
point-to-point payload: a worker's upload counts once as sent by the worker and once as received
by the server; a broadcast counts (workers x size) as sent by the server and once as received by
each worker. Training traffic and checkpoint traffic (the workers' state going to the server's
checkpoint, and back on a restart) are counted apart, so the training figures do not depend on
how often a run checkpoints. Barriers and the end-of-run exchange of the counters themselves move
no payload and are not counted. Messages whose size differs between workers (workers with
different options) go point to point; a broadcast to the workers of one base format runs over
their own group. With dist.emulate_link_mbps (benchmarks) every counted payload of a worker, and
each rank's share of a ring all-reduce, waits bytes / bandwidth after it moved, as if it had
crossed a link that slow (loopback is not).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import UserError

ALIGN = 8  # every entry starts 8-byte aligned, so a slice can be viewed as any dtype


def bytes_per_step(per_rank: list[dict], steps: int) -> float:
    """Training bytes one rank sent and received per step, averaged over the ranks' counters given
    (Exchange.counters rows: a parameter server's workers, or every DDP rank)."""
    return sum(r["bytes_sent"] + r["bytes_received"] for r in per_rank) / len(per_rank) / max(steps, 1)


def counter_row(rank: int, sent: int, received: int, checkpoint_sent: int = 0, checkpoint_received: int = 0) -> dict:
    """One rank's byte counters as a summary reports them (comm.per_rank)."""
    return {"rank": rank, "bytes_sent": int(sent), "bytes_received": int(received),
            "checkpoint_bytes_sent": int(checkpoint_sent), "checkpoint_bytes_received": int(checkpoint_received)}


def ring_all_reduce_share(world: int, nbytes: int) -> int:
    """What a ring all-reduce of `nbytes` over `world` ranks sends per rank (and receives: the same),
    2 (W-1)/W nbytes: DDP's gradients and DiLoCo's round change are counted so."""
    return int(2 * (world - 1) / world * nbytes)


class PeerError(UserError):
    """A collective failed or timed out: a peer died, hung or could not be reached."""


class Layout:
    """A fixed order of named tensors (shape, dtype) laid out in one byte buffer."""

    def __init__(self, entries: list[tuple[str, tuple[int, ...], torch.dtype]]):
        self.entries, self.offsets, offset = entries, {}, 0
        for name, shape, dtype in entries:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            self.offsets[name] = (offset, size)
            offset += -(-size // ALIGN) * ALIGN
        self.nbytes = offset

    def names(self) -> list[str]:
        return [name for name, _, _ in self.entries]

    def empty(self, device="cpu") -> torch.Tensor:
        return torch.zeros(self.nbytes, dtype=torch.uint8, device=device)

    def pack(self, tensors: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        out = self.empty() if out is None else out
        views = self.unpack(out)
        for name in views:
            views[name].copy_(tensors[name].detach().reshape(views[name].shape))
        return out

    def unpack(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into buf, one per entry (no copies)."""
        views = {}
        for name, shape, dtype in self.entries:
            offset, size = self.offsets[name]
            views[name] = buf[offset:offset + size].view(dtype).view(shape)
        return views


@dataclass
class Counts:
    """A process's bytes, training and checkpoint traffic apart; shared by its Exchanges."""

    sent: int = 0
    received: int = 0
    ckpt_sent: int = 0
    ckpt_received: int = 0


def _counted(name: str) -> property:
    return property(lambda self: getattr(self.counts, name), lambda self, v: setattr(self.counts, name, v))


class Exchange:
    """Collectives between one server rank (`server`, rank 0 by default) and its workers (`peers`,
    every other rank by default) over `group` (the default group if None), with byte counters.
    With a sharded server (dist.servers = K) a process has one Exchange per server shard, made
    with `toward`; they share one set of counters."""

    sent, received = _counted("sent"), _counted("received")                       # training traffic
    ckpt_sent, ckpt_received = _counted("ckpt_sent"), _counted("ckpt_received")   # checkpoint traffic

    def __init__(self, rank: int, world: int, device: torch.device, timeout_s: float, *, server: int = 0,
                 peers: list[int] | None = None, group: "dist.ProcessGroup | None" = None,
                 counts: Counts | None = None, link_mbps: float = 0.0):
        self.rank, self.world, self.device = rank, world, device
        self.link_mbps = link_mbps  # dist.emulate_link_mbps: each payload waits its time on a link this fast
        self.server, self.group = server, group
        self.peers = [r for r in range(world) if r != server] if peers is None else list(peers)
        self.timeout = timedelta(seconds=timeout_s)
        self.counts = Counts() if counts is None else counts
        self._dummy: dict[int, torch.Tensor] = {}

    def toward(self, server: int, peers: list[int], group: "dist.ProcessGroup | None") -> Exchange:
        """The exchange between `server` and `peers` over `group`, counting into this one's counters."""
        return Exchange(self.rank, self.world, self.device, self.timeout.total_seconds(), server=server, peers=peers,
                        group=group, counts=self.counts, link_mbps=self.link_mbps)

    @property
    def workers(self) -> int:
        return len(self.peers)

    def _sizes(self, nbytes: int | list[int]) -> list[int]:
        return list(nbytes) if isinstance(nbytes, (list, tuple)) else [nbytes] * self.workers

    def gather(self, buf: torch.Tensor | None, nbytes: int | list[int], what: str, checkpoint: bool = False
               ) -> list[torch.Tensor] | None:
        """Workers send `buf` to the server; the server gets one buffer per worker. nbytes: the
        size of every worker's message, or a list of them by worker (the same list on every rank)."""
        sizes = self._sizes(nbytes)
        uniform = len(set(sizes)) == 1
        if self.rank == self.server:
            if uniform:  # the group's ranks in order: the server first (its ranks are below the workers')
                out = [torch.empty(sizes[0], dtype=torch.uint8, device=self.device) for _ in range(self.workers + 1)]
                self._run(lambda: dist.gather(self._placeholder(sizes[0]), out, dst=self.server, group=self.group),
                          what)
                out = out[1:]
            else:
                out = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in sizes]
                self._run(lambda: self._wait([dist.irecv(b, src=r) for r, b in zip(self.peers, out)]), what)
            self._count(0, sum(sizes), checkpoint)
            return out
        buf = buf.to(self.device)
        if uniform:
            self._run(lambda: dist.gather(buf, None, dst=self.server, group=self.group), what)
        else:
            self._run(lambda: dist.send(buf, dst=self.server), what)
        self._count(buf.numel(), 0, checkpoint)
        return None

    def broadcast(self, buf: torch.Tensor, what: str, group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
        """The server's `buf` to every worker, or to the workers of `group` (a group of the server and
        some workers); receivers pass a buffer of the same size to fill."""
        buf = buf.to(self.device)
        group = self.group if group is None else group
        self._run(lambda: dist.broadcast(buf, src=self.server, group=group), what)
        if self.rank == self.server:
            self._count(buf.numel() * (self.workers if group is None else dist.get_world_size(group) - 1), 0, False)
        else:
            self._count(0, buf.numel(), False)
        return buf

    def broadcast_sized(self, buf: torch.Tensor | None, what: str, group: "dist.ProcessGroup | None" = None
                        ) -> torch.Tensor:
        """A message whose size only the server knows (a compressed download): its size, then it."""
        size = self.broadcast(torch.tensor([0 if buf is None else buf.numel()], dtype=torch.int64), what, group)
        out = buf if buf is not None else torch.empty(int(size[0]), dtype=torch.uint8)
        return self.broadcast(out, what, group)

    def scatter(self, bufs: list[torch.Tensor] | None, nbytes: int | list[int], what: str, checkpoint: bool = False
                ) -> torch.Tensor | None:
        """The server sends bufs[w] to worker w+1 (nbytes as for gather)."""
        sizes = self._sizes(nbytes)
        uniform = len(set(sizes)) == 1
        if self.rank == self.server:
            if uniform:
                out = torch.empty(sizes[0], dtype=torch.uint8, device=self.device)
                self._run(lambda: dist.scatter(out, [self._placeholder(sizes[0])] + [b.to(self.device) for b in bufs],
                                               src=self.server, group=self.group), what)
            else:
                self._run(lambda: self._wait([dist.isend(b.to(self.device), dst=r) for r, b in zip(self.peers, bufs)]),
                          what)
            self._count(sum(sizes), 0, checkpoint)
            return None
        out = torch.empty(sizes[self.peers.index(self.rank)], dtype=torch.uint8, device=self.device)
        if uniform:
            self._run(lambda: dist.scatter(out, None, src=self.server, group=self.group), what)
        else:
            self._run(lambda: dist.recv(out, src=self.server), what)
        self._count(0, out.numel(), checkpoint)
        return out

    def groups(self, members: list[list[int]]) -> list["dist.ProcessGroup"]:
        """A process group of the server and each list of worker ranks; every rank must call this
        with the same lists, in the same order (torch.distributed.new_group's rule)."""
        return [dist.new_group(ranks=[self.server, *m], timeout=self.timeout) for m in members]

    def _wait(self, works) -> None:
        for work in works:
            work.wait(self.timeout)

    def count_ring_all_reduce(self, nbytes: int) -> int:
        """Count a ring all-reduce of `nbytes`; the share each rank sends (and receives, at the same time)."""
        share = ring_all_reduce_share(self.world, nbytes)
        self.sent, self.received = self.sent + share, self.received + share
        return share

    def link_s(self, nbytes: int) -> float:
        """The seconds `nbytes` take on the emulated link (0 without one)."""
        return nbytes * 8 / (self.link_mbps * 1e6) if self.link_mbps else 0.0

    def all_reduce_mean(self, buf: torch.Tensor, what: str) -> torch.Tensor:
        """Every rank's `buf` averaged over the ranks, in place (counted as a ring all-reduce)."""
        work = buf.to(self.device)  # the group's device (the host under Gloo)
        self._run(lambda: dist.all_reduce(work, op=dist.ReduceOp.SUM), what)
        time.sleep(self.link_s(self.count_ring_all_reduce(buf.numel() * buf.element_size())))
        return buf.copy_(work.div_(self.world))

    def barrier(self, what: str) -> None:
        self._run(lambda: dist.barrier(group=self.group), what)

    def snapshot(self) -> torch.Tensor:
        """This rank's four counters, for a checkpoint."""
        return torch.tensor([self.sent, self.received, self.ckpt_sent, self.ckpt_received], dtype=torch.int64)

    def add(self, snapshot: torch.Tensor) -> None:
        """Add the counters of earlier attempts (a checkpoint's snapshot) to this attempt's."""
        sent, received, ckpt_sent, ckpt_received = (int(v) for v in snapshot)
        self.sent, self.received = self.sent + sent, self.received + received
        self.ckpt_sent, self.ckpt_received = self.ckpt_sent + ckpt_sent, self.ckpt_received + ckpt_received

    def counters(self) -> list[dict] | None:
        """Every rank's counters, collected on the server at the end (not counted)."""
        mine = self.snapshot().to(self.device)
        out = [torch.zeros_like(mine) for _ in range(self.world)] if self.rank == 0 else None
        self._run(lambda: dist.gather(mine, out, dst=0), "the final byte count")
        if self.rank != 0:
            return None
        return [counter_row(r, *t.tolist()) for r, t in enumerate(out)]

    def _count(self, sent: int, received: int, checkpoint: bool) -> None:
        if self.link_mbps and self.rank != self.server:  # the workers' links (the server's is taken as wide)
            time.sleep(self.link_s(sent + received))
        if checkpoint:
            self.ckpt_sent, self.ckpt_received = self.ckpt_sent + sent, self.ckpt_received + received
        else:
            self.sent, self.received = self.sent + sent, self.received + received

    def _placeholder(self, nbytes: int) -> torch.Tensor:
        if nbytes not in self._dummy:
            self._dummy[nbytes] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._dummy[nbytes]

    def _run(self, fn, what: str) -> None:
        try:
            fn()
        except (RuntimeError, dist.DistError) as exc:
            role = "parameter server" if self.rank == self.server else f"worker rank {self.rank}"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PeerError(f"{role}: {what} failed after waiting up to dist.timeout_s="
                            f"{self.timeout.total_seconds():g}s; a peer died, hung or is unreachable "
                            f"({first})") from None
