"""Builders named by import path in a config ("package.module:callable"), for models and data
sets that live outside lte."""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from .errors import ConfigError


def is_import_path(name: str) -> bool:
    return ":" in name


def load_callable(path: str, key: str) -> Callable:
    """Import `module:attr[.attr]` and return the callable, or a ConfigError naming `key`."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}: {path!r} is not an import path of the form package.module:callable")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise ConfigError(f"{key}: cannot import module {module_name!r} of {path!r} "
                          f"({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module {module_name!r} has no {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {path!r} is a {type(obj).__name__}, not a callable")
    return obj


def accepted(fn: Callable, offered: dict) -> dict:
    """The entries of `offered` that fn takes as keyword arguments (all of them if it takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return dict(offered)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    return {k: v for k, v in offered.items() if k in params}
