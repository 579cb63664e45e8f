"""Batches for the training loop and for evaluation, gathered in this process or in DataLoader
worker processes.

Training asks for the batch of step t, then t+1, ...: the batch of a step is a function of the
step alone (lte.data.streams), so the loader can run ahead of the trainer (workers decode the
next batches while the device computes) and restart at any step without reading what came
before. Evaluation walks a fixed list of index chunks, the same at every evaluation.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .streams import HeadBatches


class _Gather:
    """What a DataLoader worker runs: one call fetches one whole batch (DataLoader calls
    __getitems__ with the batch sampler's list, here a single (indices, keys) request)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitems__(self, requests):
        (indices, keys), = requests
        return self.dataset.gather(indices, keys)

    def __len__(self) -> int:
        return len(self.dataset)


def _unwrap(batch):
    return batch


def _loader(dataset, requests, workers: int, pin_memory: bool, persistent: bool):
    from torch.utils.data import DataLoader

    return DataLoader(_Gather(dataset), batch_sampler=_Singletons(requests), num_workers=workers, collate_fn=_unwrap,
                      pin_memory=pin_memory, persistent_workers=persistent, prefetch_factor=4)


class _Singletons:
    """Wraps each request of an iterable into a one-element list (a DataLoader batch_sampler)."""

    def __init__(self, requests):
        self.requests = requests

    def __iter__(self):
        return ([r] for r in self.requests)

    def __len__(self):
        return len(self.requests)


class _StepRequests:
    """(indices, keys) of steps start .. stop-1 of some head streams."""

    def __init__(self, batches: HeadBatches, start: int, stop: int):
        self.batches, self.start, self.stop = batches, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.batches.indices(step), self.batches.keys(step)

    def __len__(self):
        return max(0, self.stop - self.start)


class TrainBatches:
    """The training batches of one process's head streams, step by step."""

    def __init__(self, dataset, batches: HeadBatches, *, steps: int, workers: int = 0, pin_memory: bool = False):
        self.dataset, self.batches, self.steps = dataset, batches, steps
        self.workers, self.pin_memory = workers, pin_memory
        self._iter: Iterator | None = None
        self._next_step = None

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of `step` (inputs, targets), on the host."""
        if self.workers == 0:
            return self.dataset.gather(self.batches.indices(step), self.batches.keys(step))
        if self._iter is None or step != self._next_step:  # a fresh start, or a jump (resume)
            self.close()
            self._iter = iter(_loader(self.dataset, _StepRequests(self.batches, step, self.steps), self.workers,
                                      self.pin_memory, persistent=False))
        self._next_step = step + 1
        return next(self._iter)

    def close(self) -> None:
        self._iter = None  # the DataLoader's workers stop when its iterator is collected


class EvalBatches:
    """A fixed list of evaluation batches: `limit` samples (all if None) spread evenly over the
    set, in chunks of batch_size. The same samples at every evaluation and in every mode."""

    def __init__(self, dataset, batch_size: int, limit: int | None = None, *, workers: int = 0,
                 pin_memory: bool = False):
        n = len(dataset)
        count = n if limit is None else min(n, limit)
        picks = torch.arange(n) if count == n else torch.linspace(0, n - 1, count).round().long()
        self.samples = count
        self.requests = [(chunk, None) for chunk in picks.split(batch_size)]
        self.dataset, self.workers, self.pin_memory = dataset, workers, pin_memory
        self._loader = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.workers == 0:
            return (self.dataset.gather(idx, keys) for idx, keys in self.requests)
        if self._loader is None:  # kept, with its worker processes, for the next evaluation
            self._loader = _loader(self.dataset, self.requests, self.workers, self.pin_memory, persistent=True)
        return iter(self._loader)

