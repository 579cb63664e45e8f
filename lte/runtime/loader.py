"""Reading a config: a YAML file and dotted `key=value` overrides, into a tree of dataclasses.

Generic: it knows nothing of what the keys mean. A dataclass is a section; each field's type hint
says how its value is read (bool, int, float, str, dict, an optional one, a nested section), and a
key that no field names is refused, naming the key and what its section takes. What the values
must be is each section's own business (lte.runtime.config).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml

from ..errors import ConfigError


def read_yaml(path: str) -> dict:
    """The mapping a YAML config file holds, or a ConfigError saying why it is not one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    return raw


def with_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of the nested mapping `raw` with each `dotted.key=value` (the value read as YAML) set."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({first})") from None
        _set_dotted(raw, key.strip(), value)
    return raw


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def build(cls, raw, prefix: str = ""):
    """An instance of the dataclass `cls` from the mapping `raw`; `prefix` is its keys' dotted path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; "
                          f"{prefix.rstrip('.') or 'the top level'} takes {sorted(names)}")
    return cls(**{name: coerce(hints[name], raw[name], prefix + name) for name in names & set(raw)})


def coerce(tp, value, key: str):
    """`value` as the type hint `tp` says, or a ConfigError naming `key`."""
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, key + ".")
    if tp is typing.Any:  # a key of several shapes: its section's check says which it takes
        return value
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    if optional:
        if value is None:
            return None
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    raise TypeError(f"no coercion for {tp}")
