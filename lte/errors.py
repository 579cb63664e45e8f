"""Errors a user can cause and fix: the CLI prints these as one line instead of a traceback."""


class UserError(Exception):
    """Base for errors caused by a config, a launch or an input, not by a bug in lte."""


class ConfigError(UserError, ValueError):
    """A config key is unknown, missing or has a bad value; the message names the key."""


class BatchError(UserError, ValueError):
    """A training batch cannot be split into equal per-head slices."""


class ModelError(UserError, ValueError):
    """A model cannot be prepared for LTE (no nn.Linear, unsupported module, tied weights...)."""


class DataError(UserError, ValueError):
    """A data file cannot be read (a corrupt image, say); the message names the file."""
