"""The injection API: prepare a model in place, merge its heads, export the plain weights.

    model = prepare(model, cfg)   # nn.Linear -> LTELinear; other parameters replicated or frozen
    merge(model)                  # W += (s/N) sum_h B_h A_h; replicas averaged; heads reset
    export(model)                 # state_dict with the original keys and shapes

A prepared model keeps its own classes and module paths except that every nn.Linear (and every
patch-embedding conv) is an LTELinear. Its trainable parameters are exactly the per-head tensors,
each stacked on dim 0, which is what per-head optimisers and gradient clipping rely on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelError
from ..memory import Activations, BaseFormat
from .config import LTEConfig
from .init import init_lora_A
from .linear import CARRIED, LINEAR_TYPES, LTELinear, linear_type
from .algebra import HEADS_SUFFIX, MergeSpec, key as _join, merge_into
from .outer import OuterOptimizer
from .robust import Robust
from .upload import Uploader, through_uploads
from .replica import HeadSplit, make_headwise, replicate, split_batches

MERGES_KEY = "lte_merges"


@dataclass
class LTEState:
    """What a prepared model remembers about its preparation (kept off the state_dict)."""

    cfg: LTEConfig
    spec: MergeSpec
    first_head: int
    base: BaseFormat
    activations: Activations


def plan(model: nn.Module, cfg: LTEConfig) -> tuple[MergeSpec, list[tuple[str, str]]]:
    """Which layers become LTE layers and which parameters are replicated, for a plain model.

    Returns the merge spec and the (module path, parameter name) pairs to replicate. The
    parameter server calls this on its own plain copy of the model to know what a merge touches.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            raise ModelError(
                f"module '{name or type(model).__name__}' is an nn.MultiheadAttention, which uses its "
                "projection weights directly instead of calling nn.Linear; convert it first with "
                "lte.models.torchvision_vit.linear_attention(model) (same outputs, attention made of "
                "nn.Linear), or build the model with such attention (timm's ViT has it)")
    _refuse_tied(model)

    layers, transposed, replicas, to_replicate = [], [], [], []
    for path, module in model.named_modules():
        linear = linear_type(module, cfg)
        if linear is not None:
            layers.append(path)
            if linear.transposed:
                transposed.append(path)
            bias = getattr(module, "bias", None)
            if bias is not None and bias.requires_grad and cfg.other_params != "frozen":
                replicas.append(_join(path, "bias"))
            continue
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad or cfg.other_params == "frozen":
                continue
            _check_replicable(cfg, path, module, pname, param)
            replicas.append(_join(path, pname))
            to_replicate.append((path, pname))
    if not layers:
        raise ModelError(f"model {type(model).__name__} has no nn.Linear layer for LTE to train, nor another "
                         f"linear layer type lte knows ({', '.join(t.name for t in LINEAR_TYPES)})")
    spec = MergeSpec(tuple(layers), tuple(replicas), cfg.scale, resetless=cfg.reset == "none",
                     transposed=tuple(transposed))
    return spec, to_replicate


def prepare(model: nn.Module, cfg: LTEConfig, *, first_head: int = 0) -> nn.Module:
    """Turn `model` into `cfg.heads` LoRA heads, in place, and return it.

    first_head is the global index of this model's first head (non-zero on a worker that holds
    heads k..k+n-1 of a larger run); it only seeds the heads' initialisation. cfg's memory options
    say how the frozen base is stored (a model whose base is not fp32 cannot merge by itself and
    receives its merged base from a parameter server) and what the heads keep for backward.
    """
    if not isinstance(cfg, LTEConfig):
        raise TypeError(f"cfg must be an lte.LTEConfig, got {type(cfg).__name__}")
    if is_prepared(model):
        raise ModelError("model is already prepared for LTE")
    spec, to_replicate = plan(model, cfg)
    base_format, activations = cfg.base_format(), cfg.activation_option
    features = [p for p in spec.layers if not linear_type(model.get_submodule(p), cfg).lookup]  # embeddings: none
    activations.check_widths({p or type(model).__name__: spec.matrix(p, model.get_submodule(p).weight).shape[1]
                              for p in features})  # in_features; a patch conv's C*kh*kw
    root = _swap_layers(model, spec, cfg, first_head, base=base_format, activations=activations)
    _replicate(root, to_replicate, cfg.heads)
    root.register_buffer(MERGES_KEY, torch.zeros((), dtype=torch.long))
    root._lte = LTEState(cfg, spec, first_head, base_format, activations)
    if cfg.other_params == "frozen":
        trained = {id(t) for t in head_state(root).values()}
        for param in root.parameters():
            if id(param) not in trained:
                param.requires_grad_(False)
    return root


def _swap_layers(model: nn.Module, spec: MergeSpec, cfg: LTEConfig, first_head: int, **layer_kw) -> nn.Module:
    """Every planned layer replaced by an LTE layer; the root (the new layer if the model was one)."""
    layer_kw.update(heads=cfg.heads, rank=cfg.rank, scale=cfg.scale, train_bias=cfg.other_params != "frozen",
                    resetless=cfg.reset == "none", carry=cfg.overlap, product=cfg.product)
    root = model
    for path in spec.layers:
        old = model.get_submodule(path)
        new = linear_type(old, cfg).build(old, **layer_kw)
        new.train(old.training)
        init_lora_A(new.lora_A, path, cfg.seed, first_head)
        if new.lora_A0 is not None:  # a snapshot, not a tensor of the graph: no history to lora_A
            with torch.no_grad():
                new.lora_A0.copy_(new.lora_A)
        if path:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        else:
            root = new  # the model itself was a single nn.Linear
    return root


def _replicate(root: nn.Module, to_replicate: list[tuple[str, str]], heads: int) -> None:
    """Per-head copies of the other parameters: a leaf module runs per head under vmap; a parameter of
    a module with children is shadowed per sample by the root's batch split (lte.core.replica)."""
    loose, leaf_params, split = [], {}, HeadSplit(heads)
    for path, pname in to_replicate:
        owner = root.get_submodule(path)
        if next(owner.children(), None) is None:
            leaf_params.setdefault(path, []).append(pname)
        else:
            replicate(owner, pname, heads)
            loose.append((owner, pname))
    for path, names in leaf_params.items():
        make_headwise(root.get_submodule(path), path, names, split)
    split_batches(root, split, loose)


def is_prepared(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_lte", None), LTEState)


def state_of(model: nn.Module) -> LTEState:
    state = getattr(model, "_lte", None)
    if state is None:
        raise ModelError("model is not prepared for LTE: call lte.prepare(model, cfg) first")
    return state


def lte_layers(model: nn.Module) -> list[tuple[str, LTELinear]]:
    return [(path, model.get_submodule(path)) for path in state_of(model).spec.layers]


def trained_keys(model: nn.Module) -> list[str]:
    """The per-head tensors an optimizer trains (without A when the activations option freezes it)."""
    state = state_of(model)
    return state.spec.trained_keys(frozen_A=not state.activations.trains_A)


def option_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LTE layer's activations-option buffers (VeLoRA's sub-token vectors, heads x M), by
    state_dict key; empty for options that keep none."""
    return {_join(path, name): t for path, layer in lte_layers(model) for name, t in layer.option_state().items()}


def merges_done(model: nn.Module) -> int:
    """How many merges the model's heads have been through (a head's A draw counts them)."""
    return int(getattr(model, MERGES_KEY))


def set_merges_done(model: nn.Module, merges: int) -> None:
    """Take the merge count of a run that resumes (the server's, for a worker)."""
    getattr(model, MERGES_KEY).fill_(merges)


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every per-head tensor of the model (stacked on dim 0), by state_dict key."""
    sd = model.state_dict(keep_vars=True)
    return {key: sd[key] for key in state_of(model).spec.head_keys()}


def master_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged weights the model trains against, by state_dict key (views, not copies), each in
    the original module's layout, as a parameter server's plain model holds them.

    In simulated mode these buffers are the master copy that a merge updates in place; a worker
    of a parameter server receives them from the server instead.
    """
    state = state_of(model)
    if not state.base.holds_master:
        raise ModelError(f"this model stores its base as {state.base.name}; it cannot hold the fp32 "
                         "master weights a merge updates (a parameter server holds them)")
    sd = model.state_dict(keep_vars=True)
    master = {key: sd[key] for key in state.spec.master_keys()}
    for layer in state.spec.transposed:  # an LTE layer stores out x in; transformers' Conv1D in x out
        master[_join(layer, "weight")] = master[_join(layer, "weight")].T
    return master


@torch.no_grad()
def load_merged(model: nn.Module, layer_payloads: dict[str, dict[str, torch.Tensor]],
                replicas: dict[str, torch.Tensor]) -> None:
    """Install merged weights received from elsewhere: each layer's base payload (in the model's
    base format) and each replicated parameter's merged value (some of them: a sharded server's
    shard sends its own)."""
    for path, layer in lte_layers(model):
        if path in layer_payloads:
            layer.load_payload(layer_payloads[path])
    sd = model.state_dict(keep_vars=True)
    for name, value in replicas.items():
        sd[name].copy_(value.reshape(sd[name].shape))


@torch.no_grad()
def reset_heads(model: nn.Module, heads: list[int] | None = None, redraw: bool | None = None) -> None:
    """Start the next round: per cfg.reset, and every replica copy back to the merged value.

    `heads` restricts the reset to some local heads; `redraw` forces re-drawing A (used to
    restart heads whose update was rejected).
    """
    state = state_of(model)
    cfg = state.cfg
    draw = merges_done(model)
    idx = slice(None) if heads is None else torch.tensor(heads, dtype=torch.long)
    redraw = (cfg.reset == "ab" or state.activations.redraws_A) if redraw is None else redraw
    for path, layer in lte_layers(model):
        if cfg.reset == "none" and not redraw:
            layer.lora_A0[idx] = layer.lora_A[idx]
            layer.lora_B0[idx] = layer.lora_B[idx]
            continue
        layer.lora_B[idx] = 0
        if redraw:
            init_lora_A(layer.lora_A, path, cfg.seed, state.first_head, draw=draw,
                        heads=None if heads is None else list(heads))
            if layer.lora_A0 is not None:
                layer.lora_A0[idx] = layer.lora_A[idx]
                layer.lora_B0[idx] = 0
    sd, stacks = model.state_dict(keep_vars=True), head_state(model)
    for name in state.spec.replicas:
        stack = stacks[name + HEADS_SUFFIX]
        stack[idx] = sd[name].to(stack.dtype)


def merge(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
          outer: OuterOptimizer | None = None, upload: Uploader | None = None, robust: Robust | None = None):
    """Merge every head into the weights, then reset the heads (per cfg.reset).

    W += (s/N) sum_h B_h A_h is computed in fp32 as one matmul per layer; replicated parameters
    become the mean of their copies. With reset="ab", A is re-drawn and, if `optimizer` is
    given, the moments of the re-drawn factors are cleared. `outer` (lte.OuterOptimizer, kept by
    the caller across merges) steps each master tensor with the merged change as its
    pseudo-gradient instead. `upload` (lte.core.upload.Uploader, kept across merges for its error
    feedback) merges what a parameter server would receive of the heads in its codec. `robust`
    (lte.core.robust) clips or drops the heads whose change is an outlier; what it did to each head
    is returned (None without it).
    """
    state, master, heads = state_of(model), master_state(model), head_state(model)
    if upload is not None:
        heads = through_uploads(heads, master, state.spec.trained_keys(not state.activations.trains_A), upload)
    outcome = merge_into(master, heads, state.spec, outer=outer, robust=robust)
    finish_merge(model, optimizer)
    return outcome


def finish_merge(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """What follows a merge wherever it was computed: count it and reset the heads (cfg.reset)."""
    getattr(model, MERGES_KEY).add_(1)
    reset_heads(model)
    if optimizer is not None and state_of(model).cfg.reset == "ab":
        clear_optimizer_state(optimizer, [p for _, layer in lte_layers(model)
                                          for p in (layer.lora_A, layer.lora_B)])


def restart_heads(model: nn.Module, heads: list[int], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Start some local heads afresh (A re-drawn, B zero, replicas merged, optimizer moments cleared),
    e.g. after the server rejected their update as non-finite."""
    reset_heads(model, heads=heads, redraw=True)
    if optimizer is not None:
        stacks = head_state(model)
        clear_optimizer_state(optimizer, [stacks[k] for k in trained_keys(model)], heads)


def clear_optimizer_state(optimizer: torch.optim.Optimizer, params, heads: list[int] | None = None) -> None:
    """Zero the optimizer moments of `params` (only rows `heads` of each, if given)."""
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                if heads is None:
                    value.zero_()
                else:
                    value[torch.tensor(heads, dtype=torch.long)] = 0


def export(model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged weights as a plain state_dict of the original model (keys and shapes).

    Progress made by the heads since the last merge is not included: merge first.
    """
    state = state_of(model)
    skip = set(state.spec.head_keys()) | set(option_state(model)) | {MERGES_KEY}
    for path, layer in lte_layers(model):
        skip |= {_join(path, name) for name, _ in layer.named_buffers(recurse=False)
                 if name.startswith("weight_") or name in CARRIED}
    out = {key: value.detach().clone() for key, value in model.state_dict().items() if key not in skip}
    for path, layer in lte_layers(model):
        out[_join(path, "weight")] = layer.export_weight()
    return out


def _refuse_tied(model: nn.Module) -> None:
    seen: dict[int, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            key = _join(path, pname)
            first = seen.setdefault(id(param), key)
            if first != key:
                raise ModelError(f"parameters '{first}' and '{key}' are the same tensor (tied weights "
                                 "or a module used twice); LTE keeps one base weight per layer, so "
                                 "untie them before prepare")


# Module types whose weights of 2+ dimensions are not linear layers (lookups, convolutions): trained as
# a copy per head under other_params="replica" without being named.
REPLICA_WEIGHT_TYPES = (nn.Embedding, nn.EmbeddingBag, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                        nn.ConvTranspose2d, nn.ConvTranspose3d)


def _check_replicable(cfg: LTEConfig, path, module, pname, param) -> None:
    name = _join(path, pname)
    if next(module.children(), None) is None:
        stats = [b for b, t in module.named_buffers(recurse=False) if t is not None]
        if stats:
            raise ModelError(
                f"module '{path}' ({type(module).__name__}) keeps running statistics {stats}, which "
                "per-head training cannot share; use a model without them or LTEConfig(other_params='frozen')")
        if param.dim() >= 2 and not isinstance(module, REPLICA_WEIGHT_TYPES) and cfg.other_params != "replica_all":
            mib = cfg.heads * param.numel() * 16 / 2**20  # value, gradient and two AdamW moments, fp32
            raise ModelError(
                f"module '{path}' ({type(module).__name__}) has a weight '{pname}' of shape {tuple(param.shape)} that "
                f"lte does not know as a linear layer; a full-rank copy per head would cost {mib:,.2f} MiB "
                f"({cfg.heads} heads x {param.numel():,} values x 16 bytes with gradient and AdamW moments). If it "
                "is a linear layer, register its type with lte.core.register_linear; to train the copies anyway, "
                "LTEConfig(other_params='replica_all'); to keep it at its initial value, other_params='frozen'")
        return
    if param.dim() == 0 or param.shape[0] != 1:
        raise ModelError(
            f"cannot replicate parameter '{name}' per head: it belongs to a module with submodules "
            f"and has shape {tuple(param.shape)} with no leading batch-broadcast dimension of 1; move "
            "it into a leaf module or use LTEConfig(other_params='frozen')")
