"""When things happen in a run: the one cadence rule every loop follows (the single-process
trainer, a DDP rank, the parameter server and its workers).

Everything is a function of `step`, the number of optimizer steps done so far. A round is a run
of steps between merges; lte.merge_every says how long each is (ROUND_LENGTHS):

  10                              every round 10 steps (the last one may be shorter)
  [[0, 10], [500, 50]]            rounds of 10 steps from step 0, of 50 from the first round that
                                  starts at or after step 500
  {schedule: qsr, min: 10, max: 200}
                                  a round starting after `step` steps lasts min / f^2 steps (floor),
                                  f = the learning rate's fraction of its peak at that step (1 during
                                  warm-up), within [min, max]: rounds grow as the learning rate falls
                                  (Quadratic Synchronization Rule, Gu et al. 2023, arXiv 2310.14423)

The run's round ends are computed once, from the config alone, so every process agrees on them.
At a round's end the run merges (LTE modes), evaluates every eval.every rounds and at the end, and
checkpoints every checkpoint.every rounds (the final checkpoint is written by the loop's end, not
here); with comm.overlap those rounds and the last settle (their merge is not left in flight).
Progress rows go out every train.log_every steps and whenever the run evaluates (a round end that
carries per-chunk losses adds one too: the loop's choice, as it knows).
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Constant:
    """Every round `steps` long."""

    steps: int

    def __call__(self, step: int) -> int:
        return self.steps

    def describe(self) -> str:
        return f"merge every {self.steps} steps"


@dataclass(frozen=True)
class Piecewise:
    """Rounds of `lengths[i]` steps from step `starts[i]` on (a round takes the length in force at
    its first step)."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    def __call__(self, step: int) -> int:
        return self.lengths[bisect.bisect_right(self.starts, step) - 1]

    def describe(self) -> str:
        return "merge every " + ", ".join(f"{t} steps from step {s}" for s, t in zip(self.starts, self.lengths))


@dataclass(frozen=True)
class QSR:
    """min / f^2 steps (floor) within [min, max], f the learning rate's fraction of its peak at the
    round's first step, 1 during warm-up."""

    min: int
    max: int
    lr_factor: Callable[[int], float]
    warmup: int

    def __call__(self, step: int) -> int:
        f = 1.0 if step < self.warmup else self.lr_factor(step)
        if f <= 0:
            return self.max
        return max(self.min, min(self.max, math.floor(self.min / (f * f))))

    def describe(self) -> str:
        return f"rounds of {self.min} to {self.max} steps growing as the learning rate falls (qsr)"


def round_lengths(spec, lr_factor: Callable[[int], float], warmup: int):
    """The round-length rule lte.merge_every names (see the module's docstring), or a one-line
    ConfigError. `lr_factor`: the learning rate's fraction of its peak at a step (train.schedule)."""
    key = "lte.merge_every"
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ConfigError(f"{key} must be >= 1, got {spec}")
        return Constant(spec)
    if isinstance(spec, dict):
        if spec.get("schedule") != "qsr" or set(spec) - {"schedule", "min", "max"}:
            raise ConfigError(f"{key} as a mapping must be {{schedule: qsr, min: M, max: N}}, got {spec!r}")
        lo, hi = spec.get("min"), spec.get("max")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not 1 <= lo <= hi:
            raise ConfigError(f"{key}: qsr's min and max must be integers with 1 <= min <= max, got {spec!r}")
        return QSR(lo, hi, lr_factor, warmup)
    if isinstance(spec, list) and spec:
        pairs = [p for p in spec if isinstance(p, list) and len(p) == 2
                 and all(isinstance(v, int) and not isinstance(v, bool) for v in p)]
        starts = [p[0] for p in pairs]
        if (len(pairs) != len(spec) or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:]))
                or any(p[1] < 1 for p in pairs)):
            raise ConfigError(f"{key} as a list must be [[step, T], ...] pairs, the first at step 0, the steps "
                              f"increasing and every T >= 1, got {spec!r}")
        return Piecewise(tuple(starts), tuple(p[1] for p in pairs))
    raise ConfigError(f"{key} must be an integer, a list of [step, T] pairs or {{schedule: qsr, min: M, max: N}}, "
                      f"got {spec!r}")


@dataclass(frozen=True)
class RoundClock:
    steps: int              # train.steps
    ends: tuple[int, ...]   # the steps at which rounds end, increasing, the last train.steps
    eval_every: int         # eval.every: rounds between evaluations; 0 = at the end only
    checkpoint_every: int   # checkpoint.every: rounds between checkpoints; 0 = the final one only
    log_every: int          # train.log_every: steps between progress rows
    describe_rounds: str = ""  # what lte.merge_every says, in words

    @classmethod
    def of(cls, cfg) -> RoundClock:
        """The clock of a run's Config (lte.runtime.config, which imports this module for the rules)."""
        lengths = cfg.lte.round_lengths(cfg.train)
        return cls(cfg.train.steps, round_ends(lengths, cfg.train.steps), cfg.eval.every, cfg.checkpoint.every,
                   cfg.train.log_every, lengths.describe())

    def round_steps(self, step: int) -> int:
        """The length of the round that starts after `step` steps."""
        return self.ends[bisect.bisect_right(self.ends, step)] - step if step < self.steps else 0

    def ends_round(self, step: int) -> bool:
        i = bisect.bisect_left(self.ends, step)
        return step == self.steps or (i < len(self.ends) and self.ends[i] == step)

    def round_of(self, step: int) -> int:
        """The number of the round that step `step` completes (1-based)."""
        return bisect.bisect_left(self.ends, step) + 1 if step > 0 else 0

    @property
    def rounds(self) -> int:
        return len(self.ends)

    def evaluates(self, step: int) -> bool:
        return step == self.steps or (self.ends_round(step) and self.eval_every > 0
                                      and self.round_of(step) % self.eval_every == 0)

    def checkpoints(self, step: int) -> bool:
        """A checkpoint within the run; the one at its last step is the loop's final checkpoint."""
        return (self.ends_round(step) and self.checkpoint_every > 0 and step < self.steps
                and self.round_of(step) % self.checkpoint_every == 0)

    def settles(self, step: int) -> bool:
        """With comm.overlap, whether the round ending at `step` waits for its own merge instead of
        leaving it in flight: a checkpoint round (so a checkpoint holds nothing in flight) and the last."""
        return self.checkpoints(step) or step == self.steps

    def mean_round(self) -> float:
        """Steps per round over the run."""
        return self.steps / max(1, len(self.ends))

    def logs(self, step: int, since: int | None = None) -> bool:
        """Whether a progress row is due after `step` steps, the previous check having been after
        `since` steps (default: the step before): a multiple of log_every passed, the step evaluates,
        or the run ended."""
        since = step - 1 if since is None else since
        return self.evaluates(step) or step // self.log_every != since // self.log_every


def round_ends(lengths, steps: int) -> tuple[int, ...]:
    """The steps at which the rounds of `lengths` (a round-length rule) end over `steps` steps."""
    ends, step = [], 0
    while step < steps:
        step = min(steps, step + lengths(step))
        ends.append(step)
    return tuple(ends)
