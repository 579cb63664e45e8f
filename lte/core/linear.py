"""The LTE linear layer: a frozen base weight plus N LoRA heads stored stacked.

In training the batch is cut into N equal contiguous slices and head h sees slice h only:
    y[slice h] = x[slice h] W^T + s * x[slice h] A_h^T B_h^T (+ bias_h)
as one autograd function (LTEHeads): the input and factors cast once to the compute dtype (the
factors of every layer by one op, and an fp32 base's cast kept between merges, in a step under
`precast`). The product runs "factored" (the base product once over the whole batch and the
heads' as two batched matmuls, one accumulating into the other in place with s as its alpha, a
per-head bias written by the first; in backward the heads' part of dx accumulated into the base dx
in place) or "merged" (each head's weight W + s B_h A_h, then one batched matmul), forward and
backward each whichever writes and computes less at the batch (LTELinear.merges); each factor's
gradient is computed in its own layout. benchmarks/lte_layer.py compares the explicit form with
torch.func.vmap over a per-head function; the explicit form was faster (see docs/library.md, "How
the heads run"); benchmarks/step_cost.py counts a whole step.
In eval the layer is the merged linear alone: x W^T + b, for any batch size.

The base weight is stored in a format from lte.memory (fp32 by default; bf16 or a bitsandbytes
quantization on a parameter-server worker). Its main tensor keeps the name `weight`; a quantized
format adds scale tensors named weight_<part>. What the heads keep for backward is an activation
option from lte.memory.activations (full, lora_fa: A frozen, velora: compressed input).
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BatchError, ModelError
from ..memory import Activations, BaseFormat, get_activations, get_format
from ..memory.base_formats import autocasting, no_autocast
from .config import PRODUCTS

if TYPE_CHECKING:
    from .config import LTEConfig


CARRIED = ("lora_Ac", "lora_Bc")  # comm.overlap's carried factors (lte.core.overlap)


class LTELinear(nn.Module):
    """Replaces an nn.Linear; `weight` and `bias` keep their names and hold the merged values.
    `product`: how the heads run in training, "factored", "merged" or by cost ("auto": merges)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, heads: int, rank: int,
                 scale: float, train_bias: bool, resetless: bool, carry: bool = False, base: BaseFormat | None = None,
                 activations: Activations | None = None, transposed: bool = False, product: str = "auto"):
        super().__init__()
        self.product = product
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

    @property
    def product(self) -> str:
        return self._product

    @product.setter
    def product(self, value: str) -> None:  # checked where it is set, not every forward
        if value not in PRODUCTS:
            raise ModelError(f"an LTE layer's product must be one of {PRODUCTS}, got {value!r}")
        self._product = value

    def merges(self, rows: int) -> tuple[bool, bool]:
        """Whether the heads run on their own weights W + s B_h A_h (`product` "merged") rather than
        the base product plus the low-rank one ("factored"), at `rows` rows a head: in forward, and in
        backward. Each direction decides for itself: building the weights writes N out in values and
        does 2 N out in r FLOPs; the factored way writes its output a second time (the output, N rows
        out values, forward; dx, N rows in, backward) and does 2 N rows r out (forward) or 2 N rows r in
        (backward) FLOPs more. Both measures favour the weights past `in` rows a head forward and
        past `out` backward ("auto"); a head on a worker has the rows its simulated twin has."""
        if self.product != "auto":
            return (self.product == "merged",) * 2
        return rows > self.in_features, rows > self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.base.linear(x, self.payload(), self.shape, self.bias)
        n = self.heads
        if x.shape[0] % n:
            raise BatchError(f"an LTE layer got a batch of {x.shape[0]} rows, which does not split "
                             f"into {n} equal head slices")
        A, B = self.factors()
        dtype = torch.get_autocast_dtype(x.device.type) if autocasting(x) else x.dtype
        state = self.option_state()
        payload = self.payload()
        copies = precast_of((A, B, self.bias_heads), dtype) + (base_copy(self, dtype),)
        with no_autocast(x):
            frozen_bias = self.bias if self.bias_heads is None else None
            merged = self.merges(x.numel() // self.in_features // n)
            y = lte_heads(x.reshape(-1, self.in_features), A, B, self.bias_heads, frozen_bias,
                          copies, self.scale, merged, self.base, self.shape,
                          self.activations, dtype, tuple(state), *state.values(),
                          *(payload[k] for k in sorted(payload)))
        return y.view(*x.shape[:-1], self.out_features)

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
        if self.training and autocasting(x):  # cast before the patches are gathered: the copy is then bf16
            x = x.to(torch.get_autocast_dtype(x.device.type))
        gh, gw = h // ph, w // pw  # a conv drops the remainder rows/columns too
        patches = (x[:, :, :gh * ph, :gw * pw].reshape(b, c, gh, ph, gw, pw)
                   .permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw))
        y = super().forward(patches)
        return y.transpose(1, 2).reshape(b, self.out_features, gh, gw)


class LTEHeads(torch.autograd.Function):
    """An LTE layer's training forward (see the module docstring), for x: (heads x rows) x in, A:
    heads x r x in, B: heads x out x r; `precast` holds A, B and bias_heads already in the compute
    dtype where a step has cast them all at once (precast_of), and the base W where a step keeps its
    copy between merges (base_copy), else None each. Otherwise the base W is decoded from its payload:
    the fp32 master's cast kept for backward, any other base decoded again there (a quantized one is
    never kept dense). What is kept of x for A's gradient is the activation option's."""

    @staticmethod
    def forward(x, A, B, bias_heads, bias, precast, scale, merged, fmt, shape, option, dtype, state_names, *tensors):
        # merged: (forward, backward), whether each runs on the heads' own weights (LTELinear.merges)
        state, payload = _split(state_names, tensors)
        n = A.shape[0]
        xd = x.to(dtype)  # the one cast of each
        Ad, Bd, bias_d = (_in_dtype(t, copy, dtype) for t, copy in zip((A, B, bias_heads), precast))
        x3 = xd.view(n, -1, xd.shape[-1])
        W = _decoded(fmt, shape, payload, dtype) if precast[3] is None else precast[3]
        xa = torch.bmm(x3, Ad.transpose(1, 2))
        if merged[0]:  # every head's weight, then one batched product writing the output once
            Wh = _heads_weights(W, Bd, Ad, scale).transpose(1, 2)
            b = bias_d.unsqueeze(1) if bias_heads is not None else None if bias is None else bias.to(dtype)
            y = (torch.bmm(x3, Wh) if b is None else torch.baddbmm(b, x3, Wh)).view(-1, Wh.shape[-1])
        elif bias_heads is None:
            y = torch.mm(xd, W.t()) if bias is None else torch.addmm(bias.to(dtype), xd, W.t())
            y.view(n, -1, y.shape[-1]).baddbmm_(xa, Bd.transpose(1, 2), alpha=scale)
        else:  # the heads' product written with each head's bias, then the base product added in place
            y = torch.baddbmm(bias_d.unsqueeze(1), xa, Bd.transpose(1, 2), alpha=scale)
            y = y.view(-1, y.shape[-1]).addmm_(xd, W.t())
        kept = option.keep_for_A(x3, state) if option.trains_A else None  # saved only if A's gradient is wanted
        # The fp32 master's cast is kept for backward, as autocast keeps a full-rank layer's (half the
        # master's bytes; decoding again is an op); a worker's bf16 or quantized base is decoded again
        # instead, so that its memory stays the payload's. A W that is the payload itself is saved anyway.
        kept_W = W if fmt.holds_master and not any(W is t for t in payload) else None
        # the casts, for backward (None where there was nothing to cast: an input is saved as itself)
        return y, xa, kept, None if Ad is A else Ad, None if Bd is B else Bd, kept_W

    @staticmethod
    def setup_context(ctx, inputs, output):
        # Separate from forward so torch.compile traces it into the step's graph.
        x, A, B, bias_heads, _, precast, scale, merged, fmt, shape, option, dtype, state_names, *tensors = inputs
        _, xa, kept, Ad, Bd, W = output
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        Ad, Bd = A if Ad is None else Ad, B if Bd is None else Bd
        ctx.set_materialize_grads(False)  # no zeros for the outputs that are only there to be saved
        ctx.fmt, ctx.shape, ctx.option, ctx.dtype, ctx.scale, ctx.merged = fmt, shape, option, dtype, scale, merged[1]
        ctx.state_names, ctx.x_dtype, ctx.factor_dtype = state_names, x.dtype, A.dtype
        ctx.has_bias_heads = bias_heads is not None
        ctx.save_for_backward(xa, kept if ctx.needs_input_grad[1] else None, Ad, Bd, W, *tensors)

    @staticmethod
    def backward(ctx, grad, *_):
        xa, kept, Ad, Bd, W, *tensors = ctx.saved_tensors  # read once (activation checkpointing)
        state, payload = _split(ctx.state_names, tensors)
        dtype, s = ctx.dtype, ctx.scale
        g = grad.to(dtype)
        g3 = g.view(Ad.shape[0], -1, g.shape[-1])
        wants_gxa = ctx.needs_input_grad[1] or (ctx.needs_input_grad[0] and not ctx.merged)
        gxa = torch.bmm(g3, Bd) if wants_gxa else None           # heads x rows x r: d(x A^T) / s
        grad_x = grad_A = grad_B = grad_bias = None
        if ctx.needs_input_grad[0]:
            W = _decoded(ctx.fmt, ctx.shape, payload, dtype) if W is None else W
            if ctx.merged:  # the heads' weights built again rather than kept: N times the base's bytes
                gx = torch.bmm(g3, _heads_weights(W, Bd, Ad, s)).view(g.shape[0], -1)
            else:
                gx = torch.mm(g, W)
                gx.view(gxa.shape[0], -1, gx.shape[-1]).baddbmm_(gxa, Ad, alpha=s)
            grad_x = gx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_A = _scaled_bmm(gxa.transpose(1, 2), ctx.option.input_for_A(kept, state), s).to(ctx.factor_dtype)
        if ctx.needs_input_grad[2]:
            grad_B = _scaled_bmm(g3.transpose(1, 2), xa, s).to(ctx.factor_dtype)
        if ctx.has_bias_heads and ctx.needs_input_grad[3]:
            grad_bias = g3.sum(1, dtype=ctx.factor_dtype)
        return (grad_x, grad_A, grad_B, grad_bias, *[None] * (9 + len(tensors)))


def lte_heads(x, A, B, bias_heads, bias, precast, scale, merged, fmt, shape, option, dtype, state_names,
              *tensors) -> torch.Tensor:
    """LTEHeads' output; its forward alone where nothing needs a gradient (torch.compile 2.14 fails
    on an autograd.Function none of whose inputs requires grad)."""
    args = (x, A, B, bias_heads, bias, precast, scale, merged, fmt, shape, option, dtype, state_names, *tensors)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, A, B, bias_heads)):
        return LTEHeads.apply(*args)[0]
    return LTEHeads.forward(*args)[0]


@dataclass(frozen=True)
class _Precast:
    """What a `precast` hands the LTE layers."""
    copies: dict[torch.Tensor, torch.Tensor]  # tensor -> its copy in the compute dtype
    bases: BaseCopies | None


_IN_FORCE: list[_Precast] = []  # the precasts entered, innermost last


@contextlib.contextmanager
def precast(copies: dict[torch.Tensor, torch.Tensor], bases: BaseCopies | None = None):
    """For the length of the `with`, an LTE layer takes these tensors' copies (each a tensor's copy in
    the compute dtype: HeadOptimizer.compute_copies casts every head tensor by one op) instead of
    casting its factors itself, one op each, every forward, and its fp32 master base's copy from
    `bases`. The copies are of the tensors as they are on entry: nothing may write the tensors
    inside (a step's forward does not). An inner precast stands in for the outer one until it ends."""
    _IN_FORCE.append(_Precast(copies, bases))
    try:
        yield
    finally:
        _IN_FORCE.pop()


class BaseCopies:
    """The LTE layers' fp32 master bases in the compute dtype, each kept from step to step until its
    master changes: the base is frozen between merges, so a step need not cast it (a full-rank
    layer's weight changes every step, so autocast casts it every forward). A merge or a load writes
    the master in place, which moves its version counter, and moving a layer replaces its tensors:
    either makes the copy again. The copy is what backward keeps of the base, so it costs no memory
    over a step that casts."""

    def __init__(self):
        self.kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (master, version, copy)

    @torch.no_grad()
    def of(self, layer: LTELinear, dtype: torch.dtype) -> torch.Tensor:
        master = layer.weight
        kept = self.kept.get(layer)
        # torch's version counter: every in-place write to the tensor moves it
        if kept is None or kept[0] is not master or kept[1] != master._version or kept[2].dtype != dtype:
            kept = self.kept[layer] = (master, master._version, layer.dense_weight(dtype))
        return kept[2]


def base_copy(layer: LTELinear, dtype: torch.dtype) -> torch.Tensor | None:
    """The layer's base in dtype from the current `precast`'s BaseCopies, or None (a base that is not
    an fp32 master, one already in dtype, outside a `precast` with bases, and under torch.compile)."""
    current = _in_force()
    if current is None or current.bases is None or not layer.base.holds_master or dtype == torch.float32:
        return None
    return current.bases.of(layer, dtype)


def _in_force() -> _Precast | None:
    """The innermost precast the layers take their copies from: none under torch.compile."""
    return None if torch.compiler.is_compiling() or not _IN_FORCE else _IN_FORCE[-1]


def precasting() -> bool:
    """Whether a `precast` is in force."""
    return bool(_IN_FORCE)


def precast_of(tensors: tuple, dtype: torch.dtype) -> tuple:
    """Each tensor's copy in dtype from the current `precast`, or None (also for a None tensor, one
    made in this forward such as the factors with reset="none", and under torch.compile, which
    fuses the casts itself)."""
    current = _in_force()
    if current is None:
        return (None,) * len(tensors)
    copies = (None if t is None else current.copies.get(t) for t in tensors)
    return tuple(c if c is not None and c.dtype == dtype else None for c in copies)


def _heads_weights(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """Every head's own weight W + s B_h A_h (heads x out x in), by one batched matmul."""
    return torch.baddbmm(W, B, A, alpha=scale)


def _scaled_bmm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (a @ b), batched, in one matmul (baddbmm with beta=0 reads nothing of its input, so any
    tensor that broadcasts to the output will do)."""
    return torch.baddbmm(a[:1, :1, :1], a, b, beta=0, alpha=scale)


def _in_dtype(t: torch.Tensor | None, copy: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in the compute dtype: its precast copy where it has one."""
    if copy is not None:
        return copy
    return None if t is None else t.to(dtype)


def _split(state_names: tuple, tensors: tuple) -> tuple[dict, tuple]:
    return dict(zip(state_names, tensors)), tensors[len(state_names):]


def _decoded(fmt: BaseFormat, shape: tuple[int, int], payload: tuple, dtype: torch.dtype) -> torch.Tensor:
    return fmt.decode(dict(zip(sorted(fmt.layout(shape)), payload)), shape, dtype)


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
