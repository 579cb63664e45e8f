"""What every data set hands the trainer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class ArrayDataset:
    """Inputs and targets held in memory; a batch is a gather by index."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        assert len(inputs) == len(targets)
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[idx], self.targets[idx]


@dataclass
class DataBundle:
    train: ArrayDataset
    test: ArrayDataset
    task: str                                       # "classification" (accuracy is reported)
    model_args: dict = field(default_factory=dict)  # what the model must match (classes, channels...)
