"""A run's results in the formats other tools read, and a finished run's model rebuilt from its
directory (lte.sample, python -m lte.export).

final.safetensors holds the same keys and values as final.pt, the plain state_dict of the model
whatever mode trained it. hf/ is a transformers model's save_pretrained folder (config.json and
model.safetensors), which from_pretrained loads, e.g.
transformers.AutoModelForCausalLM.from_pretrained("OUT_DIR/hf"). Every run writes final.safetensors,
and hf/ for a transformers model, at its end (lte.runtime.rundir).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..data import build_data
from ..errors import UserError
from ..models.hf import is_transformers_model
from .config import config_from_dict
from .model import build_model, load_model_state


def load_run(run_dir: Path, device: torch.device, weights: str = "final.pt"):
    """(the run's model with its trained weights, in eval mode; its config; its data), rebuilt from
    run_dir/config.json and the weights file."""
    config_path, weights_path = run_dir / "config.json", run_dir / weights
    if not config_path.is_file():
        raise UserError(f"{config_path} not found: --run must be the out_dir of an lte-train run")
    if not weights_path.is_file():
        raise UserError(f"{weights_path} not found (did the run finish?)")
    cfg = config_from_dict(json.loads(config_path.read_text()))
    data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
    model = build_model(cfg, data, device)
    load_model_state(model, torch.load(weights_path, map_location=device, weights_only=True), weights_path)
    return model.eval(), cfg, data


def save_hf_folder(cfg, data, weights: dict[str, torch.Tensor], folder: Path) -> Path:
    """A fresh plain model of the run holding `weights`, as its save_pretrained folder (the end of a
    run of a transformers model)."""
    with torch.random.fork_rng():  # building the model seeds the RNG; the run's own RNG state stays
        model = build_model(cfg, data, torch.device("cpu"))
    load_model_state(model, weights, None)
    return write_hf(model, folder)


def safetensors_bytes(weights: dict[str, torch.Tensor]) -> bytes:
    """The weights as a safetensors file. safetensors refuses tensors that share memory (tied
    weights of a full-rank model), so each such tensor after the first is stored as a copy."""
    from safetensors.torch import save

    tensors, seen = {}, set()
    for name, value in weights.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        tensors[name] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return save(tensors)


def write_hf(model: torch.nn.Module, folder: Path) -> Path:
    """The model's save_pretrained folder, written beside `folder` and then moved into its place, so
    a kill leaves the old folder or the new one."""
    if not is_transformers_model(model):
        raise UserError(f"--format hf: the run's model is a {type(model).__name__}, not a transformers model")
    from transformers.utils import logging as hf_logging

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_logging.disable_progress_bar()  # its bar over one small file is noise in a run's log
    try:
        model.save_pretrained(tmp)
    finally:
        hf_logging.enable_progress_bar()
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
