"""The LTE hyper-parameters that shape a prepared model, its memory options included."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..errors import ConfigError
from ..memory import FORMATS, Activations, BaseFormat, check_reset, get_activations, get_format
from ..memory.activations import DEFAULT_VELORA_SUBTOKEN

RESETS = ("b", "none", "ab")
OTHER_PARAMS = ("replica", "frozen", "replica_all")
EMBEDDINGS = ("replica", "lte")


@dataclass(frozen=True)
class LTEConfig:
    """How `lte.prepare` turns a model into N parallel LoRA heads.

    heads:        number of heads N held by this model (all of them in simulated mode, the
                  local ones on a worker).
    rank:         LoRA rank r of every head.
    alpha:        LoRA alpha; the head output is scaled by s = alpha / rank. The paper uses
                  alpha=4096 (s=64 at rank 64) with a lower learning rate.
    reset:        what a merge does to the heads afterwards: "b" zeroes B and keeps A and the
                  optimizer state (paper Alg. 1); "ab" also re-draws A; "none" keeps both and
                  merges only what changed since the previous merge.
    other_params: trainable parameters outside the linear layers (norm affine, biases, embeddings,
                  position embeddings, class tokens): "replica" trains one copy per head and
                  averages them at merge; "frozen" keeps them at their initial value. A weight of
                  2 or more dimensions on a module type lte does not know (not a linear layer it
                  recognises, an embedding or a convolution) is refused with "replica", since a
                  full-rank copy per head is what LTE exists to avoid; "replica_all" accepts it.
    patch_conv:   turn a Conv2d whose kernel equals its stride (a ViT/Mixer patch embedding)
                  into an LTE linear; other convolutions follow `other_params`.
    embeddings:   an nn.Embedding (a token embedding) as "replica" (a trained copy of the whole table
                  per head, as other_params says) or "lte": an LTE layer, low-rank heads on a frozen
                  base table like every linear layer's (its lookup W[idx] + s (B A)^T[idx]).
    seed:         seeds each head's A; head g of layer L draws from (seed, L, g) only, so the
                  same head is initialised the same wherever it runs.

    The memory options of the model that holds these heads (lte.memory; docs/memory.md):
    base:            how the frozen base weights are stored: fp32 (the default; the model can merge
                     by itself), bf16, or bitsandbytes nf4 / fp4 / int8 (a worker whose merged base
                     comes from a parameter server).
    activations:     what the heads keep for backward: "full", "lora_fa" (A frozen and re-drawn at
                     every merge) or "velora" (the input kept as sub-tokens of `velora_subtoken`
                     values projected on one vector; every LTE layer's input width must be a multiple
                     of it).
    velora_subtoken: VeLoRA's sub-token size M.
    overlap:         the heads keep, in their forward, their factors of the round whose merge is
                     in flight (comm.overlap; lte.core.overlap): buffers of the heads' size.
    """

    heads: int = 1
    rank: int = 8
    alpha: float = 16.0
    reset: str = "b"
    other_params: str = "replica"
    patch_conv: bool = True
    embeddings: str = "replica"
    seed: int = 0
    base: str = "fp32"
    activations: str = "full"
    velora_subtoken: int = DEFAULT_VELORA_SUBTOKEN
    overlap: bool = False

    def __post_init__(self):
        _require_int(self, "heads", minimum=1)
        _require_int(self, "rank", minimum=1)
        _require_int(self, "seed", minimum=0)
        _require_int(self, "velora_subtoken", minimum=1)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"LTEConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if self.reset not in RESETS:
            raise ConfigError(f"LTEConfig.reset must be one of {RESETS}, got {self.reset!r}")
        if self.other_params not in OTHER_PARAMS:
            raise ConfigError(
                f"LTEConfig.other_params must be one of {OTHER_PARAMS}, got {self.other_params!r}")
        if not isinstance(self.patch_conv, bool):
            raise ConfigError(f"LTEConfig.patch_conv must be true or false, got {self.patch_conv!r}")
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"LTEConfig.overlap must be true or false, got {self.overlap!r}")
        if self.embeddings not in EMBEDDINGS:
            raise ConfigError(f"LTEConfig.embeddings must be one of {EMBEDDINGS}, got {self.embeddings!r}")
        if self.base not in FORMATS:
            raise ConfigError(f"LTEConfig.base must be one of {tuple(FORMATS)}, got {self.base!r}")
        check_reset(self.activation_option, self.reset, key="LTEConfig.activations")

    @property
    def activation_option(self) -> Activations:
        """The activations option object (lte.memory.activations), with its settings."""
        return get_activations(self.activations, {"velora_subtoken": self.velora_subtoken},
                               key="LTEConfig.activations")

    def base_format(self) -> BaseFormat:
        """The base format object (lte.memory.base_formats); quantized ones import bitsandbytes."""
        return get_format(self.base)

    @property
    def scale(self) -> float:
        """s = alpha / rank, the factor on every head's B A x."""
        return float(self.alpha) / self.rank

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _require_int(cfg, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"LTEConfig.{name} must be an integer >= {minimum}, got {value!r}")
