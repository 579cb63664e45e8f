"""The trainer: config, loop, checkpoints, logging, the lte-train command and the Python entry."""
from .entry import run

__all__ = ["run"]
