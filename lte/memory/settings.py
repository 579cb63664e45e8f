"""Settings that memory options declare for themselves (VeLoRA's sub-token size, say).

An option class lists its settings (`settings = (Setting("velora_subtoken", 128, ...),)`); every
config that holds the options (lte.LTEConfig, the run config's worker.* and worker.per_rank) gets
one field per declared setting, named by its key, from `with_settings`. So a new option with a
setting is its class and its registry line: the setting's key, default, check and docs come from
the declaration, and nothing else names it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Setting:
    """An integer setting of a memory option: its key (the same in LTEConfig and worker.*), default,
    smallest allowed value and what it means."""

    key: str
    default: int
    minimum: int
    doc: str

    def check(self, value, key: str) -> None:
        """Refuse a bad value, naming it as `key` (the caller's name for the setting)."""
        if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
            raise ConfigError(f"{key} must be an integer >= {self.minimum}, got {value!r}")


def declared(*registries) -> dict[str, Setting]:
    """Every setting the options of the registries declare, by key (an option class or a format
    factory declares its own as a `settings` attribute)."""
    out: dict[str, Setting] = {}
    for registry in registries:
        for option in registry.values():
            for setting in getattr(option, "settings", ()):
                if out.setdefault(setting.key, setting) != setting:
                    raise TypeError(f"two options declare the setting {setting.key!r} differently")
    return out


def with_settings(base: type, settings: dict[str, Setting], **dataclass_options) -> type:
    """`base` (a dataclass) with one more field per setting, keyed and defaulted as declared; the
    class keeps base's name, module and docstring."""
    fields = [(s.key, int, dataclasses.field(default=s.default)) for s in settings.values()]
    cls = dataclasses.make_dataclass(base.__name__, fields, bases=(base,), **dataclass_options)
    cls.__module__, cls.__qualname__, cls.__doc__ = base.__module__, base.__qualname__, base.__doc__
    return cls
