"""A GPT language model in the style of nanoGPT: token and learned position embeddings, pre-norm
transformer blocks (causal self-attention, GELU MLP), a final LayerNorm and an output layer.

Every projection is an nn.Linear (the attention's query/key/value projection is one Linear of
width 3C, as in GPT-2), so lte.prepare puts LoRA heads on all of them. The position table is a
(1, block_size, C) parameter of the model rather than an nn.Embedding: a parameter with a leading
dimension of 1 is what LTE can replicate per head on a module with children, and it is indexed
the same way with or without heads.

The output layer is never tied to the token embedding (see docs/models.md, "Tied embeddings"): LTE keeps
one base per layer, and the full-rank baseline is built the same way so that both train the same
model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..core import named_generator
from .registry import register


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024       # longest sequence the position table covers
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_ratio: float = 4.0       # MLP hidden width = mlp_ratio * n_embd
    bias: bool = True            # biases in the Linear and LayerNorm layers (GPT-2 has them)
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids (B x T, T <= block_size) -> next-token logits (B x T x vocab_size)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.block_size, self.vocab_size = cfg.block_size, cfg.vocab_size
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # the seed of the build (torch.manual_seed's; build_model gives the run's) draws each parameter
        for name, p in self.named_parameters():
            self.init_parameter(name, p, torch.initial_seed())

    @torch.no_grad()
    def init_parameter(self, name: str, t: torch.Tensor, seed: int) -> None:
        """Parameter `name`'s initial value into `t` (on the CPU), from a generator of its own seeded by
        (seed, name): the same whether the model is built whole or a tensor at a time (the shards of a
        parameter server build only their own: lte.runtime.model.init_tensors). GPT-2's scheme: N(0, 0.02)
        everywhere, zero biases, unit LayerNorm scales, and the projections that write into the residual
        stream scaled down by sqrt(2 * n_layer) so the stream's variance stays put."""
        path, _, attr = name.rpartition(".")
        module = self.get_submodule(path)
        if attr == "bias":
            t.zero_()
        elif isinstance(module, nn.LayerNorm):
            t.fill_(1.0)
        else:
            residual = path.endswith(("attn.proj", "mlp.proj"))
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02
            t.normal_(0.0, std, generator=named_generator(seed, name))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"a sequence of {T} tokens is longer than the model's block_size={self.block_size}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, :T])
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _build(defaults: dict, overrides: dict) -> GPT:
    names = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown GPT argument(s) {unknown}; GPTConfig takes {sorted(names)}")
    return GPT(GPTConfig(**{**defaults, **overrides}))


@register
def gpt(**kwargs) -> GPT:
    """Any GPT shape: every GPTConfig field as a keyword (defaults: the GPT-2 124M shape)."""
    return _build({}, kwargs)


@register
def gpt_mini(**kwargs) -> GPT:
    """The paper's MiniGPT (Table 4; nanoGPT's Shakespeare-char model): 6 layers, 6 heads, 384 wide,
    block 256, no biases; 10.7M parameters with a 65-character vocabulary."""
    return _build(dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, bias=False), kwargs)


@register
def gpt2(**kwargs) -> GPT:
    """GPT-2 small (Table 4): 12 layers, 12 heads, 768 wide, block 1024, vocabulary 50304 (GPT-2's
    50257 padded to a multiple of 64)."""
    return _build(dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True), kwargs)


@register
def gpt_tiny(**kwargs) -> GPT:
    """A character-level GPT that trains on a 2-core CPU in minutes: 4 layers, 4 heads, 128 wide,
    block 64."""
    return _build(dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=True), kwargs)
