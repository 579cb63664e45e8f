"""Deterministic mini-batch streams, one per head.

Head g's batch at step t depends only on (seed, g, t), so the same head sees the same batches in
a simulated run, on a parameter-server worker, or after a restart from a checkpoint at step t
(the data position of a stream is just the step). Two ways to draw:

  epoch   positions t*b .. t*b+b-1 of an endless sequence of per-epoch shuffles of the set;
  random  b indices drawn uniformly with replacement from a generator seeded by (seed, g, t),
          for sets too large to shuffle (every window start of a token file).

Each sample also gets a key, a 63-bit integer from (seed, g, position in the stream), that seeds
its random augmentation; so augmentation is as reproducible as the choice of samples.
"""
from __future__ import annotations

import torch

from ..core.init import head_seed

_MASK = (1 << 63) - 1
_MULT = 0x9E3779B97F4A7C15 & _MASK  # odd: distinct positions give distinct keys per stream


class IndexStream:
    def __init__(self, n: int, batch: int, seed: int, stream: int, sampling: str = "epoch"):
        if n < 1:
            raise ValueError("cannot sample from an empty data set")
        self.n, self.batch, self.seed, self.stream, self.sampling = n, batch, seed, stream, sampling
        self._epoch, self._perm = -1, None
        self._key_base = head_seed(seed, "augment", stream)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(head_seed(self.seed, "data", self.stream, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """Sample indices of this stream's batch at `step`."""
        if self.sampling == "random":
            gen = torch.Generator().manual_seed(head_seed(self.seed, "data", self.stream, step))
            return torch.randint(self.n, (self.batch,), generator=gen)
        out, pos, end = [], step * self.batch, (step + 1) * self.batch
        while pos < end:
            epoch, offset = divmod(pos, self.n)
            take = min(end - pos, self.n - offset)
            out.append(self._permutation(epoch)[offset:offset + take])
            pos += take
        return torch.cat(out)

    def keys(self, step: int) -> torch.Tensor:
        """Augmentation keys of this stream's batch at `step`."""
        positions = torch.arange(step * self.batch, (step + 1) * self.batch, dtype=torch.int64)
        return (positions * _MULT + self._key_base) & _MASK  # int64 arithmetic wraps; the mask keeps it >= 0


class HeadBatches:
    """The batches of a contiguous range of streams, concatenated in order (head h -> slice h)."""

    def __init__(self, n: int, per_head: int, seed: int, heads: range, sampling: str = "epoch"):
        self.streams = [IndexStream(n, per_head, seed, g, sampling) for g in heads]

    def indices(self, step: int) -> torch.Tensor:
        return torch.cat([s.indices(step) for s in self.streams])

    def keys(self, step: int) -> torch.Tensor:
        return torch.cat([s.keys(step) for s in self.streams])
