"""A merge that no single head can move far: heads whose change is an outlier are clipped or dropped.

A head's change in a merge is, per master tensor, s B_h A_h for a layer (its Frobenius norm from
the r x r Gram matrices, ||B A||^2 = sum((A A^T) * (B^T B)), without forming B A) and p_h - p for a
replicated parameter; its overall change is the norm of all of them together. Each is compared
with the median over the round's heads: beyond `ratio` times the median a head is

  clip   scaled down to `ratio` x the median, tensor by tensor, then overall (its B and its replicas'
         change multiplied by the factor, so the merge takes the clipped change);
  drop   left out of the merge (N = the heads kept, as for a non-finite update). A head strays in
         any of its tensors, so at ratios near 1 every head can be dropped: that merge then
         changes nothing.

A median of zero (a tensor no head changed) bounds nothing. The rule is the same in a simulated
run and on a parameter server (lte.core.algebra.merge_into applies it to the heads it merges), so
ps == lte holds with it; the server receives decoded uploads, so it judges what it merges. With
fewer heads than two it does nothing: there is no majority to compare with. RULES is the registry
dist.robust names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass
class Outcome:
    """What the rule did to each head it saw (bool per head, in the order given)."""

    clipped: torch.Tensor
    dropped: torch.Tensor
    worst: float = 0.0   # the largest change / median over the heads' tensors and totals (how near the bound)


class Robust:
    """dist.robust=none: every head as it is."""

    name = "none"
    active = False

    def __init__(self, ratio: float = 4.0):
        self.ratio = ratio

    def bounds(self, norms: torch.Tensor) -> torch.Tensor:
        """ratio x the median over heads of each column of norms (heads x tensors); inf where the
        median is zero."""
        median = torch.quantile(norms, 0.5, dim=0)
        return torch.where(median > 0, median * self.ratio, torch.full_like(median, float("inf")))

    def worst(self, norms: torch.Tensor) -> float:
        """The largest norm / median of its column, the heads' totals as one more column."""
        columns = torch.cat([norms, norms.pow(2).sum(1, keepdim=True).sqrt()], dim=1)
        ratios = columns / torch.quantile(columns, 0.5, dim=0)
        return float(ratios[torch.isfinite(ratios)].max()) if torch.isfinite(ratios).any() else 0.0

    def factors(self, norms: torch.Tensor) -> tuple[torch.Tensor, Outcome]:
        """Each head's factor per tensor (heads x tensors) and what happened to it."""
        none = torch.zeros(norms.shape[0], dtype=torch.bool)
        return torch.ones_like(norms), Outcome(none, none)

    def describe(self) -> str:
        return f"{self.name} heads beyond {self.ratio:g}x the median change" if self.active else ""


class Clip(Robust):
    name, active = "clip", True

    def factors(self, norms):
        per_tensor = (self.bounds(norms) / norms.clamp_min(1e-30)).clamp(max=1.0)
        clipped = norms * per_tensor
        overall = clipped.pow(2).sum(1, keepdim=True).sqrt()
        head = (self.bounds(overall) / overall.clamp_min(1e-30)).clamp(max=1.0)
        factors = per_tensor * head
        return factors, Outcome((factors < 1).any(1), torch.zeros(norms.shape[0], dtype=torch.bool),
                                self.worst(norms))


class Drop(Robust):
    name, active = "drop", True

    def factors(self, norms):
        overall = norms.pow(2).sum(1, keepdim=True).sqrt()
        out = (norms > self.bounds(norms)).any(1) | (overall > self.bounds(overall)).squeeze(1)
        factors = torch.where(out.unsqueeze(1), torch.zeros_like(norms), torch.ones_like(norms))
        return factors, Outcome(torch.zeros_like(out), out, self.worst(norms))


RULES: dict[str, type[Robust]] = {r.name: r for r in (Robust, Clip, Drop)}


def get_rule(name: str, ratio: float, key: str = "dist.robust") -> Robust:
    if not isinstance(name, str) or name not in RULES:
        raise ConfigError(f"{key} must be one of {tuple(RULES)}, got {name!r}")
    return RULES[name](ratio)


def change_norms(factors: list[tuple[torch.Tensor, torch.Tensor]], replicas: list[torch.Tensor], scale: float
                 ) -> torch.Tensor:
    """heads x tensors: each head's change norm, per layer (its (A, B), heads on dim 0) and per
    replica (its copies' change, heads on dim 0)."""
    columns = []
    for A, B in factors:
        A, B = A.float(), B.float()
        gram_a, gram_b = torch.bmm(A, A.transpose(1, 2)), torch.bmm(B.transpose(1, 2), B)
        columns.append((gram_a * gram_b).sum((1, 2)).clamp_min(0).sqrt() * scale)
    columns += [change.float().flatten(1).norm(dim=1) for change in replicas]
    return torch.stack(columns, dim=1)


class Record:
    """Over a run, how many rounds the rule clipped or dropped each of `units` (a worker's heads, or
    one simulated head): a unit counts in a round when any of its heads did."""

    def __init__(self, units: int):
        self.clipped, self.dropped = [0] * units, [0] * units
        self.worst = 0.0  # the largest change / median of the run's merges

    def add(self, outcome: Outcome | None, units: list[int]) -> tuple[list[int], list[int]]:
        """Count a round whose merged heads belonged to `units` (one entry per head, in the merge's
        order); the units clipped and dropped in it."""
        if outcome is None:
            return [], []
        self.worst = max(self.worst, outcome.worst)
        hit = {}
        for unit, c, d in zip(units, outcome.clipped.tolist(), outcome.dropped.tolist()):
            clipped, dropped = hit.get(unit, (False, False))
            hit[unit] = (clipped or c, dropped or d)
        clipped = sorted(u for u, (c, _) in hit.items() if c)
        dropped = sorted(u for u, (_, d) in hit.items() if d)
        for u in clipped:
            self.clipped[u] += 1
        for u in dropped:
            self.dropped[u] += 1
        return clipped, dropped

    def note(self, outcome: Outcome | None, units: list[int], round_no: int, rule: str, what: str,
             label=lambda unit: unit) -> list[str]:
        """Count a round (add) and say what it bounded: the log lines naming the units, `what` they
        are and `label` each one's name (a worker's rank)."""
        clipped, dropped = self.add(outcome, units)
        return [f"round {round_no}: the outlier change of {what} {[label(u) for u in us]} {verb} (dist.robust={rule})"
                for verb, us in (("clipped", clipped), ("dropped", dropped)) if us]

    def state_dict(self) -> dict:
        return {"clipped": list(self.clipped), "dropped": list(self.dropped), "worst": self.worst}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.clipped, self.dropped = list(state["clipped"]), list(state["dropped"])
            self.worst = state.get("worst", 0.0)

    def totals(self) -> dict:
        """What a run's summary says of the rule over the whole run."""
        return {"robust_worst_ratio": round(self.worst, 3)}

    def row(self, unit: int) -> dict:
        return {"rounds_clipped": self.clipped[unit], "rounds_dropped_outlier": self.dropped[unit]}
