"""Initialisation of LoRA factors (LTE paper, section 3.3).

A is semi-orthogonal and scaled by sqrt(d_out / d_in) (Bernstein et al., 2023), drawn
independently per head; B starts at zero so a fresh head does not change the model.
Each draw is seeded by (seed, layer, global head, draw) alone, so a head gets the same A
whether it runs in a simulated batch of 32 heads or alone on a worker of a parameter server.
"""
from __future__ import annotations

import hashlib
import math

import torch


def head_seed(seed: int, layer: str, head: int, draw: int = 0) -> int:
    """A stable 63-bit seed for one head of one layer (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{seed}/{layer}/{head}/{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def named_generator(seed: int, name: str, purpose: str = "base") -> torch.Generator:
    """A CPU generator of its own for tensor `name`, seeded by (seed, name, purpose) alone: a tensor
    drawn from it is the same whether its model is built whole or one tensor at a time."""
    digest = hashlib.blake2b(f"{seed}/{name}/{purpose}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def semi_orthogonal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A rows x cols matrix with orthonormal rows (or columns), times sqrt(rows / cols)."""
    gauss = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r))  # sign fix makes the draw uniform over the Stiefel manifold
    m = q if rows >= cols else q.T
    return (m * math.sqrt(rows / cols)).float()


@torch.no_grad()
def init_lora_A(A: torch.Tensor, layer: str, seed: int, first_head: int, draw: int = 0,
                heads: list[int] | None = None) -> None:
    """Fill A (heads x rank x in) in place, head h from head_seed(seed, layer, first_head + h, draw)."""
    for h in (range(A.shape[0]) if heads is None else heads):
        gen = torch.Generator().manual_seed(head_seed(seed, layer, first_head + h, draw))
        A[h].copy_(semi_orthogonal(A.shape[1], A.shape[2], gen))
