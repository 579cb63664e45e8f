"""The merge algebra, on plain tensors, so the simulated trainer and the parameter server share it.

A merge moves the heads' progress into the master weights:
    W <- W + (s / N) * sum_n B_n A_n          one matmul over the concatenated factors, in fp32
    p <- mean_n p_n                           for every replicated parameter
Tensors are named as in a prepared model's state_dict: a layer L owns the master "L.weight"
and the heads "L.lora_A" (N x r x in) and "L.lora_B" (N x out x r); a replicated parameter P
owns the master "P" and the heads "P_heads" (N x *P.shape).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .outer import OuterOptimizer
from .robust import Outcome, Robust, change_norms

HEADS_SUFFIX = "_heads"


@dataclass(frozen=True)
class MergeSpec:
    """What a merge touches: the LTE layers and the replicated parameters, by name."""

    layers: tuple[str, ...]      # module paths of LTE layers; master key "L.weight"
    replicas: tuple[str, ...]    # parameter names (incl. LTE layer biases); heads key f"{P}_heads"
    scale: float                 # s = alpha / rank
    resetless: bool = False      # reset="none": merge B A - B0 A0 (what changed since last merge)
    transposed: tuple[str, ...] = ()  # layers whose master weight is stored in x out (transformers' Conv1D)

    def matrix(self, layer: str, weight: torch.Tensor) -> torch.Tensor:
        """A layer's master weight as its out x in matrix: a view, so writing to it writes the master
        (a patch conv's out x C x kh x kw flattens; a transposed layer's in x out transposes)."""
        return weight.T if layer in self.transposed else weight.view(weight.shape[0], -1)

    def matrix_shape(self, layer: str, shape: tuple[int, ...]) -> tuple[int, int]:
        """The out x in shape of a layer whose master weight has `shape`."""
        if layer in self.transposed:
            return (shape[1], shape[0])
        return (shape[0], math.prod(shape[1:]))

    def master_keys(self) -> list[str]:
        return [key(layer, "weight") for layer in self.layers] + list(self.replicas)

    def head_keys(self) -> list[str]:
        keys = []
        for layer in self.layers:
            keys += [key(layer, "lora_A"), key(layer, "lora_B")]
            if self.resetless:
                keys += [key(layer, "lora_A0"), key(layer, "lora_B0")]
        return keys + [p + HEADS_SUFFIX for p in self.replicas]

    def trained_keys(self, frozen_A: bool = False) -> list[str]:
        """The head tensors an optimizer trains: not the reset-less snapshots, nor A under LoRA-FA."""
        untrained = ("lora_A0", "lora_B0", "lora_A") if frozen_A else ("lora_A0", "lora_B0")
        return [k for k in self.head_keys() if not k.endswith(untrained)]


def key(path: str, name: str) -> str:
    """state_dict key of `name` on the module at `path` ("" is the root)."""
    return f"{path}.{name}" if path else name


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """(scale / N) * sum_n B_n A_n for A: N x r x in, B: N x out x r, as [B_1..B_N] @ [A_1;..;A_N]."""
    n, r, d_in = A.shape
    d_out = B.shape[1]
    b_cat = B.float().permute(1, 0, 2).reshape(d_out, n * r)
    a_cat = A.float().reshape(n * r, d_in)
    return torch.mm(b_cat, a_cat).mul_(scale / n)


@torch.no_grad()
def merge_into(master: dict[str, torch.Tensor], heads: dict[str, torch.Tensor], spec: MergeSpec,
               keep: torch.Tensor | None = None, outer: OuterOptimizer | None = None,
               robust: Robust | None = None) -> Outcome | None:
    """Apply one merge to `master` in place.

    heads holds every head's tensors stacked on dim 0 in global head order; `keep` (a bool mask
    over heads) leaves some out, and the average is then over the kept heads only. `outer` (an
    active OuterOptimizer) takes each master tensor's merged change as its pseudo-gradient.
    `robust` (lte.core.robust) clips or drops the kept heads whose change is an outlier; what it
    did to each kept head (in their order) is returned.
    """
    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if keep is None else t[keep.to(t.device)]

    weights = {layer: spec.matrix(layer, master[key(layer, "weight")]) for layer in spec.layers}
    factors = {layer: tuple(t.to(weights[layer].device) for t in _factors(heads, layer, spec, pick))
               for layer in spec.layers}
    copies = {name: pick(heads[name + HEADS_SUFFIX]).float().to(master[name].device) for name in spec.replicas}
    outcome, heads_merged = None, next(iter(factors.values()))[0].shape[0]  # a prepared model has a layer
    if robust is not None and robust.active and heads_merged > 1:
        factors, copies, outcome = _robust(robust, master, factors, copies, spec)
        if bool(outcome.dropped.all()):  # no head left to average (ratios near 1): the master stays
            return outcome
    _apply(master, weights, factors, copies, spec, outer if outer is not None and outer.active else None)
    return outcome


def _factors(heads, layer: str, spec: MergeSpec, pick) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's (A, B) as the merge takes them: with reset="none", what changed since the last merge."""
    A, B = heads[key(layer, "lora_A")], heads[key(layer, "lora_B")]
    if spec.resetless:
        A = torch.cat([A, heads[key(layer, "lora_A0")]], dim=1)
        B = torch.cat([B, -heads[key(layer, "lora_B0")]], dim=2)
    return pick(A), pick(B)


def _robust(robust: Robust, master, factors: dict, copies: dict, spec: MergeSpec):
    """The heads as the robust rule leaves them: a clipped head's B and replica changes scaled, a
    dropped head left out. A head the rule leaves alone keeps its tensors bit for bit (a replica
    copy rebuilt as master + change would not be), so a run where it never bites is the plain one."""
    changes = {name: c - master[name].float() for name, c in copies.items()}
    norms = change_norms(list(factors.values()), list(changes.values()), spec.scale)
    scale, outcome = robust.factors(norms.cpu())
    kept = ~outcome.dropped
    bounds = lambda column, t: scale[:, column].to(t).view(-1, *([1] * (t.dim() - 1)))  # noqa: E731
    layers = {layer: (A[kept.to(A.device)], (B * bounds(i, B))[kept.to(B.device)])  # x 1.0 is exact
              for i, (layer, (A, B)) in enumerate(factors.items())}
    replicas = {}
    for j, (name, c) in enumerate(copies.items()):
        f = bounds(len(factors) + j, c)
        replicas[name] = torch.where(f < 1, master[name].float() + changes[name] * f, c)[kept.to(c.device)]
    return layers, replicas, outcome


def _apply(master, weights: dict, factors: dict, copies: dict, spec: MergeSpec, outer: OuterOptimizer | None):
    for layer, W in weights.items():
        A, B = factors[layer]
        change = lora_delta(A, B, spec.scale)
        if outer is None:
            W.add_(change.to(W.dtype))
        else:
            outer.apply(key(layer, "weight"), W, change)
    for name, stack in copies.items():
        mean = stack.mean(0)
        if outer is None:
            master[name].copy_(mean)
        else:
            outer.apply(name, master[name], mean - master[name].float())
