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
from .merge import HEADS_SUFFIX


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


def _headwise_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs):
    cls_forward = type(self).forward
    if not self.training:
        return cls_forward(self, x, *args, **kwargs)
    stacks = {name: getattr(self, name + HEADS_SUFFIX) for name in self._lte_replicas}
    n = next(iter(stacks.values())).shape[0]
    if x.shape[0] % n:
        raise BatchError(f"a batch of {x.shape[0]} does not split into {n} equal head slices")

    def one_head(params, xh):
        with shadowed(self, params):
            return cls_forward(self, xh, *args, **kwargs)

    out = torch.func.vmap(one_head)(stacks, x.reshape(n, x.shape[0] // n, *x.shape[1:]))
    return out.reshape(x.shape[0], *out.shape[2:])


def make_headwise(module: nn.Module, names: list[str], heads: int) -> None:
    """Replicate `names` on a leaf module and give it a per-head forward."""
    for name in names:
        replicate(module, name, heads)
    module._lte_replicas = tuple(names)
    module.forward = types.MethodType(_headwise_forward, module)


def _split_forward(self: nn.Module, *args, **kwargs):
    """The root's forward: in training, check that the batch splits into equal head slices and
    shadow the loose replicated parameters with per-sample tensors for the length of the call.

    An instance-level forward rather than forward hooks, so that torch.compile sees the split,
    the shadowing and the model as one frame (hooks compile as separate frames, with guards on
    the shadowing between them)."""
    cls_forward = type(self).forward
    if not self.training:
        return cls_forward(self, *args, **kwargs)
    heads, loose = self._lte_heads, self._lte_loose
    batch = _batch_size(args, kwargs)
    if batch is None or not loose:
        if batch is not None and batch % heads:
            raise _split_error(batch, heads)
        return cls_forward(self, *args, **kwargs)
    if batch % heads:
        raise _split_error(batch, heads)
    per_head = batch // heads
    swapped = []
    for owner, name in loose:
        stack = getattr(owner, name + HEADS_SUFFIX)  # N x 1 x rest
        rest = stack.shape[2:]
        swapped.append((owner, swap_buffers(owner, {name: stack.expand(heads, per_head, *rest).reshape(batch, *rest)})))
    try:
        return cls_forward(self, *args, **kwargs)
    finally:
        for owner, replaced in swapped:
            swap_buffers(owner, replaced)


def split_batches(root: nn.Module, heads: int, loose: list[tuple[nn.Module, str]]) -> None:
    """Give the root module the per-head batch split (its class is left as it was)."""
    root._lte_heads = heads
    root._lte_loose = tuple(loose)
    root.forward = types.MethodType(_split_forward, root)


def _split_error(batch: int, heads: int) -> BatchError:
    return BatchError(f"training batch of {batch} samples does not split into {heads} heads: "
                      f"the batch size must be a multiple of the number of heads ({heads})")


def _batch_size(args, kwargs) -> int | None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None
