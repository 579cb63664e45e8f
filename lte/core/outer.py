"""The outer optimizer: a merge's change of each master tensor taken as a pseudo-gradient.

A merge finds, for every master tensor, the change the heads agree on: d = (s/N) sum B A for a
layer's weight, d = mean_n p_n - p for a replicated parameter. Without an outer optimizer the
master moves by d. With one, d is what DiLoCo calls the (negated) outer gradient, and the master
moves by an SGD step on it, with momentum m kept per master tensor across merges:

    sgd:       m <- mu m + d;   W <- W + lr m
    nesterov:  m <- mu m + d;   W <- W + lr (d + mu m)

(torch.optim.SGD's update for the gradient -d, with and without nesterov). Long rounds make each
merge's change larger and rarer; momentum carries the direction of the previous merges into the
next ones, which wins back most of what long rounds cost (issue 16's measurements: lr 1.0 and
momentum 0.5 suit LTE, DiLoCo's lr 0.7 / momentum 0.9 do not carry over). The state is one fp32
tensor per master tensor, in the shape the merge writes (a layer's out x in matrix), on plain
tensors, so the simulated trainer and the parameter server step it identically. Each kind is a
class in OUTER_OPTIMIZERS (its step from d and m); a new kind is a class and its registry entry.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError


class OuterOptimizer:
    """The outer step of a merge: `OuterOptimizer(kind, lr, momentum)` is the registered class of that
    kind (none: the merged change applied as it is; sgd; nesterov), lr the outer learning rate and
    momentum mu in [0, 1). `names` says how an error names the three (the run config: lte.outer,
    lte.outer_lr, lte.outer_momentum; by default OuterOptimizer.<name>)."""

    kind = "none"
    active = False  # whether merges take this step instead of applying their change as it is

    def __new__(cls, kind: str = "none", lr: float = 1.0, momentum: float = 0.0, *, names=None):
        if cls is OuterOptimizer:  # the kind names the class, as pathlib.Path(...) picks its flavour
            cls = OUTER_OPTIMIZERS.get(kind) if isinstance(kind, str) else None
            if cls is None:
                raise ConfigError(f"{_name(names, 'kind')} must be one of {tuple(OUTER_OPTIMIZERS)}, got {kind!r}")
        return super().__new__(cls)

    def __init__(self, kind: str = "none", lr: float = 1.0, momentum: float = 0.0, *, names=None):
        self.lr, self.momentum = lr, momentum
        self.momenta: dict[str, torch.Tensor] = {}
        for name, low, high in (("lr", 0.0, math.inf), ("momentum", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not (low <= value < high) or (name == "lr" and value == 0):
                rule = "a finite number > 0" if name == "lr" else "a number in [0, 1)"
                raise ConfigError(f"{_name(names, name)} must be {rule}, got {value!r}")
        if not self.active and (lr != 1.0 or momentum != 0.0):
            raise ConfigError(f"{_name(names, 'kind')} is 'none', so {_name(names, 'lr')} ({lr}) and "
                              f"{_name(names, 'momentum')} ({momentum}) have nothing to act on: choose sgd or "
                              "nesterov, or leave them at 1.0 and 0.0")

    def __repr__(self) -> str:
        return f"OuterOptimizer(kind={self.kind!r}, lr={self.lr}, momentum={self.momentum})"

    def step(self, change: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The move of a master tensor, from its merged change d and its momentum m (already
        m <- mu m + d), written into change's buffer."""
        return change

    @torch.no_grad()
    def apply(self, name: str, target: torch.Tensor, change: torch.Tensor) -> None:
        """Move `target` (a master tensor, or a view of it) by the merged `change` d. change is
        consumed: the move is computed in its buffer, so a merge needs no master-sized temporary
        beyond it (a 1B master's largest tensors are 250 MiB each)."""
        m = self.momenta.get(name)
        if m is None:
            m = self.momenta[name] = torch.zeros(change.shape, dtype=torch.float32, device=change.device)
        m.mul_(self.momentum).add_(change)
        target.add_(self.step(change, m).mul_(self.lr).to(target.dtype))

    def describe(self) -> str:
        return f"outer {self.kind} (lr {self.lr:g}, momentum {self.momentum:g})" if self.active else ""

    def state_dict(self) -> dict:
        return {"kind": self.kind, "lr": self.lr, "momentum": self.momentum,
                "momenta": {k: v.detach().cpu().clone() for k, v in self.momenta.items()}}

    def load_state_dict(self, state: dict | None, device: torch.device | str = "cpu") -> None:
        """Restore the momenta of a checkpoint taken with the same settings (None: a checkpoint
        written before outer optimizers existed, whose merges had none)."""
        state = state or OuterOptimizer().state_dict()
        saved = (state["kind"], state["lr"], state["momentum"])
        if saved != (self.kind, self.lr, self.momentum):
            raise ConfigError(f"the checkpoint's outer optimizer {saved} differs from this run's "
                              f"{(self.kind, self.lr, self.momentum)}: resume with the settings it was started with")
        self.momenta = {k: v.to(device) for k, v in state["momenta"].items()}


class SGD(OuterOptimizer):
    kind, active = "sgd", True

    def step(self, change, m):
        return change.copy_(m)


class Nesterov(OuterOptimizer):
    kind, active = "nesterov", True

    def step(self, change, m):
        return change.add_(m, alpha=self.momentum)


OUTER_OPTIMIZERS: dict[str, type[OuterOptimizer]] = {c.kind: c for c in (OuterOptimizer, SGD, Nesterov)}


def _name(names, field: str) -> str:
    return (names or {}).get(field, f"OuterOptimizer.{field}")
