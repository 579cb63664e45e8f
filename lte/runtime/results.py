"""A run's results in the formats other tools read, and a finished run's model rebuilt from its
directory (lte.sample, python -m lte.export).

final.safetensors holds the same keys and values as final.pt, the plain state_dict of the model
whatever mode trained it. hf/ is a transformers model's save_pretrained folder (config.json and
model.safetensors), which from_pretrained loads, e.g.
transformers.AutoModelForCausalLM.from_pretrained("OUT_DIR/hf"). Every run writes final.safetensors,
and hf/ for a transformers model, at its end (lte.runtime.rundir); a sharded server (dist.servers > 1)
writes final.safetensors a tensor at a time and no final.pt, and load_run reads either.
"""
from __future__ import annotations

import json
import math
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
    run_dir/config.json and the weights file (final.safetensors where a sharded server wrote no final.pt)."""
    config_path, weights_path = run_dir / "config.json", run_dir / weights
    if not config_path.is_file():
        raise UserError(f"{config_path} not found: --run must be the out_dir of an lte-train run")
    if weights == "final.pt" and not weights_path.is_file() and (run_dir / "final.safetensors").is_file():
        weights_path = run_dir / "final.safetensors"
    if not weights_path.is_file():
        raise UserError(f"{weights_path} not found (did the run finish?)")
    cfg = config_from_dict(json.loads(config_path.read_text()))
    data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
    model = build_model(cfg, data, device)
    state = (read_safetensors(weights_path, device) if weights_path.suffix == ".safetensors"
             else torch.load(weights_path, map_location=device, weights_only=True))
    load_model_state(model, state, weights_path)
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


# safetensors' names of the dtypes a state_dict holds
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_chunks(layout: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors):
    """A safetensors file in pieces: its header (computed from `layout`: name, dtype, shape per
    tensor, in file order), then each of `tensors`' bytes as it arrives. The format: 8 bytes of
    header length (little-endian), the JSON header padded with spaces to 8 bytes, the data."""
    header, offset = {}, 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    yield len(text).to_bytes(8, "little") + text
    for (name, dtype, shape), t in zip(layout, tensors, strict=True):
        t = t.detach().cpu().contiguous()
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: {t.dtype} {tuple(t.shape)} is not the layout's {dtype} {tuple(shape)}")
        yield memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_safetensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


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
