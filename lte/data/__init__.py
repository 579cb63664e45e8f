"""Data sets by name or import path, the per-head batch streams, and the loaders that feed them."""
from __future__ import annotations

import inspect
from collections.abc import Callable

from ..errors import ConfigError
from ..imports import is_import_path, load_callable
from .base import SAMPLINGS, TASKS, ArrayDataset, DataBundle, MapDataset, as_dataset
from .digits import digits
from .imagefolder import imagefolder
from .loader import EvalBatches, TrainBatches
from .streams import HeadBatches, IndexStream
from .synthetic import synthetic
from .text import text
from .tokens import tokens
from .torchvision_sets import cifar10, cifar100, stl10

DATASETS: dict[str, Callable[..., DataBundle]] = {
    "digits": digits, "synthetic": synthetic, "imagefolder": imagefolder,
    "cifar10": cifar10, "cifar100": cifar100, "stl10": stl10, "text": text, "tokens": tokens}


def register_data(fn: Callable[..., DataBundle], name: str | None = None) -> Callable[..., DataBundle]:
    """Make `fn(seed=..., **data.args) -> DataBundle` available as data.name=<name> (default: fn's name)."""
    DATASETS[name or fn.__name__] = fn
    return fn


def build_data(name: str, seed: int, args: dict) -> DataBundle:
    """The data set `name` (registered, or package.module:callable) built with data.args."""
    if name in DATASETS:
        builder = DATASETS[name]
    elif is_import_path(name):
        builder = load_callable(name, "data.name")
    else:
        raise ConfigError(f"data.name: unknown data set {name!r}; known: {sorted(DATASETS)}, "
                          "or an import path package.module:callable")
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = set(params) - {"seed"}
    unknown = sorted(set(args) - accepted)
    if unknown and not takes_any:
        raise ConfigError(f"data.args: {name} does not take {unknown}; it takes {sorted(accepted)}")
    try:
        bundle = builder(**({"seed": seed} if "seed" in params or takes_any else {}), **args)
    except ConfigError:
        raise  # already names its key
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ConfigError(f"data.args: {name}: {exc}") from exc
    if not isinstance(bundle, DataBundle):
        raise ConfigError(f"data.name: {name} returned a {type(bundle).__name__}, not an lte.data.DataBundle")
    return bundle


__all__ = ["ArrayDataset", "DataBundle", "MapDataset", "as_dataset", "HeadBatches", "IndexStream", "TrainBatches",
           "EvalBatches", "build_data", "register_data", "DATASETS", "TASKS", "SAMPLINGS"]
