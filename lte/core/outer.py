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
tensors, so the simulated trainer and the parameter server step it identically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

KINDS = ("none", "sgd", "nesterov")


@dataclass
class OuterOptimizer:
    """kind: none (apply the merged change as it is) | sgd | nesterov; lr: the outer learning rate;
    momentum: mu in [0, 1)."""

    kind: str = "none"
    lr: float = 1.0
    momentum: float = 0.0
    momenta: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"OuterOptimizer.kind must be one of {KINDS}, got {self.kind!r}")
        for name, low, high in (("lr", 0.0, math.inf), ("momentum", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not (low <= value < high) or (name == "lr" and value == 0):
                rule = "a finite number > 0" if name == "lr" else "a number in [0, 1)"
                raise ConfigError(f"OuterOptimizer.{name} must be {rule}, got {value!r}")
        if self.kind == "none" and (self.lr != 1.0 or self.momentum != 0.0):
            raise ConfigError(f"OuterOptimizer.kind is 'none', so OuterOptimizer.lr ({self.lr}) and "
                              f"OuterOptimizer.momentum ({self.momentum}) have nothing to act on: choose sgd or "
                              "nesterov, or leave them at 1.0 and 0.0")

    @property
    def active(self) -> bool:
        return self.kind != "none"

    @torch.no_grad()
    def apply(self, name: str, target: torch.Tensor, change: torch.Tensor) -> None:
        """Move `target` (a master tensor, or a view of it) by the merged `change` d."""
        m = self.momenta.get(name)
        if m is None:
            m = self.momenta[name] = torch.zeros(change.shape, dtype=torch.float32, device=change.device)
        m.mul_(self.momentum).add_(change)
        step = change.add(m, alpha=self.momentum) if self.kind == "nesterov" else m
        target.add_(step.mul(self.lr).to(target.dtype))

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
