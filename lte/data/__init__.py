"""Data sets by name, and the per-head batch streams."""
from __future__ import annotations

import inspect

from ..errors import ConfigError
from .base import ArrayDataset, DataBundle
from .digits import digits
from .streams import HeadBatches, IndexStream
from .synthetic import synthetic

DATASETS = {"digits": digits, "synthetic": synthetic}


def build_data(name: str, seed: int, args: dict) -> DataBundle:
    if name not in DATASETS:
        raise ConfigError(f"data.name: unknown data set {name!r}; known: {sorted(DATASETS)}")
    builder = DATASETS[name]
    accepted = set(inspect.signature(builder).parameters) - {"seed"}
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise ConfigError(f"data.args: {name} does not take {unknown}; it takes {sorted(accepted)}")
    try:
        return builder(seed=seed, **args)
    except ValueError as exc:
        raise ConfigError(f"data.args: {exc}") from exc


__all__ = ["ArrayDataset", "DataBundle", "HeadBatches", "IndexStream", "build_data", "DATASETS"]
