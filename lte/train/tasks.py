"""What a task means for training and evaluation: the loss, and the metrics of an evaluation.

classification   outputs B x C, targets B:        cross-entropy; eval loss and accuracy
language_model   outputs B x T x V, targets B x T: per-token cross-entropy; eval loss and perplexity
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def logits(outputs) -> torch.Tensor:
    """A model's output as a tensor: itself, or the .logits of a transformers ModelOutput."""
    return outputs if isinstance(outputs, torch.Tensor) else outputs.logits


def loss(task: str, outputs, targets: torch.Tensor) -> torch.Tensor:
    """The mean loss of a batch (in fp32 whatever the autocast dtype of the outputs)."""
    outputs = logits(outputs)
    if task == "language_model":
        return F.cross_entropy(outputs.float().flatten(0, -2), targets.flatten())
    return F.cross_entropy(outputs.float(), targets)


class Metrics:
    """Sums over evaluation batches, turned into the task's metrics at the end."""

    def __init__(self, task: str):
        self.task = task
        self.loss_sum, self.correct, self.count = 0.0, 0, 0

    @torch.no_grad()
    def add(self, outputs, targets: torch.Tensor) -> None:
        scores = logits(outputs).float()
        scores = scores.flatten(0, -2) if self.task == "language_model" else scores
        flat = targets.flatten() if self.task == "language_model" else targets
        self.loss_sum += F.cross_entropy(scores, flat, reduction="sum").item()
        self.count += flat.numel()
        if self.task == "classification":
            self.correct += (scores.argmax(-1) == flat).sum().item()

    def result(self) -> dict:
        mean = self.loss_sum / max(self.count, 1)
        if self.task == "language_model":
            return {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}
        return {"loss": mean, "accuracy": self.correct / max(self.count, 1)}
