"""Per-head copies of parameters that are not LoRA-factorised (norm affine, embeddings, tokens).

A replicated parameter P stays on its module under its own name as a buffer holding the merged
value (so eval, state_dict keys and `export` see the original model), and gains a trainable
stack "P_heads" (N x *P.shape). In training each head must see its own copy on its own slice:

* a leaf module (LayerNorm, Embedding, a non-patch Conv2d, ...) gets an instance-level forward
  that runs the class's forward under torch.func.vmap over heads, with the copies shadowing the
  merged buffers; the module's class is left as it was;
* a parameter of a module that has children (a ViT's pos_embed or cls_token) is used inside
  code we do not control, so it is shadowed by a per-sample tensor (one row per sample, taken
  from that sample's head) for the length of the root forward. That only works for parameters
  with a leading singleton dimension that broadcasts over the batch; others are refused.
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BatchError
from .algebra import HEADS_SUFFIX


def replicate(module: nn.Module, name: str, heads: int) -> None:
    """Turn parameter `name` of `module` into a merged buffer plus a trainable per-head stack."""
    param = module._parameters.pop(name)
    value = param.detach()
    module.register_buffer(name, value.clone())
    stack = value.unsqueeze(0).repeat(heads, *([1] * value.dim()))
    module.register_parameter(name + HEADS_SUFFIX, nn.Parameter(stack))


def swap_buffers(module: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put `tensors` in place of the module's buffers of the same names; returns what they
    replaced, which a second call puts back.

    The buffer entries themselves are swapped (as torch.func.functional_call does): dynamo traces
    that into one graph on every torch we support, where an instance attribute set and then
    deleted through module.__dict__ fails fullgraph compilation before torch 2.14.
    """
    replaced = {name: module._buffers[name] for name in tensors}
    for name, value in tensors.items():
        module._buffers[name] = value
    return replaced


@contextmanager
def shadowed(module: nn.Module, tensors: dict[str, torch.Tensor]):
    """Make module.<name> return the given tensors instead of the merged buffers, in the block."""
    replaced = swap_buffers(module, tensors)
    try:
        yield
    finally:
        swap_buffers(module, replaced)


class HeadSplit:
    """The batch split of the training forward under way, which the root's forward sets and its
    per-head leaf modules read: a leaf whose input has a batch of 1 (position ids, which models
    broadcast over the batch) gives every sample its own head's copy, and so needs to know how many
    samples each head holds."""

    def __init__(self, heads: int):
        self.heads = heads
        self.per_head: int | None = None  # None outside a training forward of the root


def _headwise_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs):
    cls_forward = type(self).forward
    if not self.training:
        return cls_forward(self, x, *args, **kwargs)
    stacks = {name: getattr(self, name + HEADS_SUFFIX) for name in self._lte_replicas}
    n = next(iter(stacks.values())).shape[0]

    def one_head(params, xh):
        with shadowed(self, params):
            return cls_forward(self, xh, *args, **kwargs)

    if x.shape[0] == 1 and n > 1:  # broadcast over the batch: every head's copy on the one input
        per_head = self._lte_split.per_head
        if per_head is None:
            raise BatchError(f"{self._lte_path}: an input with a batch of 1 outside a training forward of the "
                             "prepared model, so the batch it broadcasts over is not known")
        out = torch.func.vmap(one_head, in_dims=(0, None))(stacks, x)  # heads x 1 x ...
        return out.expand(n, per_head, *out.shape[2:]).reshape(n * per_head, *out.shape[2:])
    if x.shape[0] % n:
        raise BatchError(f"{self._lte_path}: a batch of {x.shape[0]} does not split into {n} equal head slices")
    out = torch.func.vmap(one_head)(stacks, x.reshape(n, x.shape[0] // n, *x.shape[1:]))
    return out.reshape(x.shape[0], *out.shape[2:])


def make_headwise(module: nn.Module, path: str, names: list[str], split: HeadSplit) -> None:
    """Replicate `names` on a leaf module and give it a per-head forward (a LayerNorm's own, which
    keeps for backward what a plain LayerNorm keeps; any other module's class forward under vmap)."""
    for name in names:
        replicate(module, name, split.heads)
    module._lte_replicas = tuple(names)
    module._lte_split, module._lte_path = split, f"module '{path}' ({type(module).__name__})"
    forward = _headwise_layer_norm if _is_plain_layer_norm(module) else _headwise_forward
    module.forward = types.MethodType(forward, module)


def _is_plain_layer_norm(module: nn.Module) -> bool:
    """A LayerNorm over the last dimension whose forward computes nn.LayerNorm's: nn.LayerNorm itself,
    or a subclass (timm's LayerNorm is one) whose own forward gives F.layer_norm's values on a probe."""
    if not (isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and module.elementwise_affine
            and set(module._lte_replicas) == {n for n in ("weight", "bias") if getattr(module, n) is not None}):
        return False
    if type(module).forward is nn.LayerNorm.forward:
        return True
    width, g = module.normalized_shape[0], torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, width, generator=g)
    probe = {name: torch.randn(width, generator=g) for name in module._lte_replicas}  # the module may be on meta
    try:
        with torch.no_grad(), shadowed(module, probe):
            out = type(module).forward(module, x)
    except Exception:  # a forward that cannot run on the probe is not one to replace
        return False
    expected = F.layer_norm(x, (width,), probe["weight"], probe.get("bias"), module.eps)
    return isinstance(out, torch.Tensor) and out.shape == x.shape and torch.allclose(out, expected, atol=1e-5)


def _headwise_layer_norm(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """Per-head weight and bias on each head's slice. Under vmap, LayerNorm decomposes into the
    normalisation and a product with the batched weight, which keeps the normalised input for the
    weight's gradient: a second activation-sized tensor beside the input. This keeps the input and
    the per-row statistics only, as a plain LayerNorm does, and normalises again in backward."""
    if not self.training:
        return nn.LayerNorm.forward(self, x)
    w = getattr(self, "weight" + HEADS_SUFFIX)
    n = w.shape[0]
    if x.shape[0] % n:
        raise BatchError(f"{self._lte_path}: a batch of {x.shape[0]} does not split into {n} equal head slices")
    b = getattr(self, "bias" + HEADS_SUFFIX) if self.bias is not None else None
    out, _, _ = _HeadwiseLayerNorm.apply(x.reshape(n, -1, x.shape[-1]), w, b, self.eps)
    return out.reshape(x.shape)


class _HeadwiseLayerNorm(torch.autograd.Function):
    """y[h] = (x[h] - mean) * rstd * w[h] + b[h] over the last dimension, in fp32 (as autocast runs
    layer_norm); x: heads x rows x C, w and b: heads x C. The normalisation is aten's layer norm
    (forward and backward), the per-head affine one op. What is kept is x and the two per-row
    statistics, as a plain layer norm keeps; w's gradient is taken from them (`_weight_grad`)."""

    @staticmethod
    def forward(x, w, b, eps):
        x_hat, mean, rstd = torch.native_layer_norm(x.float(), x.shape[-1:], None, None, eps)
        y = x_hat * w.unsqueeze(1) if b is None else torch.addcmul(b.unsqueeze(1), x_hat, w.unsqueeze(1))
        return y, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        # Separate from forward so torch.compile traces it into the step's graph.
        x, w, b, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # no zeros for mean and rstd
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.has_bias, ctx.eps = b is not None, eps

    @staticmethod
    def backward(ctx, grad, *_):
        x, w, mean, rstd = ctx.saved_tensors
        xf, g = x.float(), grad.float()
        grad_x = torch.ops.aten.native_layer_norm_backward(g * w.unsqueeze(1), xf, x.shape[-1:], mean, rstd, None,
                                                           None, [True, False, False])[0]
        grad_w = _weight_grad(g, xf, mean, rstd, ctx.eps).to(w.dtype)
        grad_b = g.sum(1).to(w.dtype) if ctx.has_bias else None
        return grad_x.to(x.dtype), grad_w, grad_b, None


def _weight_grad(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, eps: float) -> torch.Tensor:
    """sum over each head's rows of g * (x - mean) * rstd, heads x C; g, x: heads x rows x C, mean and
    rstd: heads x rows x 1 (fp32 each)."""
    if torch.compiler.is_compiling():  # inductor fuses the normalisation into the reduction: no pass of its own
        return (g * torch.native_layer_norm(x, x.shape[-1:], None, None, eps)[0]).sum(1)
    # Op by op, x - mean would be written out before the product; as rstd-weighted sums over the rows
    # (two batched products, one row vector each), g * x is the one pass: sum (g x) rstd - sum g (mean rstd).
    return torch.baddbmm(torch.bmm(rstd.mT, g * x), (mean * rstd).mT, g, alpha=-1).squeeze(1)


def _split_forward(self: nn.Module, *args, **kwargs):
    """The root's forward: in training, check that the batch splits into equal head slices and
    shadow the loose replicated parameters with per-sample tensors for the length of the call.

    An instance-level forward rather than forward hooks, so that torch.compile sees the split,
    the shadowing and the model as one frame (hooks compile as separate frames, with guards on
    the shadowing between them)."""
    cls_forward = type(self).forward
    if not self.training:
        return cls_forward(self, *args, **kwargs)
    split, loose = self._lte_split, self._lte_loose
    name, batch = _batch_input(args, kwargs)
    if batch is None:
        return cls_forward(self, *args, **kwargs)
    if batch % split.heads:
        raise BatchError(f"training input {name} has a batch of {batch} samples, which does not split into "
                         f"{split.heads} heads: the batch size must be a multiple of the number of heads "
                         f"({split.heads})")
    split.per_head = per_head = batch // split.heads
    swapped = []
    for owner, pname in loose:
        stack = getattr(owner, pname + HEADS_SUFFIX)  # N x 1 x rest
        rest = stack.shape[2:]
        per_sample = stack.expand(split.heads, per_head, *rest).reshape(batch, *rest)
        swapped.append((owner, swap_buffers(owner, {pname: per_sample})))
    try:
        return cls_forward(self, *args, **kwargs)
    finally:
        split.per_head = None
        for owner, replaced in swapped:
            swap_buffers(owner, replaced)


def split_batches(root: nn.Module, split: HeadSplit, loose: list[tuple[nn.Module, str]]) -> None:
    """Give the root module the per-head batch split (its class is left as it was)."""
    root._lte_split = split
    root._lte_loose = tuple(loose)
    root.forward = types.MethodType(_split_forward, root)


def _batch_input(args, kwargs) -> tuple[str | None, int | None]:
    """The model's main input (its first tensor argument), named, and its batch size."""
    named = [(f"argument {i}", v) for i, v in enumerate(args)] + [(f"'{k}'", v) for k, v in kwargs.items()]
    for name, value in named:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return name, value.shape[0]
    return None, None
