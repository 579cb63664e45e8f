"""Model constructors by name: our own first, then a transformers model (hf:<class or model type>),
an import path (package.module:callable), then any timm model name."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import ConfigError
from ..imports import accepted, is_import_path, load_callable
from . import hf

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(fn: Callable[..., nn.Module], name: str | None = None) -> Callable[..., nn.Module]:
    """Make `fn(**kwargs) -> nn.Module` available as model.name=<name> (default: fn's name)."""
    _MODELS[name or fn.__name__] = fn
    return fn


def available() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, data_args: dict | None = None, **kwargs) -> nn.Module:
    """Build `name` with kwargs (model.args), plus those of data_args (what the data needs the
    model to match: classes, vocabulary...) that the constructor takes; kwargs win."""
    if name in _MODELS:
        builder = _MODELS[name]
    elif hf.is_hf_name(name):
        return hf.build(name, data_args or {}, **kwargs)
    elif is_import_path(name):
        builder = load_callable(name, "model.name")
    else:
        import timm

        if not timm.is_model(name):
            raise ConfigError(f"model.name: unknown model {name!r}; lte models: {available()}, "
                              "hf:<transformers class or model type>, an import path package.module:callable, "
                              "or any timm model name")
        builder = lambda **kw: timm.create_model(name, pretrained=False, **kw)  # noqa: E731
    try:
        model = builder(**{**accepted(builder, data_args or {}), **kwargs})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.args: {name} rejected its arguments: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name: {name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def stated_sizes(model: nn.Module) -> tuple[int | None, int | None]:
    """(vocabulary size, longest sequence) a model states, as attributes (lte's GPT: vocab_size,
    block_size) or in a transformers config; None where it states none."""
    config = getattr(model, "config", None)
    vocab = getattr(model, "vocab_size", None) or getattr(config, "vocab_size", None)
    block = (getattr(model, "block_size", None) or getattr(config, "max_position_embeddings", None)
             or getattr(config, "n_positions", None))
    return (vocab if isinstance(vocab, int) else None), (block if isinstance(block, int) else None)


def stated_depth(model: nn.Module) -> tuple[int | None, int | None]:
    """(layers, width) a transformer states (lte's GPT config, or a transformers config), for its
    attention FLOPs; None where it states none."""
    config = getattr(model, "config", None)
    layers = getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers", None)
    width = getattr(config, "n_embd", None) or getattr(config, "hidden_size", None)
    return (layers if isinstance(layers, int) else None), (width if isinstance(width, int) else None)
