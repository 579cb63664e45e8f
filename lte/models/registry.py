"""Model constructors by name: our own first, then any timm model name."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _MODELS[fn.__name__] = fn
    return fn


def available() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build `name` with kwargs: a registered lte model, else timm.create_model(name, ...)."""
    if name in _MODELS:
        builder = _MODELS[name]
    else:
        import timm

        if not timm.is_model(name):
            raise ConfigError(f"model.name: unknown model {name!r}; lte models: {available()}, "
                              "or any timm model name")
        builder = lambda **kw: timm.create_model(name, pretrained=False, **kw)  # noqa: E731
    try:
        return builder(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.args: {name} rejected its arguments: {exc}") from exc
