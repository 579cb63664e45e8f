"""The LTE linear layer: a frozen base weight plus N LoRA heads stored stacked.

In training the batch is cut into N equal contiguous slices and head h sees slice h only:
    y[slice h] = x[slice h] W^T + s * x[slice h] A_h^T B_h^T (+ bias_h)
The base product runs once over the whole batch; the heads run as two batched matmuls
(bmm, then baddbmm accumulating into the base output). benchmarks/lte_layer.py compares this
with torch.func.vmap over a per-head function; the explicit form was faster (see docs/library.md,
"How the heads run").
In eval the layer is the merged linear alone: x W^T + b, for any batch size.

The base weight is stored in a format from lte.memory (fp32 by default; bf16 or a bitsandbytes
quantization on a parameter-server worker). Its main tensor keeps the name `weight`; a quantized
format adds scale tensors named weight_<part>. What the heads keep for backward is an activation
option from lte.memory.activations (full, lora_fa: A frozen, velora: compressed input).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BatchError, ModelError
from ..memory import Activations, BaseFormat, get_activations, get_format
from ..memory.base_formats import no_autocast

if TYPE_CHECKING:
    from .config import LTEConfig


CARRIED = ("lora_Ac", "lora_Bc")  # comm.overlap's carried factors (lte.core.overlap)


class LTELinear(nn.Module):
    """Replaces an nn.Linear; `weight` and `bias` keep their names and hold the merged values."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, heads: int, rank: int,
                 scale: float, train_bias: bool, resetless: bool, carry: bool = False, base: BaseFormat | None = None,
                 activations: Activations | None = None, transposed: bool = False):
        super().__init__()
        out_features, in_features = weight.shape  # the out x in matrix, whatever the original layout
        self.in_features, self.out_features = in_features, out_features
        self.transposed = transposed  # the original module stores in x out (transformers' Conv1D)
        self.heads, self.rank, self.scale = heads, rank, scale
        self.activations = activations or get_activations("full")
        self.base = base or get_format("fp32")
        self._parts = tuple(self.base.layout((out_features, in_features)))  # read on every forward
        for part, tensor in self.base.encode(weight.detach().float()).items():
            self.register_buffer(_buffer_name(part), tensor)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # The heads are trained in fp32 whatever the base is stored in.
        device = weight.device
        self.lora_A = nn.Parameter(torch.zeros(heads, rank, in_features, device=device),
                                   requires_grad=self.activations.trains_A)
        self.lora_B = nn.Parameter(torch.zeros(heads, out_features, rank, device=device))
        # the option's own state (VeLoRA's sub-token vector per head: zero until a first slice sets it)
        self._option_state = tuple(self.activations.layer_state(heads))
        for name, shape in self.activations.layer_state(heads).items():
            self.register_buffer(name, torch.zeros(shape, device=device))
        self.bias_heads = None
        if bias is not None and train_bias:
            self.bias_heads = nn.Parameter(bias.detach().expand(heads, out_features).clone())
        if resetless:
            # Factors as of the last merge: the head's effective weight is W + s (B A - B0 A0).
            self.register_buffer("lora_A0", torch.zeros_like(self.lora_A))
            self.register_buffer("lora_B0", torch.zeros_like(self.lora_B))
        else:
            self.lora_A0 = self.lora_B0 = None
        if carry:
            # comm.overlap: each head's factors of the round whose merge is in flight, kept in its
            # forward until that merge arrives (lte.core.overlap.CarriedRound)
            self.register_buffer("lora_Ac", torch.zeros_like(self.lora_A))
            self.register_buffer("lora_Bc", torch.zeros_like(self.lora_B))
        else:
            self.lora_Ac = self.lora_Bc = None

    @property
    def export_shape(self) -> tuple[int, ...]:
        """The shape of the original module's weight."""
        return (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)

    def export_weight(self) -> torch.Tensor:
        """The merged weight in the original module's layout."""
        w = self.dense_weight()
        return w.T.contiguous() if self.transposed else w.reshape(self.export_shape).clone()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def option_state(self) -> dict[str, torch.Tensor]:
        """The activations option's buffers, by name (empty for most options)."""
        return {name: getattr(self, name) for name in self._option_state}

    def payload(self) -> dict[str, torch.Tensor]:
        """The stored base weight, by format part ("" is the main tensor)."""
        return {part: getattr(self, _buffer_name(part)) for part in self._parts}

    @torch.no_grad()
    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.base.decode(self.payload(), self.shape, dtype)

    @torch.no_grad()
    def load_payload(self, payload: dict[str, torch.Tensor]) -> None:
        for part, target in self.payload().items():
            target.copy_(payload[part].reshape(target.shape))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of every head, with the last-merge snapshot folded in for reset="none" and the
        carried factors for comm.overlap (a head of rank r then runs at rank 2r)."""
        A, B = self.lora_A, self.lora_B
        if self.lora_A0 is not None:
            A, B = torch.cat([A, self.lora_A0], dim=1), torch.cat([B, -self.lora_B0], dim=2)
        if self.lora_Ac is not None:
            A, B = torch.cat([A, self.lora_Ac], dim=1), torch.cat([B, self.lora_Bc], dim=2)
        return A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.base.linear(x, self.payload(), self.shape, self.bias)
        n = self.heads
        if x.shape[0] % n:
            raise BatchError(f"an LTE layer got a batch of {x.shape[0]} rows, which does not split "
                             f"into {n} equal head slices")
        frozen_bias = self.bias if self.bias_heads is None else None
        y = self.base.linear(x, self.payload(), self.shape, frozen_bias)
        A, B = self.factors()
        x3 = x.reshape(n, -1, self.in_features)
        with no_autocast(x):  # in the base product's compute dtype (bf16 under autocast)
            yh = self.activations.head_product(y.view(n, -1, self.out_features), x3, A, B, self.scale,
                                               self.option_state())
        if self.bias_heads is not None:
            yh = yh + self.bias_heads.unsqueeze(1).to(yh.dtype)
        return yh.view(y.shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"heads={self.heads}, rank={self.rank}, scale={self.scale:g}, "
                f"activations={self.activations.describe()}")


class LTEPatchConv(LTELinear):
    """A Conv2d whose kernel equals its stride (a patch embedding), run as an LTE linear on patches."""

    def __init__(self, conv: nn.Conv2d, **kw):
        weight = conv.weight.detach()
        super().__init__(weight.reshape(weight.shape[0], -1), conv.bias, **kw)
        self.in_channels = conv.in_channels
        self.kernel_size = tuple(conv.kernel_size)

    @property
    def export_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ph, pw = self.kernel_size
        gh, gw = h // ph, w // pw  # a conv drops the remainder rows/columns too
        patches = (x[:, :, :gh * ph, :gw * pw].reshape(b, c, gh, ph, gw, pw)
                   .permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw))
        y = super().forward(patches)
        return y.transpose(1, 2).reshape(b, self.out_features, gh, gw)


@dataclass(frozen=True)
class LinearType:
    """A kind of module that is a linear map y = x W^T + b, which prepare turns into an LTE layer.
    Its weight is the parameter `weight` and its bias, if any, `bias` (the keys export writes)."""

    name: str
    matches: Callable[[nn.Module, LTEConfig], bool]  # (module, the LTEConfig) -> is one
    matrix: Callable[[nn.Module], torch.Tensor]      # its weight as the out x in matrix (a view)
    transposed: bool = False                         # its weight is stored in x out
    make: Callable[..., LTELinear] | None = None     # its own LTE layer class, if a plain one will not do
    lookup: bool = False                             # its input is indices (an embedding), not features

    def build(self, module: nn.Module, **layer_options) -> LTELinear:
        if self.make is not None:
            return self.make(module, **layer_options)
        bias = getattr(module, "bias", None)
        return LTELinear(self.matrix(module).detach(), None if bias is None else bias.detach(),
                         transposed=self.transposed, **layer_options)


LINEAR_TYPES: list[LinearType] = []  # the dispatcher prepare asks, in order


def register_linear(linear: LinearType) -> LinearType:
    """Teach prepare a module type that is a linear layer (see LinearType; ours are at the end of
    this file)."""
    LINEAR_TYPES.append(linear)
    return linear


def linear_type(module: nn.Module, cfg: LTEConfig) -> LinearType | None:
    return next((t for t in LINEAR_TYPES if t.matches(module, cfg)), None)


def _is_transformers_conv1d(module: nn.Module) -> bool:
    # by name, so that transformers stays an optional dependency
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


class LTEEmbedding(LTELinear):
    """An nn.Embedding as an LTE layer (LTEConfig.embeddings="lte"): a frozen base table in its
    storage format plus N low-rank heads, row i of head h's table being W[i] + s (B_h A_h)^T[i], so a
    token's vector is W[idx] + s A_h[:, idx]^T B_h^T. As a layer it is the linear map of a one-hot
    input of width vocab (in) to the embedding width (out); the base is decoded whole for the
    lookup (a transient: nothing of it is kept for backward)."""

    def __init__(self, embedding: nn.Embedding, **kw):
        if embedding.max_norm is not None or embedding.sparse or embedding.scale_grad_by_freq:
            raise ModelError("an nn.Embedding with max_norm, sparse or scale_grad_by_freq cannot be an LTE layer; "
                             "use LTEConfig(embeddings='replica')")
        super().__init__(embedding.weight.detach().T, None, transposed=True, **kw)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        base = F.embedding(idx, self.dense_weight().T)  # the table, vocab x dim, in fp32 as an embedding's
        if not self.training:
            return base
        n = self.heads
        if idx.shape[0] % n:
            raise BatchError(f"an LTE embedding got a batch of {idx.shape[0]} rows, which does not split "
                             f"into {n} equal head slices")
        A, B = self.factors()
        rows = idx.reshape(n, -1, 1).expand(-1, -1, A.shape[1])              # heads x tokens x r
        with no_autocast(idx):
            a = torch.gather(A.transpose(1, 2), 1, rows)                     # A_h[:, idx]^T
            out = torch.baddbmm(base.reshape(n, rows.shape[1], -1), a, B.transpose(1, 2), alpha=self.scale)
        return out.view(base.shape)


def _buffer_name(part: str) -> str:
    return f"weight_{part}" if part else "weight"


def is_patch_conv(module: nn.Module) -> bool:
    """A conv that is exactly a linear map on non-overlapping patches."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == tuple(module.stride)
            and module.groups == 1 and tuple(module.dilation) == (1, 1)
            and module.padding in ((0, 0), 0, "valid") and module.padding_mode == "zeros")


register_linear(LinearType("nn.Linear", lambda m, _: isinstance(m, nn.Linear), lambda m: m.weight))
register_linear(LinearType("patch Conv2d", lambda m, cfg: cfg.patch_conv and is_patch_conv(m),
                           lambda m: m.weight.flatten(1), make=LTEPatchConv))
register_linear(LinearType("transformers Conv1D", lambda m, _: _is_transformers_conv1d(m), lambda m: m.weight.T,
                           transposed=True))
# an embedding is a lookup in its vocab x dim weight, the linear map of a one-hot input: in x out
register_linear(LinearType("nn.Embedding", lambda m, cfg: cfg.embeddings == "lte" and isinstance(m, nn.Embedding),
                           lambda m: m.weight.T, transposed=True, make=LTEEmbedding, lookup=True))
