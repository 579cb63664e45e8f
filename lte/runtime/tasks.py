"""What a task means for training and evaluation: the loss, and the metrics of an evaluation.

classification   outputs B x C, targets B:        cross-entropy; eval loss and accuracy
language_model   outputs B x T x V, targets B x T: per-token cross-entropy; eval loss and perplexity

In training, a language model's loss runs over the vocabulary a chunk of positions at a time
(TrainingLoss.of): the model's output layer is held back while the model runs, and each chunk's
logits are computed, used and freed, then computed again in backward (activation
checkpointing), so the batch's B x T x V logits never exist at once. Every chunk's backward also
writes the output layer's parameter gradient (and casts it to fp32 and adds it to the previous
chunks'), so a chunk whose logits are smaller than that gradient spends more on it than on its
logits: a chunk holds at least as many fp32 logits as the layer has trainable values (an LTE
output layer's 32 heads of rank 64 over GPT-2's 50,304 tokens: 103M values, 6.5 chunks' worth of
the default 64 MiB).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def logits(outputs) -> torch.Tensor:
    """A model's output as a tensor: itself, or the .logits of a transformers ModelOutput."""
    return outputs if isinstance(outputs, torch.Tensor) else outputs.logits


def loss(task: str, outputs, targets: torch.Tensor) -> torch.Tensor:
    """The mean loss of a batch (in fp32 whatever the autocast dtype of the outputs)."""
    outputs = logits(outputs)
    if task == "language_model":
        return F.cross_entropy(outputs.float().flatten(0, -2), targets.flatten())
    return F.cross_entropy(outputs.float(), targets)


class TrainingLoss:
    """The training loss of a task: run the model's forward inside `forward_mode()`, then call the
    loss on its outputs."""

    def __init__(self, task: str):
        self.task = task

    @staticmethod
    def of(task: str, model: nn.Module, chunk_mb: float) -> TrainingLoss:
        """The loss for `model`: chunked cross-entropy for a language model whose output layer can
        be found (chunk_mb > 0: the fp32 logits one chunk may hold, at least the layer's trainable
        values' fp32 bytes: see the module docstring), else the plain loss."""
        head = output_layer(model) if task == "language_model" and chunk_mb > 0 else None
        if head is None:
            return TrainingLoss(task)
        gradient = sum(p.numel() for p in head.parameters() if p.requires_grad) * 4
        return ChunkedLMLoss(head, max(int(chunk_mb * 2**20), gradient))

    def forward_mode(self):
        return contextlib.nullcontext()

    def __call__(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        return loss(self.task, outputs, targets)


class ChunkedLMLoss(TrainingLoss):
    """Cross-entropy over the vocabulary a chunk of positions at a time (see the module docstring)."""

    def __init__(self, head: nn.Module, chunk_bytes: int):
        super().__init__("language_model")
        self.head, self.chunk_bytes = head, chunk_bytes

    @contextlib.contextmanager
    def forward_mode(self):
        """The output layer returns its input: the model's output is its last hidden states."""
        own = self.head.__dict__.get("forward")  # an instance-level forward of its own, if any
        self.head.forward = _identity
        try:
            yield
        finally:
            if own is None:
                del self.head.forward
            else:
                self.head.forward = own

    def __call__(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        hidden = logits(outputs)  # B x T x C: the held-back output layer's input
        batch, positions = targets.shape
        vocab = self.head.out_features
        step = max(1, self.chunk_bytes // (batch * vocab * 4))
        if step >= positions:  # the whole batch's logits fit in one chunk: nothing to recompute
            return loss(self.task, self.head(hidden), targets)
        total = sum(checkpoint(self._chunk, hidden[:, t:t + step], targets[:, t:t + step], use_reentrant=False)
                    for t in range(0, positions, step))
        return total / targets.numel()

    def _chunk(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = self.head(hidden).float()
        return F.cross_entropy(out.flatten(0, -2), targets.flatten(), reduction="sum")


def _identity(x, *args, **kwargs):
    return x


def output_layer(model: nn.Module) -> nn.Module | None:
    """A language model's output layer: a transformers model's output embeddings, else the last
    module named lm_head or head that maps to the vocabulary (has out_features)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        named = [m for name, m in model.named_modules() if name.rpartition(".")[2] in ("lm_head", "head")]
        head = named[-1] if named else None
    return head if isinstance(getattr(head, "out_features", None), int) else None


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
