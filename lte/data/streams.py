"""Deterministic mini-batch streams, one per head.

Head g's batch at step t depends only on (seed, g, t): positions t*b .. t*b+b-1 of an endless
sequence of per-epoch shuffles of the training set. So the same head sees the same batches in a
simulated run, on a parameter-server worker, or after a restart from a checkpoint at step t
(the data position of a stream is just the step).
"""
from __future__ import annotations

import torch

from ..core.init import head_seed


class IndexStream:
    def __init__(self, n: int, batch: int, seed: int, stream: int):
        if n < 1:
            raise ValueError("cannot sample from an empty data set")
        self.n, self.batch, self.seed, self.stream = n, batch, seed, stream
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(head_seed(self.seed, "data", self.stream, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """Sample indices of this stream's batch at `step`."""
        out, pos, end = [], step * self.batch, (step + 1) * self.batch
        while pos < end:
            epoch, offset = divmod(pos, self.n)
            take = min(end - pos, self.n - offset)
            out.append(self._permutation(epoch)[offset:offset + take])
            pos += take
        return torch.cat(out)


class HeadBatches:
    """The batches of a contiguous range of heads, concatenated in head order (head h -> slice h)."""

    def __init__(self, n: int, per_head: int, seed: int, heads: range):
        self.streams = [IndexStream(n, per_head, seed, g) for g in heads]

    def indices(self, step: int) -> torch.Tensor:
        return torch.cat([s.indices(step) for s in self.streams])
