"""What an LTE layer's heads keep for backward: per-worker activation-memory options.

A head computes y_h = x_h W^T + s x_h A_h^T B_h^T. Backward needs, per head,
    dB_h = s g_h^T (x_h A_h^T)     the rank-sized product x A^T,
    dA_h = s (g_h B_h)^T x_h       the layer's input x, as wide as the layer,
    dx_h = g_h W + s g_h B_h A_h   only weights.
The input x is what costs memory; the options differ in what they keep of it:

  full     x and x A^T, as plain LoRA does.
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

Each option is one class answering what the rest of the code asks (does A train, is it re-drawn at
a merge, what extra state a layer keeps, which resets it refuses, how it describes itself, what the
LTE layer's function keeps of x for A's gradient and how it gets x back from that) and declaring
its settings (lte.memory.settings: VeLoRA's M); `ACTIVATIONS` is the registry a name is looked up
in. A new option, with its settings, is one class and one registry line.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch

from ..errors import ConfigError
from .settings import Setting

VELORA_KEY = "velora_v"


class Activations:
    """An activation option: what the heads of every LTE layer keep for backward."""

    name: ClassVar[str] = ""
    trains_A: ClassVar[bool] = True    # False: A is frozen; autograd keeps x A^T, never x
    redraws_A: ClassVar[bool] = False  # A is drawn afresh at every merge
    # options it cannot be combined with, and why
    excludes: ClassVar[dict[type[Activations], str]] = {}
    # its settings: keyword arguments of the class, and fields of every config that holds the option
    settings: ClassVar[tuple[Setting, ...]] = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        # A frozen A is never uploaded: the parameter server re-draws it from (seed, layer, head,
        # merges), which is the A the worker holds only if the worker re-draws it at every merge too.
        if not cls.trains_A and not cls.redraws_A:
            raise TypeError(f"activations option {cls.__name__}: a frozen A must be re-drawn at every merge")

    @classmethod
    def configured(cls, values: Mapping) -> Activations:
        """The option with its settings taken from `values` (a config's fields, by key)."""
        return cls(**{s.key: values.get(s.key, s.default) for s in cls.settings})

    def reset_refusal(self, reset: str) -> str | None:
        """Why this option cannot run with LTEConfig.reset=`reset`; None if it can."""
        return None

    def layer_state(self, heads: int) -> dict[str, tuple[int, ...]]:
        """Extra buffers every LTE layer keeps (name: shape), zero at first; they travel in the
        state_dict, checkpoints and a worker's state, never in an export."""
        return {}

    def check_widths(self, widths: dict[str, int]) -> None:
        """Refuse LTE layers (path: input width) the option cannot run on."""

    def describe(self) -> str:
        return self.name

    def keep_for_A(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """What backward keeps of the heads' input x (heads x rows x in) for A's gradient (the LTE
        layer's function asks only when A trains); `state` holds the layer's buffers named by
        layer_state()."""
        return x

    def input_for_A(self, kept: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The input A's gradient is computed with, from what keep_for_A kept."""
        return kept


class Full(Activations):
    """x and x A^T, as plain LoRA keeps them."""

    name = "full"


class LoraFA(Activations):
    """LoRA-FA: A frozen, so only x A^T is kept: with no A gradient the LTE layer's function keeps
    nothing of x (tests/test_activations.py checks what is saved)."""

    name = "lora_fa"
    trains_A = False
    redraws_A = True  # a kept frozen A confines the merged weights to the span of its rows

    def reset_refusal(self, reset):
        if reset == "none":
            return ("LoRA-FA freezes A, and in LTE a frozen A must be re-drawn at every merge (a kept frozen A "
                    "confines the weights to the span of the heads' A rows), while reset=none keeps A and B "
                    "across merges; use reset=b or ab")
        return None


class VeLoRA(Activations):
    """x kept as one number per sub-token of M values: its projection on the head's vector v."""

    name = "velora"
    excludes = {LoraFA: "VeLoRA cannot be combined with LoRA-FA: with A frozen there is no A gradient, so the "
                        "layer input it would compress is not kept at all; use lora_fa or velora"}

    # Sub-token size M: the VeLoRA paper's choice for pre-training from scratch (its section 4.5, LLaMA
    # 60M and 130M on C4, d_model 256-768). Its fine-tuning runs use smaller M (16 for ViT-B and
    # RoBERTa-base adapters, 32 for LLaMA-7B); a smaller M keeps more of x.
    settings = (Setting("velora_subtoken", 128, 1, "VeLoRA's sub-token size M"),)

    def __init__(self, velora_subtoken: int = 128):
        self.subtoken = velora_subtoken

    def layer_state(self, heads):
        return {VELORA_KEY: (heads, self.subtoken)}

    def check_widths(self, widths):
        m = self.subtoken
        bad = [p for p, w in widths.items() if w % m]
        if bad:
            raise ConfigError(f"velora_subtoken={m} does not divide the input width {widths[bad[0]]} of LTE layer "
                              f"'{bad[0]}' (VeLoRA cuts each input token into sub-tokens of M values); every LTE "
                              f"layer's width is a multiple of {math.gcd(*widths.values())}: pick an M that divides it")

    def describe(self):
        return f"velora (M={self.subtoken})"

    def keep_for_A(self, x, state):
        v = state[VELORA_KEY]
        init_subtoken_vectors(v, x)
        return compress(x, v)

    def input_for_A(self, kept, state):
        return rebuild(kept, state[VELORA_KEY])


ACTIVATIONS: dict[str, type[Activations]] = {cls.name: cls for cls in (Full, LoraFA, VeLoRA)}


def get_activations(name: str, settings: Mapping | None = None, *, key: str = "activations") -> Activations:
    """The option called `name`, with its settings from `settings` (by key; defaults for the rest);
    an unknown name is refused, and a combination of options that exclude each other is refused
    saying why."""
    cls = ACTIVATIONS.get(name) if isinstance(name, str) else None
    if cls is None:
        named = [c for n, c in ACTIVATIONS.items() if isinstance(name, str) and n in name]
        for c in named:
            for other, why in c.excludes.items():
                if other in named:
                    raise ConfigError(f"{key}={name!r}: {why}")
        raise ConfigError(f"{key} must be one of {tuple(ACTIVATIONS)}, got {name!r}")
    return cls.configured(settings or {})


def check_reset(option: Activations, reset: str, *, key: str = "activations", reset_key: str = "reset") -> None:
    why = option.reset_refusal(reset)
    if why:
        raise ConfigError(f"{key}={option.name} cannot run with {reset_key}={reset}: {why}")


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
