"""Hugging Face transformers models by name, built from their config (never a download).

    model.name: hf:LlamaForCausalLM     a transformers model class
    model.name: hf:gpt2                 a model type, built with the Auto class of the data's task
                                        (AutoModelForCausalLM for language models,
                                        AutoModelForImageClassification for image classes)
    model.args: {hidden_size: 64, ...}  the config's fields

What the data needs the model to match (vocabulary, classes, image size and channels) fills the
config fields of those names that the config has; model.args wins. Word embeddings are untied
unless model.args says otherwise: LTE keeps one base weight per layer, and lte's own GPT is untied
in every mode for the same reason (docs/models.md). transformers is an optional dependency:
pip install 'lte[hf]'.
"""
from __future__ import annotations

import inspect

from torch import nn

from ..errors import ConfigError

PREFIX = "hf:"
# the data's model_args (lte.data) -> the transformers config field of the same meaning
DATA_FIELDS = {"vocab_size": "vocab_size", "num_classes": "num_labels", "img_size": "image_size",
               "in_chans": "num_channels"}


def is_hf_name(name: str) -> bool:
    return name.startswith(PREFIX)


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(f"model.name hf:...: transformers did not import ({exc}); pip install 'lte[hf]'") from None
    return transformers


def build(name: str, data_args: dict, **args) -> nn.Module:
    """The transformers model `name` (hf:<class> or hf:<model type>) with a fresh config."""
    transformers, spec = _transformers(), name[len(PREFIX):]
    cls = getattr(transformers, spec, None)
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        config_class, make = cls.config_class, cls
    else:
        try:
            config_class = type(transformers.AutoConfig.for_model(spec))
        except ValueError:
            raise ConfigError(f"model.name={name}: {spec!r} is neither a transformers model class nor a model "
                              "type (hf:LlamaForCausalLM, hf:gpt2, hf:vit ...)") from None
        auto = "AutoModelForCausalLM" if "vocab_size" in data_args else "AutoModelForImageClassification"
        make = getattr(transformers, auto).from_config
    known = _fields(config_class)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"model.args: {config_class.__name__} has no field {unknown[0]!r}")
    fields = {DATA_FIELDS[k]: v for k, v in data_args.items() if k in DATA_FIELDS and DATA_FIELDS[k] in known}
    fields = {"tie_word_embeddings": False, **fields, **args}
    try:
        config = config_class(**fields)
        return make(config)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.args: {name} rejected its config: {exc}") from None


def _fields(config_class) -> set[str]:
    """The fields a transformers config takes: its constructor's and its defaults' (which hold the
    fields every config shares, such as tie_word_embeddings), and num_labels."""
    params = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    return params | set(config_class().to_dict()) | {"num_labels"}


def is_transformers_model(model: nn.Module) -> bool:
    import sys

    transformers = sys.modules.get("transformers")  # a model of it exists only if it was imported
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)
