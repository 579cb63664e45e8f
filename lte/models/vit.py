"""Vision Transformers, built with timm (its attention is made of nn.Linear, which LTE needs)."""
from __future__ import annotations

from torch import nn

from .registry import register


@register
def vit_digits(num_classes: int = 10, in_chans: int = 1, img_size: int = 8, patch_size: int = 2,
               embed_dim: int = 64, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0) -> nn.Module:
    """A small ViT for 8x8 digits: 16 patches of 2x2 plus a class token; no dropout of any kind,
    so runs in different modes are comparable exactly."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                             num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, drop_rate=0.0,
                             attn_drop_rate=0.0, drop_path_rate=0.0)
