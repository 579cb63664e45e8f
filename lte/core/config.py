"""The LTE hyper-parameters that shape a prepared model, its memory options included."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, fields

from ..errors import ConfigError
from ..memory import FORMATS, SETTINGS, Activations, BaseFormat, check_reset, get_activations, get_format, with_settings

RESETS = ("b", "none", "ab")
OTHER_PARAMS = ("replica", "frozen", "replica_all")
EMBEDDINGS = ("replica", "lte")
PRODUCTS = ("auto", "factored", "merged")


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
    product:      how a layer's heads run in training: "factored" (the base product, then the heads'
                  low-rank products added), "merged" (each head's weight W + s B_h A_h, then one batched
                  product) or "auto" (the default: forward and backward each whichever writes and
                  computes less at the batch's rows a head, LTELinear.merges). The same values
                  either way, up to rounding.
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
    overlap:         the heads keep, in their forward, their factors of the round whose merge is
                     in flight (comm.overlap; lte.core.overlap): buffers of the heads' size.
    and one field per setting the memory options declare (lte.memory.SETTINGS), named by its key:
    velora_subtoken, VeLoRA's sub-token size M.

    names: how an error names a field (the run config passes its own keys: lte.heads,
    worker.base_dtype, ...); by default LTEConfig.<field>.
    """

    heads: int = 1
    rank: int = 8
    alpha: float = 16.0
    reset: str = "b"
    other_params: str = "replica"
    patch_conv: bool = True
    embeddings: str = "replica"
    product: str = "auto"
    seed: int = 0
    base: str = "fp32"
    activations: str = "full"
    overlap: bool = False
    names: InitVar[Mapping[str, str] | None] = None

    def __post_init__(self, names):
        def key(name: str) -> str:
            return (names or {}).get(name, f"LTEConfig.{name}")

        for name, minimum in (("heads", 1), ("rank", 1), ("seed", 0)):
            _require_int(getattr(self, name), key(name), minimum)
        for setting in SETTINGS.values():
            setting.check(getattr(self, setting.key), key(setting.key))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"{key('alpha')} must be a finite number > 0, got {self.alpha!r}")
        for name, choices in (("reset", RESETS), ("other_params", OTHER_PARAMS), ("embeddings", EMBEDDINGS),
                              ("product", PRODUCTS), ("base", tuple(FORMATS))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{key(name)} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("patch_conv", "overlap"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{key(name)} must be true or false, got {getattr(self, name)!r}")
        option = get_activations(self.activations, self.settings, key=key("activations"))
        check_reset(option, self.reset, key=key("activations"), reset_key=(names or {}).get("reset", "reset"))

    @property
    def settings(self) -> dict[str, int]:
        """The memory options' settings, by key."""
        return {k: getattr(self, k) for k in SETTINGS}

    @property
    def activation_option(self) -> Activations:
        """The activations option object (lte.memory.activations), with its settings."""
        return get_activations(self.activations, self.settings)

    def base_format(self) -> BaseFormat:
        """The base format object (lte.memory.base_formats); quantized ones import bitsandbytes."""
        return get_format(self.base, self.settings)

    @property
    def scale(self) -> float:
        """s = alpha / rank, the factor on every head's B A x."""
        return float(self.alpha) / self.rank

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


LTEConfig = with_settings(LTEConfig, SETTINGS, frozen=True)  # noqa: F811  (the declared settings as fields)


def _require_int(value, key: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
