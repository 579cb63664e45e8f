"""MLP-Mixers of the paper's Table 3, patch 32, built with timm's MlpMixer (its layers are nn.Linear).

Token MLP 0.5x and channel MLP 4x the embedding, as in timm and the Mixer paper:

    mixer_t32_224  Mixer-T/32   6 blocks, embed 384, MLP 1536   8.8M parameters (1000 classes)
    mixer_s32_224  Mixer-S/32   8 blocks, embed 512, MLP 2048  19.1M
    mixer_b32_224  Mixer-B/32  12 blocks, embed 768, MLP 3072  60.3M

Mixer-T/32 is not in timm. The S and B names are timm's, registered here again because timm's
constructors fix patch_size, embed_dim and num_blocks (no smaller test shapes); built with their
defaults, they are timm's model, the same keys and shapes, so `lte.export` of one loads into
`timm.create_model("mixer_s32_224")` with strict=True.
"""
from __future__ import annotations

from torch import nn

from .registry import register

MIXERS = {"mixer_t32_224": (384, 6), "mixer_s32_224": (512, 8), "mixer_b32_224": (768, 12)}


def _mixer(name: str):
    embed, blocks = MIXERS[name]

    def build(num_classes: int = 1000, img_size: int = 224, in_chans: int = 3, patch_size: int = 32,
              embed_dim: int = embed, num_blocks: int = blocks, **kwargs) -> nn.Module:
        from timm.models.mlp_mixer import MlpMixer

        return MlpMixer(num_classes=num_classes, img_size=img_size, in_chans=in_chans, patch_size=patch_size,
                        embed_dim=embed_dim, num_blocks=num_blocks, **kwargs)

    build.__name__ = name
    build.__doc__ = f"timm's MlpMixer, patch 32, {blocks} blocks of width {embed} (Table 3)."
    return register(build)


for _name in MIXERS:
    _mixer(_name)
