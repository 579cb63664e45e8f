"""What an LTE layer's heads keep for backward: per-worker activation-memory options.

A head computes y_h = x_h W^T + s x_h A_h^T B_h^T. Backward needs, per head,
    dB_h = s g_h^T (x_h A_h^T)     the rank-sized product x A^T,
    dA_h = s (g_h B_h)^T x_h       the layer's input x, as wide as the layer,
    dx_h = g_h W + s g_h B_h A_h   only weights.
The input x is what costs memory; the options differ in what they keep of it:

  full     x and x A^T, as plain LoRA does (autograd's bmm/baddbmm).
  lora_fa  A is frozen (LoRA-FA): there is no dA, so only x A^T is kept, never x. In LTE a frozen
           A must be re-drawn at every merge, or the merged weights would only ever move inside the
           fixed span of the heads' A rows (docs/memory.md: the least-squares table); lte.core.reset_heads
           does that, and the parameter server re-draws the same A itself from (seed, layer, head,
           draw), so a LoRA-FA worker uploads B only.
  velora   VeLoRA: x is cut into sub-tokens of M values, each stored as its projection z = <x_g, v>
           on a fixed unit vector v (one per head and layer), so the kept input shrinks by M.
           Backward rebuilds x^ = z v^T for dA; dB and dx stay exact. v is the normalised mean
           sub-token of the head's first training slice, then frozen; it is a buffer of the layer
           ("velora_v", heads x M), so checkpoints and parameter-server workers agree on it.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

ACTIVATIONS = ("full", "lora_fa", "velora")
# Sub-token size M: the VeLoRA paper's choice for pre-training from scratch (its section 4.5, LLaMA
# 60M and 130M on C4, d_model 256-768). Its fine-tuning runs use smaller M (16 for ViT-B and
# RoBERTa-base adapters, 32 for LLaMA-7B); a smaller M keeps more of x.
DEFAULT_VELORA_SUBTOKEN = 128


def check_activations(activations: str, reset: str, *, key: str = "activations", reset_key: str = "reset") -> None:
    """Refuse an unknown option, or a combination that means nothing, saying why."""
    if isinstance(activations, str) and "lora_fa" in activations and "velora" in activations:
        raise ConfigError(f"{key}={activations!r}: VeLoRA cannot be combined with LoRA-FA: with A frozen there "
                          "is no A gradient, so the layer input it would compress is not kept at all; use "
                          "lora_fa or velora")
    if activations not in ACTIVATIONS:
        raise ConfigError(f"{key} must be one of {ACTIVATIONS}, got {activations!r}")
    if activations == "lora_fa" and reset == "none":
        raise ConfigError(f"{key}=lora_fa cannot run with {reset_key}=none: LoRA-FA freezes A, and in LTE a frozen A "
                          "must be re-drawn at every merge (a kept frozen A confines the weights to the span of "
                          "the heads' A rows), while reset=none keeps A and B across merges; use reset=b or ab")


def check_subtoken(m, *, key: str = "velora_subtoken") -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"{key} must be an integer >= 1, got {m!r}")


def head_product(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                 v: torch.Tensor | None = None) -> torch.Tensor:
    """y + s x A^T B^T per head (y: heads x rows x out, x: heads x rows x in); VeLoRA if v is given.

    full and lora_fa are the same autograd ops: with A frozen, autograd's bmm keeps A, not x
    (tests/test_activations.py checks what is saved).
    """
    if v is None or not A.requires_grad:  # nothing needs x when A is frozen (e.g. a chunk's proxy)
        return torch.baddbmm(y, torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2), alpha=scale)
    out, _, _ = _VeLoRAHead.apply(y, x, A, B, v, scale)
    return out


@torch.no_grad()
def init_subtoken_vectors(v: torch.Tensor, x: torch.Tensor) -> None:
    """Set each head's v (still zero) to its normalised mean sub-token over x (heads x rows x in);
    heads whose v is already set keep it. Branch-free, so a compiled step stays one graph."""
    m = v.shape[1]
    mean = x.detach().float().reshape(x.shape[0], -1, m).mean(1)
    norm = mean.norm(dim=1, keepdim=True)
    uniform = torch.full_like(mean, m ** -0.5)  # a zero mean sub-token has no direction
    fresh = torch.where(norm > 0, mean / norm.clamp_min(1e-30), uniform)
    unset = (v == 0).all(dim=1, keepdim=True)
    v.copy_(torch.where(unset, fresh.to(v.dtype), v))


def compress(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """z[h, row, g] = <x[h, row, g*M:(g+1)*M], v[h]>: one number per sub-token."""
    n, rows, d = x.shape
    m = v.shape[1]
    return torch.einsum("nrgm,nm->nrg", x.reshape(n, rows, d // m, m), v.to(x.dtype))


def rebuild(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x^ = z v^T, sub-token by sub-token, back to heads x rows x in."""
    n, rows, groups = z.shape
    return (z.unsqueeze(-1) * v.to(z.dtype)[:, None, None, :]).reshape(n, rows, groups * v.shape[1])


class _VeLoRAHead(torch.autograd.Function):
    """baddbmm(y, x A^T, B^T, alpha=s), keeping x only as its sub-token projections."""

    @staticmethod
    def forward(y, x, A, B, v, scale):
        xa = torch.bmm(x, A.transpose(1, 2))
        out = torch.baddbmm(y, xa, B.transpose(1, 2), alpha=scale)
        return out, xa, compress(x, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # Separate from forward so torch.compile traces it into the step's graph.
        _, _, A, B, v, scale = inputs
        _, xa, z = output
        ctx.mark_non_differentiable(xa, z)
        ctx.scale = scale
        ctx.save_for_backward(xa, z, A, B, v)

    @staticmethod
    def backward(ctx, grad, _grad_xa, _grad_z):
        xa, z, A, B, v = ctx.saved_tensors
        s = ctx.scale
        gb = torch.bmm(grad, B) * s                                   # heads x rows x rank
        grad_x = torch.bmm(gb, A) if ctx.needs_input_grad[1] else None
        grad_A = torch.bmm(gb.transpose(1, 2), rebuild(z, v)) if ctx.needs_input_grad[2] else None
        grad_B = torch.bmm(grad.transpose(1, 2), xa) * s if ctx.needs_input_grad[3] else None
        return grad, grad_x, grad_A, grad_B, None, None
