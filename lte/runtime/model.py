"""The run's model: built from the config and the data, checked against the data, and loaded from a
checkpoint's state (every mode, the parameter server, and the tools that rebuild a finished run)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .. import core
from ..errors import ConfigError
from ..models import create_model, stated_sizes
from .config import Config


def build_model(cfg: Config, data, device: torch.device | None) -> nn.Module:
    """The run's model, initialised from the run's seed, on `device`; device None: its parameters on
    the meta device (a worker that gets its weights from the server; lte.core.lean)."""
    torch.manual_seed(cfg.seed)  # the base weights are the same in every mode and process
    with core.params_on_meta() if device is None else contextlib.nullcontext():
        model = create_model(cfg.model.name, data.model_args, **cfg.model.args)
    check_fits(model, data)
    return model if device is None else model.to(device)


def init_tensors(model: nn.Module, keys, seed: int, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The initial values of the tensors `keys` of a model built on the meta device (build_model with
    device None), each made alone, equal to build_model's whole model of the same seed: for models
    whose init is per tensor (an `init_parameter(name, tensor, seed)` method, as lte's GPT has); None
    for others. Buffers are real in such a model already (lte.core.params_on_meta) and are copied."""
    init = getattr(model, "init_parameter", None)
    if init is None:
        return None
    params, out = dict(model.named_parameters()), {}
    state = model.state_dict(keep_vars=True)
    for k in keys:
        t = state[k]
        if k in params:
            real = torch.empty(t.shape, dtype=t.dtype)
            init(k, real, seed)
        else:
            real = t.detach().clone()
        out[k] = real.to(device)
    return out


def buffers_to(model: nn.Module, device: torch.device) -> nn.Module:
    """A meta-built model's buffers (real: masks, rotary tables) onto `device`; its parameters stay."""
    for module in model.modules():
        for name, b in list(module.named_buffers(recurse=False)):
            setattr(module, name, b.to(device))
    return model


def check_fits(model: nn.Module, data) -> None:
    """Refuse a model too small for its data, before anything trains: a vocabulary missing some of
    the data's token ids, or a position table shorter than the data's windows (models and data
    sets that state a vocab_size / block_size; others are not checked)."""
    vocab, (model_vocab, model_block) = data.model_args.get("vocab_size"), stated_sizes(model)
    if isinstance(vocab, int) and model_vocab is not None and model_vocab < vocab:
        raise ConfigError(f"model.args.vocab_size: the model's vocabulary of {model_vocab} tokens is smaller than "
                          f"the data's ({vocab}); leave it unset to take the data's, or make it >= {vocab}")
    block = getattr(data.train, "block_size", None)
    if isinstance(block, int) and model_block is not None and block > model_block:
        raise ConfigError(f"data.args.block_size={block} is larger than the model's block_size={model_block} "
                          "(model.args.block_size; max_position_embeddings for a transformers model)")


def load_model_state(model: nn.Module, state_dict: dict, path: Path | None) -> None:
    """Load a checkpoint's model state strictly, or say in one line that it does not fit."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[:3]
        raise ConfigError(f"checkpoint {path} does not fit this model: {' '.join(first)}") from None
