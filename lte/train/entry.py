"""The Python entry: run any mode from a script of your own, with your own model and data.

    import lte.train
    summary = lte.train.run("configs/digits.yaml", model=MyNet, data=my_data, overrides=["mode=full"])

`python my_script.py` runs mode=lte and mode=full; `torchrun --nproc_per_node=3 my_script.py` (or
`lte-train --nproc-per-node 3 --script my_script.py`) runs mode=ps, ddp and diloco, every process
calling run() with the same arguments. The summary comes back on the process that writes it
(the only one in lte/full mode, rank 0 otherwise); the others get None.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from ..data import register_data
from ..distributed import run_distributed
from ..models import register
from ..runtime.config import Config, config_from_dict, load_config
from ..single import train


def run(config: str | Path | dict | Config | None, *, model: Callable | None = None, data: Callable | None = None,
        overrides: list[str] = ()) -> dict | None:
    """Train per `config` (a YAML path, a mapping or a Config; `overrides` are dotted key=value).

    model: a callable returning the nn.Module to train (called with model.args, plus the data's
    model_args it accepts); data: a callable returning an lte.data.DataBundle (called with seed=
    if it takes it, and data.args). Either replaces model.name / data.name.
    """
    cfg = _as_config(config, overrides)
    if model is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=_register(model, register)))
    if data is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name=_register(data, register_data)))
    cfg.check()
    return run_distributed(cfg) if cfg.mode_of.several else train(cfg)


def _as_config(config, overrides) -> Config:
    if isinstance(config, Config):
        return config_from_dict(config.to_dict(), overrides)
    if isinstance(config, dict):
        return config_from_dict(config, overrides)
    return load_config(None if config is None else str(config), overrides)  # None: every key at its default


def _register(fn: Callable, registry) -> str:
    """Register fn under its import path, which then stands for it in logs and checkpoints."""
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}")
    name = f"{getattr(fn, '__module__', None) or 'user'}:{getattr(fn, '__qualname__', type(fn).__name__)}"
    registry(fn, name)
    return name
