"""MLP-Mixers of the paper's Table 3, patch 32, built with timm's MlpMixer (its layers are nn.Linear).

Mixer-S/32 and Mixer-B/32 are timm's own `mixer_s32_224` and `mixer_b32_224` (use those names);
Mixer-T/32 is not in timm and is registered here. Token MLP 0.5x and channel MLP 4x the embedding,
as in timm and the Mixer paper:

    Mixer-T/32  6 blocks, embed 384, MLP 1536   8.8M parameters (1000 classes)
    Mixer-S/32  8 blocks, embed 512, MLP 2048  19.1M
    Mixer-B/32 12 blocks, embed 768, MLP 3072  60.3M
"""
from __future__ import annotations

from torch import nn

from .registry import register


@register
def mixer_t32_224(num_classes: int = 1000, img_size: int = 224, in_chans: int = 3, patch_size: int = 32,
                  embed_dim: int = 384, num_blocks: int = 6, **kwargs) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=num_classes, img_size=img_size, in_chans=in_chans, patch_size=patch_size,
                    embed_dim=embed_dim, num_blocks=num_blocks, **kwargs)
