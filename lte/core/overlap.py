"""comm.overlap: rounds whose merge is in flight while the next round trains.

With overlap, a parameter server's workers upload round k and go straight on to round k+1 against
the base they already hold; round k's merge and download arrive while they compute, and they
install it at the end of round k+1. So round k+1 trains against the master of round k-1, and its
change is merged into the master of round k: one round stale (Streaming DiLoCo's overlap).

Stale alone fails LTE: a head restarted on a base without its last round's progress finds that
progress again, and the merge counts it twice (measured on digits in docs/distributed.md). So each
head carries its round in flight (`CarriedRound`): its factors stay in its forward beside the new ones
(W + s B_c A_c + s B A: a head of rank r runs at rank 2r) and each replica copy restarts from the
base's value plus its own change; what the next upload sends is what moved after that. When the
merge arrives its carried part is dropped, as the new base holds it (averaged with the others').

`OverlappedMerge` runs the same in one process (simulated heads): the model's base is what the heads train
against, `OverlappedMerge.master` the master one merge ahead of it. A round that settles (the clock's: a
checkpoint round and the last) waits for its own merge and carries nothing, so a checkpoint holds
nothing in flight and a resumed run goes on exactly as an uninterrupted one.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .algebra import HEADS_SUFFIX, merge_into
from .outer import OuterOptimizer
from .robust import Robust
from .inject import finish_merge, head_state, lte_layers, master_state, state_of
from .upload import Uploader, through_uploads


class CarriedRound:
    """What a model's heads carry of their round whose merge is in flight."""

    def __init__(self):
        self.replicas: dict[str, torch.Tensor] = {}  # replica name -> each head's change in that round

    def references(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The value each replica's copies started their round from (heads on dim 0 when carried):
        what an upload sends is a copy's change from it."""
        sd = model.state_dict()
        return {name: sd[name].float() + self.replicas[name] if name in self.replicas else sd[name]
                for name in state_of(model).spec.replicas}

    @torch.no_grad()
    def take(self, model: nn.Module) -> None:
        """CarriedRound the round that just ended (call before the heads reset and before a base is installed)."""
        references, heads = self.references(model), head_state(model)
        for _, layer in lte_layers(model):
            layer.lora_Ac.copy_(layer.lora_A)
            layer.lora_Bc.copy_(layer.lora_B)
        self.replicas = {name: heads[name + HEADS_SUFFIX].detach().float() - ref for name, ref in references.items()}

    @torch.no_grad()
    def drop(self, model: nn.Module) -> None:
        """CarriedRound nothing: the base holds every round."""
        for _, layer in lte_layers(model):
            if layer.lora_Ac is not None:  # a model prepared without overlap carries nothing
                layer.lora_Ac.zero_()
                layer.lora_Bc.zero_()
        self.replicas = {}

    @torch.no_grad()
    def restart(self, model: nn.Module) -> None:
        """After the heads' reset: each replica copy from the base's value plus its carried change."""
        heads = head_state(model)
        for name, change in self.replicas.items():
            heads[name + HEADS_SUFFIX].add_(change.to(heads[name + HEADS_SUFFIX].dtype))


class OverlappedMerge:
    """Merges one round stale in one process (simulated heads): the heads train against the model's
    base while `master`, one merge ahead of it, takes their change."""

    def __init__(self):
        self.master: dict[str, torch.Tensor] | None = None  # taken from the base at the first merge
        self.carry = CarriedRound()

    @torch.no_grad()
    def merge(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, outer: OuterOptimizer | None,
              upload: Uploader, settle: bool, robust: Robust | None = None):
        """lte.core.merge one round stale: the heads' change goes into the master ahead, and the base
        becomes the master as it was before this merge (or after it, if the round settles)."""
        state, base, heads = state_of(model), master_state(model), head_state(model)
        if self.master is None:
            self.master = {k: t.detach().clone() for k, t in base.items()}
        keys = state.spec.trained_keys(not state.activations.trains_A)
        heads = through_uploads(heads, {**base, **self.carry.references(model)}, keys, upload, onto=self.master)
        if settle:
            self.carry.drop(model)
        else:
            self.carry.take(model)
            _copy(base, self.master)
        outcome = merge_into(self.master, heads, state.spec, outer=outer, robust=robust)
        if settle:
            _copy(base, self.master)
        finish_merge(model, optimizer)
        self.carry.restart(model)
        return outcome

    @contextmanager
    def newest(self, model: nn.Module):
        """The model with the master ahead as its weights (to evaluate what a server would), then back."""
        if self.master is None:
            yield
            return
        base = master_state(model)
        held = {k: t.detach().clone() for k, t in base.items()}
        _copy(base, self.master)
        try:
            yield
        finally:
            _copy(base, held)


@torch.no_grad()
def _copy(into: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    for k, t in into.items():
        t.copy_(source[k])
