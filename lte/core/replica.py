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
    return (type(module) is nn.LayerNorm and len(module.normalized_shape) == 1
            and set(module._lte_replicas) == {n for n in ("weight", "bias") if getattr(module, n) is not None})


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
    layer_norm); x: heads x rows x C, w and b: heads x C."""

    @staticmethod
    def forward(x, w, b, eps):
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=-1, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + eps)
        y = (xf - mean) * rstd * w.float().unsqueeze(1)
        return (y if b is None else y + b.float().unsqueeze(1)), mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        # Separate from forward so torch.compile traces it into the step's graph.
        x, w, b, _ = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_rstd):
        x, w, mean, rstd = ctx.saved_tensors
        x_hat = (x.float() - mean) * rstd
        g = grad.float()
        grad_w = (g * x_hat).sum(1).to(w.dtype)
        grad_b = g.sum(1).to(w.dtype) if ctx.has_bias else None
        gx = g * w.float().unsqueeze(1)
        grad_x = rstd * (gx - gx.mean(-1, keepdim=True) - x_hat * (gx * x_hat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w, grad_b, None


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
