"""When things happen in a run: the one cadence rule every loop follows (the single-process
trainer, a DDP rank, the parameter server and its workers).

Everything is a function of `step`, the number of optimizer steps done so far. A round is
lte.merge_every steps (the last one may be shorter); rounds end at multiples of merge_every and at
train.steps. At a round's end the run merges (LTE modes), evaluates every eval.every rounds and at
the end, and checkpoints every checkpoint.every rounds (the final checkpoint is written by the
loop's end, not here); with comm.overlap those rounds and the last settle (their merge is not left
in flight). Progress rows go out every train.log_every steps and whenever the run evaluates (a
round end that carries per-chunk losses adds one too: the loop's choice, as it knows).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import Config


@dataclass(frozen=True)
class RoundClock:
    steps: int              # train.steps
    merge_every: int        # lte.merge_every: steps per round
    eval_every: int         # eval.every: rounds between evaluations; 0 = at the end only
    checkpoint_every: int   # checkpoint.every: rounds between checkpoints; 0 = the final one only
    log_every: int          # train.log_every: steps between progress rows

    @classmethod
    def of(cls, cfg: Config) -> RoundClock:
        return cls(cfg.train.steps, cfg.lte.merge_every, cfg.eval.every, cfg.checkpoint.every, cfg.train.log_every)

    def round_steps(self, step: int) -> int:
        """The length of the round that starts after `step` steps."""
        return min(self.merge_every - step % self.merge_every, self.steps - step)

    def ends_round(self, step: int) -> bool:
        return step % self.merge_every == 0 or step == self.steps

    def round_of(self, step: int) -> int:
        """The number of the round that step `step` completes (1-based)."""
        return -(-step // self.merge_every)

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

    def logs(self, step: int, since: int | None = None) -> bool:
        """Whether a progress row is due after `step` steps, the previous check having been after
        `since` steps (default: the step before): a multiple of log_every passed, the step evaluates,
        or the run ended."""
        since = step - 1 if since is None else since
        return self.evaluates(step) or step // self.log_every != since // self.log_every
