"""torchvision's VisionTransformer (the paper's implementation) made trainable by LTE.

torchvision's attention is an nn.MultiheadAttention, which multiplies by its fused `in_proj_weight`
directly instead of calling nn.Linear, so LoRA heads cannot attach to it and lte.prepare refuses
it. `linear_attention(model)` replaces every nn.MultiheadAttention with `LinearAttention`: the
same computation from three nn.Linear projections (q, k, v: the rows of in_proj_weight) and the
original out_proj, holding the same weights, so the model's outputs are unchanged (the paper:
"we replace the fused linear layers with standard linear layers"). `fused_state_dict` maps a
state_dict of the converted model (lte.export's output, say) back to torchvision's keys.

    model = torchvision.models.vit_b_32(num_classes=100)
    linear_attention(model)                 # in place; then lte.prepare(model, cfg)
    tv = torchvision.models.vit_b_32(num_classes=100)
    tv.load_state_dict(fused_state_dict(lte.export(model)))

model.name=tv_vit_s_32 | tv_vit_b_32 | tv_vit_l_32 builds the paper's ViT-S/B/L with patch 32
(Table 2) this way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register


class LinearAttention(nn.Module):
    """Multi-head self-/cross-attention with separate nn.Linear projections; the forward of
    nn.MultiheadAttention (without masks), returning (output, None)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, batch_first: bool = False,
                 bias: bool = True, kdim: int | None = None, vdim: int | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> "LinearAttention":
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn has no linear equivalent here")
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.batch_first, bias=mha.in_proj_bias is not None,
                  kdim=mha.kdim, vdim=mha.vdim)
        with torch.no_grad():
            if mha.in_proj_weight is not None:  # one packed q, k, v projection
                q, k, v = mha.in_proj_weight.chunk(3)
            else:
                q, k, v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for proj, w in ((new.q_proj, q), (new.k_proj, k), (new.v_proj, v)):
                proj.weight.copy_(w)
            if mha.in_proj_bias is not None:
                for proj, b in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3)):
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new.to(mha.out_proj.weight.device)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or attn_mask is not None or need_weights or is_causal:
            raise NotImplementedError("LinearAttention supports unmasked attention without returned weights "
                                      "(what torchvision's ViT uses)")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n, _ = query.shape
        h = self.num_heads

        def split(x):
            return x.reshape(b, x.shape[1], h, -1).transpose(1, 2)

        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def linear_attention(model: nn.Module) -> nn.Module:
    """Replace every nn.MultiheadAttention of `model` by an equivalent LinearAttention, in place."""
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, LinearAttention.from_multihead(module))
    return model


def fused_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A converted model's state_dict with each attention's q/k/v projections fused back into
    torchvision's in_proj_weight / in_proj_bias (loads into the unconverted model)."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".q_proj.weight")]:
        prefix = key[: -len("q_proj.weight")]
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{prefix}{p}_proj.{kind}", None) for p in "qkv"]
            if all(p is not None for p in parts):
                out[f"{prefix}in_proj_{kind}"] = torch.cat(parts)
    return out


# Table 2 of the paper: (layers, heads, hidden, MLP)
TV_VITS = {"tv_vit_s_32": (12, 6, 384, 1536), "tv_vit_b_32": (12, 12, 768, 3072), "tv_vit_l_32": (24, 16, 1024, 4096)}


def _tv_vit(name: str):
    layers, heads, hidden, mlp = TV_VITS[name]

    def build(num_classes: int = 1000, img_size: int = 224, patch_size: int = 32, num_layers: int = layers,
              num_heads: int = heads, hidden_dim: int = hidden, mlp_dim: int = mlp, dropout: float = 0.0,
              attention_dropout: float = 0.0) -> nn.Module:
        from torchvision.models.vision_transformer import VisionTransformer

        return linear_attention(VisionTransformer(
            image_size=img_size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
            hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes, dropout=dropout,
            attention_dropout=attention_dropout))

    build.__name__ = name
    build.__doc__ = (f"torchvision's VisionTransformer, {layers} layers, {heads} heads, {hidden}/{mlp}, "
                     "attention of nn.Linear.")
    return register(build)


for _name in TV_VITS:
    _tv_vit(_name)
