"""Optimisation helpers that keep heads independent.

AdamW is elementwise, so one AdamW over the stacked head tensors is N independent AdamWs.
Gradient clipping is not: a global norm would let one head's large gradient shrink every other
head's step. Clipping here is per head, over that head's slice of every trainable tensor.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch


@torch.no_grad()
def head_grad_norms(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each head's gradient, over all tensors stacked on dim 0 (shape: heads)."""
    total = None
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).flatten(1).sum(1)
        total = sq if total is None else total + sq.to(total.device)
    if total is None:
        raise ValueError("no gradients to clip")
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_per_head_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each head's gradient so its norm is at most max_norm; returns the norms before."""
    params = [p for p in params if p.grad is not None]
    norms = head_grad_norms(params)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.device, p.grad.dtype).view(-1, *([1] * (p.dim() - 1))))
    return norms


def cosine_with_warmup(step: int, *, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine decay to min_ratio at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
