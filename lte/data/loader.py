"""Batches for the training loop and for evaluation, gathered in this process or in DataLoader
worker processes, delivered on the training device.

Training asks for the batch of step t, then t+1, ...: the batch of a step is a function of the
step alone (lte.data.streams), so the loader can run ahead of the trainer (workers decode the
next batches while the device computes) and restart at any step without reading what came
before. With W workers a step's batch is cut into W chunks, one per worker, so all workers build
the next step together (a whole ImageNet batch in one worker would take seconds and hold
gigabytes per prefetched step); each worker keeps PREFETCH chunks in flight, so the loader runs
PREFETCH steps ahead. Chunks are pinned by the DataLoader and copied to the device one by one.
Evaluation walks a fixed list of index chunks, the same at every evaluation, in worker processes
that persist between evaluations.

A data set's `device_transform` (uint8 images -> normalized floats, say) runs on the device, after
the copy, so what crosses the host-device link is the compact form.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..errors import UserError
from .streams import HeadBatches

PREFETCH = 2  # steps (training) or batches per worker (evaluation) gathered ahead of use


class _Gather:
    """What a DataLoader worker runs: one call fetches one whole chunk (DataLoader calls
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

    # Its own generator: creating an iterator must not draw from the trainer's global RNG.
    return DataLoader(_Gather(dataset), batch_sampler=_Singletons(requests), num_workers=workers, collate_fn=_unwrap,
                      pin_memory=pin_memory, persistent_workers=persistent, prefetch_factor=PREFETCH,
                      generator=torch.Generator())


class _Singletons:
    """Wraps each request of an iterable into a one-element list (a DataLoader batch_sampler)."""

    def __init__(self, requests):
        self.requests = requests

    def __iter__(self):
        return ([r] for r in self.requests)

    def __len__(self):
        return len(self.requests)


class _StepRequests:
    """(indices, keys) of the chunks of steps start .. stop-1 of some head streams."""

    def __init__(self, batches: HeadBatches, start: int, stop: int, chunks: int):
        self.batches, self.start, self.stop, self.chunks = batches, start, stop, chunks

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield from zip(self.batches.indices(step).tensor_split(self.chunks),
                           self.batches.keys(step).tensor_split(self.chunks))

    def __len__(self):
        return max(0, self.stop - self.start) * self.chunks


def _reraise(exc: UserError):
    """A data error raised in a worker comes back with the worker's traceback in its message;
    keep the original one-line message."""
    last = str(exc).strip().splitlines()[-1]
    name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    raise type(exc)(last[len(name):] if last.startswith(name) else last) from None


class _Delivery:
    """Moves host batches to the device and applies the data set's device transform."""

    def __init__(self, device: torch.device | None, transform: Callable | None):
        self.device = device or torch.device("cpu")
        self.transform = transform

    @property
    def pin(self) -> bool:
        return self.device.type == "cuda"

    def __call__(self, parts):
        xs = [x.to(self.device, non_blocking=True) for x, _ in parts]
        ys = [y.to(self.device, non_blocking=True) for _, y in parts]
        x, y = (xs[0], ys[0]) if len(parts) == 1 else (torch.cat(xs), torch.cat(ys))
        return (x if self.transform is None else self.transform(x)), y


class TrainBatches:
    """The training batches of one process's head streams, step by step, on `device`."""

    def __init__(self, dataset, batches: HeadBatches, *, steps: int, workers: int = 0,
                 device: torch.device | None = None, transform: Callable | None = None):
        self.dataset, self.batches, self.steps, self.workers = dataset, batches, steps, workers
        self.deliver = _Delivery(device, transform)
        self.chunks = max(1, min(workers, sum(s.batch for s in batches.streams)))
        self._iter: Iterator | None = None
        self._next_step = None

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of `step` (inputs, targets), on the device."""
        if self.workers == 0:
            return self.deliver([self.dataset.gather(self.batches.indices(step), self.batches.keys(step))])
        if self._iter is None or step != self._next_step:  # a fresh start, or a jump (resume)
            self.close()
            requests = _StepRequests(self.batches, step, self.steps, self.chunks)
            self._iter = iter(_loader(self.dataset, requests, self.workers, self.deliver.pin, persistent=False))
        self._next_step = step + 1
        try:
            parts = [next(self._iter) for _ in range(self.chunks)]
        except UserError as exc:
            _reraise(exc)
        return self.deliver(parts)

    def close(self) -> None:
        self._iter = None  # the DataLoader's workers stop when its iterator is collected


class EvalBatches:
    """A fixed list of evaluation batches: `limit` samples (all if None) spread evenly over the
    set, in chunks of batch_size, delivered on `device`. The same samples at every evaluation
    and in every mode."""

    def __init__(self, dataset, batch_size: int, limit: int | None = None, *, workers: int = 0,
                 device: torch.device | None = None, transform: Callable | None = None):
        n = len(dataset)
        count = n if limit is None else min(n, limit)
        picks = torch.arange(n) if count == n else torch.linspace(0, n - 1, count).round().long()
        self.samples = count
        self.requests = [(chunk, None) for chunk in picks.split(batch_size)]
        self.dataset, self.workers = dataset, workers
        self.deliver = _Delivery(device, transform)
        self._loader = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.workers == 0:
            return (self.deliver([self.dataset.gather(idx, keys)]) for idx, keys in self.requests)
        if self._loader is None:  # kept, with its worker processes, for the next evaluation
            self._loader = _loader(self.dataset, self.requests, self.workers, self.deliver.pin, persistent=True)
        return self._delivered(iter(self._loader))

    def _delivered(self, batches):
        try:
            for part in batches:
                yield self.deliver([part])
        except UserError as exc:
            _reraise(exc)
