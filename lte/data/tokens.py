"""Token files for language models (nanoGPT's layout), and the windows a language model trains on.

A token folder holds train.bin and val.bin, flat arrays of token ids (uint16, or uint32 for
vocabularies over 65,535), and meta.json:
    {"format": "lte-tokens", "tokenizer": "char" | "gpt2", "vocab_size": V, "dtype": "uint16",
     "chars": "..." (char tokenizer only), "train_tokens": n, "val_tokens": n}
`python -m lte.data.prepare_text` writes one. The files are read with np.memmap, so a file
larger than memory trains; a batch reads only its windows.

Sample i of a training set is the window starting at token i: inputs tokens[i : i+block],
targets tokens[i+1 : i+block+1]; the trainer draws them uniformly with replacement (sampling
"random"), by (seed, head, step) like every stream. An evaluation set holds the non-overlapping
windows of the validation tokens, of which eval.batches picks a fixed, evenly spread subset.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .base import DataBundle
from .tokenizers import from_meta

FORMAT = "lte-tokens"
DTYPES = ("uint16", "uint32")
_CHUNK = 1 << 24  # tokens per read when scanning a file for its largest id


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned type that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class TokenWindows:
    """Windows of block_size + 1 consecutive tokens of a 1-D array; window i starts at i * stride."""

    def __init__(self, tokens: np.ndarray, block_size: int, stride: int = 1):
        self.tokens, self.block_size, self.stride = tokens, block_size, stride
        self._offsets = np.arange(block_size + 1, dtype=np.int64)

    def __len__(self) -> int:
        n = len(self.tokens) - self.block_size - 1
        return 0 if n < 0 else n // self.stride + 1

    def gather(self, idx, keys=None) -> tuple[torch.Tensor, torch.Tensor]:
        starts = np.asarray(idx, dtype=np.int64) * self.stride
        windows = torch.from_numpy(np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    # A memory-mapped file travels to DataLoader workers as its name, not as its contents.
    def __getstate__(self):
        state = dict(self.__dict__)
        if isinstance(self.tokens, np.memmap):
            state["tokens"] = ("memmap", self.tokens.filename, self.tokens.dtype.str, len(self.tokens))
        return state

    def __setstate__(self, state):
        tokens = state["tokens"]
        if isinstance(tokens, tuple):
            _, filename, dtype, n = tokens
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=(n,))
        self.__dict__.update(state)


def lm_windows(train: np.ndarray, val: np.ndarray, block_size, what: str) -> tuple[TokenWindows, TokenWindows]:
    """Training windows (every start) and evaluation windows (non-overlapping) of two token arrays,
    or a ConfigError when either split is shorter than one window."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ConfigError(f"data.args.block_size must be an integer >= 1, got {block_size!r}")
    for split, tokens in (("training", train), ("validation", val)):
        if len(tokens) < block_size + 1:
            raise ConfigError(f"data.args.block_size={block_size}: the {split} split of {what} has {len(tokens)} "
                              f"tokens, fewer than one window of block_size + 1 = {block_size + 1}; use more text "
                              "or a smaller block_size")
    return TokenWindows(train, block_size, stride=1), TokenWindows(val, block_size, stride=block_size)


def read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    if not path.is_file():
        raise ConfigError(f"data.args.path: {folder} has no meta.json (write the folder with "
                          "python -m lte.data.prepare_text INPUT OUT_DIR)")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data.args.path: {path} is not valid JSON ({exc})") from None
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(vocab, int) or vocab < 1:
        raise ConfigError(f"data.args.path: {path} must give vocab_size, an integer >= 1")
    dtype = meta.get("dtype", token_dtype(vocab))
    if dtype not in DTYPES:
        raise ConfigError(f"data.args.path: {path} gives dtype {dtype!r}; expected one of {DTYPES}")
    if np.iinfo(dtype).max < vocab - 1:
        raise ConfigError(f"data.args.path: {path}: dtype {dtype} cannot hold the ids of vocab_size={vocab}")
    return {**meta, "dtype": dtype}


def open_tokens(path: Path, dtype: str, vocab_size: int) -> np.ndarray:
    """A read-only memory map of a token file, checked to hold only ids below vocab_size."""
    if not path.is_file():
        raise ConfigError(f"data.args.path: {path} not found")
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ConfigError(f"data.args.path: {path} has {size} bytes, not a whole number of {dtype} token ids")
    if size == 0:
        return np.zeros(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r")
    largest = max(int(tokens[i:i + _CHUNK].max()) for i in range(0, len(tokens), _CHUNK))
    if largest >= vocab_size:
        raise ConfigError(f"data.args.path: {path} holds token id {largest}, beyond the vocabulary of its "
                          f"meta.json (vocab_size={vocab_size})")
    return tokens


def tokens(path: str, block_size: int = 256, workers: int = 0) -> DataBundle:
    """A token folder (train.bin, val.bin, meta.json) as windows of block_size + 1 tokens."""
    if not path:
        raise ConfigError("data.args.path must name a token folder (train.bin, val.bin, meta.json)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data.args.path: no such folder {str(folder)!r} (write one with "
                          "python -m lte.data.prepare_text INPUT OUT_DIR)")
    meta = read_meta(folder)
    vocab, dtype = meta["vocab_size"], meta["dtype"]
    train, val = (open_tokens(folder / f"{split}.bin", dtype, vocab) for split in ("train", "val"))
    train_set, eval_set = lm_windows(train, val, block_size, str(folder))
    try:
        tokenizer = from_meta(meta)
    except (KeyError, ValueError):
        tokenizer = None  # the ids train without it; only lte.sample needs it
    return DataBundle(train=train_set, eval=eval_set, task="language_model", model_args={"vocab_size": vocab},
                      sampling="random", workers=workers, tokenizer=tokenizer)
