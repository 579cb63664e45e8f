"""The trainer: the run config (config), the engine every mode shares (engine: model, batch streams,
optimizer and step, evaluation), the round clock that says when to merge, evaluate, checkpoint and
log (clock), the single-process loop (trainer), local-chunk rounds (chunks), the run directory
(rundir), logging (log), the lte-train command (cli) and the Python entry (entry)."""
from .entry import run

__all__ = ["run"]
