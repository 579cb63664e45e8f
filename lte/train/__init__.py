"""The trainer: config, loop, checkpoints, logging and the lte-train command."""
