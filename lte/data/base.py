"""What a data set hands the trainer: the contract every built-in and user data set meets.

A data set is a `DataBundle`:
  train, eval   two sample sets. Each has len() and gather(indices, keys) -> (inputs, targets),
                a whole batch at once; or is any map-style dataset whose [i] is (input, target),
                which `as_dataset` adapts. `keys` holds one 63-bit integer per sample for random
                augmentation (a function of (seed, head, step, position) only); sets without
                augmentation ignore it.
  task          "classification" (outputs B x C, targets B; eval: loss, accuracy) or
                "language_model" (outputs B x T x V, targets B x T; eval: loss, perplexity).
  model_args    constructor arguments the model must match (num_classes, vocab_size...), given
                to the model builder when it accepts them.
  sampling      how each head's stream draws training indices: "epoch" (a fresh shuffle of the
                whole set per epoch, per head) or "random" (uniform with replacement: the windows
                of a token file, too many to shuffle).
  workers       0: batches are gathered in the training process; N: in N DataLoader worker
                processes with pinned memory and prefetch (the sets must then be picklable).
  device_transform  None, or a function applied to each batch's inputs once they are on the
                device (e.g. uint8 images -> normalized floats, which keeps the host side and
                the copy 4x smaller); it runs in the training process, in every mode.
  tokenizer     language models: what turns text into the data's token ids and back, an object
                with encode(str) -> list[int] and decode(ids) -> str (lte.sample uses it); or None.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

TASKS = ("classification", "language_model")
SAMPLINGS = ("epoch", "random")


class ArrayDataset:
    """Inputs and targets held in memory; a batch is a gather by index."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def gather(self, idx, keys=None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.inputs[idx], self.targets[idx]


class MapDataset:
    """Adapts a map-style dataset (dataset[i] -> (input, target)) to gather()."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def gather(self, idx, keys=None):
        from torch.utils.data import default_collate

        return default_collate([self.dataset[int(i)] for i in idx])


def as_dataset(obj, what: str):
    """obj if it has gather(), a MapDataset if it is map-style, else a TypeError naming `what`."""
    if hasattr(obj, "gather") and hasattr(obj, "__len__"):
        return obj
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        return MapDataset(obj)
    raise TypeError(f"{what} must have len() and gather(indices) or be a map-style dataset "
                    f"(len() and [i] -> (input, target)), got {type(obj).__name__}")


@dataclass
class DataBundle:
    train: object
    eval: object
    task: str = "classification"
    model_args: dict = field(default_factory=dict)
    sampling: str = "epoch"
    workers: int = 0
    device_transform: Callable | None = None
    tokenizer: object = None

    def __post_init__(self):
        self.train = as_dataset(self.train, "DataBundle.train")
        self.eval = as_dataset(self.eval, "DataBundle.eval")
        if self.task not in TASKS:
            raise ValueError(f"DataBundle.task must be one of {TASKS}, got {self.task!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"DataBundle.sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"DataBundle.workers must be an integer >= 0, got {self.workers!r}")
        if self.device_transform is not None and not callable(self.device_transform):
            raise ValueError("DataBundle.device_transform must be callable, got "
                             f"{type(self.device_transform).__name__}")
        if len(self.train) < 1:
            raise ValueError("the training set is empty")
        if len(self.eval) < 1:
            raise ValueError("the evaluation set is empty")
