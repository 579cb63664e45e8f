"""Activation checkpointing (train.activation_checkpointing): blocks that keep only their input for
backward and run their forward again there, trading compute for the activations they would keep.

The blocks are the model's list of blocks as local chunks find it (lte.runtime.chunks.find_blocks:
a ViT's or Mixer's `blocks`, a GPT's, a transformers model's layers); every K-th of them gets an
instance-level forward that runs its own through torch.utils.checkpoint (non-reentrant, so it
composes with the LTE layers' functions, autocast, torch.compile and local chunks, which wrap the
same forward). In evaluation, or without gradients, a block runs as it is.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .chunks import find_blocks


def recompute_blocks(model: nn.Module, every: int) -> int:
    """Checkpoint every `every`-th block of the model (the first, then each `every` after it);
    returns how many."""
    _, blocks = find_blocks(model, key="train.activation_checkpointing")
    chosen = blocks[::every]
    for block in chosen:
        inner = block.__dict__.get("forward") or types.MethodType(type(block).forward, block)
        block.forward = types.MethodType(_recomputed(inner), block)
    return len(chosen)


def _recomputed(inner):
    def forward(self_, *args, **kwargs):
        if not (self_.training and torch.is_grad_enabled()):
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)
    return forward
