"""Token files for language models, and the windows a language model trains on.

A token folder (nanoGPT's layout) holds train.bin and val.bin, flat arrays of token ids (uint16, or
uint32 for vocabularies over 65,535), and meta.json:
    {"format": "lte-tokens", "tokenizer": "char" | "gpt2", "vocab_size": V, "dtype": "uint16",
     "chars": "..." (char tokenizer only), "train_tokens": n, "val_tokens": n}
`python -m lte.data.prepare_text` writes one. Token shards are many such files: nanoGPT's
headerless .bin, or llm.c's (and modded-nanogpt's FineWeb shards): a header of 256 int32 (magic
20240520, version 1, the token count) and then the uint16 tokens. data.args.train and
data.args.val name them (a glob, or a list of globs, relative to data.args.path); a folder of shards
without them splits by name (files with "val" in their name are the validation split). Every
file is read with np.memmap, so a data set larger than memory trains; a batch reads only its
windows, and a window never crosses from one shard into the next.

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
    """Windows of block_size + 1 consecutive tokens of one or more 1-D arrays (shards), numbered
    shard after shard; in each shard, window i starts at token i * stride."""

    def __init__(self, tokens: np.ndarray | list[np.ndarray], block_size: int, stride: int = 1):
        self.shards = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
        self.block_size, self.stride = block_size, stride
        self._offsets = np.arange(block_size + 1, dtype=np.int64)
        counts = [max(0, (len(t) - block_size - 1) // stride + 1) for t in self.shards]
        self._ends = np.cumsum(counts, dtype=np.int64)  # window numbers end here, shard by shard

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def gather(self, idx, keys=None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(idx, dtype=np.int64)
        shard = np.searchsorted(self._ends, idx, side="right")
        starts = (idx - np.concatenate([[0], self._ends])[shard]) * self.stride
        windows = np.empty((len(idx), self.block_size + 1), dtype=np.int64)
        for k in np.unique(shard):
            rows = shard == k
            windows[rows] = self.shards[k][starts[rows][:, None] + self._offsets]
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    # A memory-mapped file travels to DataLoader workers as its name, not as its contents.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["shards"] = [("memmap", t.filename, t.dtype.str, t.offset, len(t)) if isinstance(t, np.memmap) else t
                           for t in self.shards]
        return state

    def __setstate__(self, state):
        state["shards"] = [np.memmap(t[1], dtype=np.dtype(t[2]), mode="r", offset=t[3], shape=(t[4],))
                           if isinstance(t, tuple) else t for t in state["shards"]]
        self.__dict__.update(state)


def lm_windows(train, val, block_size, what: str) -> tuple[TokenWindows, TokenWindows]:
    """Training windows (every start) and evaluation windows (non-overlapping) of two token arrays
    (or lists of shards), or a ConfigError when either split holds no window."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ConfigError(f"data.args.block_size must be an integer >= 1, got {block_size!r}")
    out = TokenWindows(train, block_size, stride=1), TokenWindows(val, block_size, stride=block_size)
    for split, windows in zip(("training", "validation"), out):
        if len(windows) == 0:
            longest = max(len(t) for t in windows.shards)
            raise ConfigError(f"data.args.block_size={block_size}: the {split} split of {what} has {longest} "
                              f"tokens{' in its longest shard' * (len(windows.shards) > 1)}, fewer than one window "
                              f"of block_size + 1 = {block_size + 1}; use more text or a smaller block_size")
    return out


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


LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER = 20240520, 1, 256  # llm.c's shard header: 256 int32, then uint16 tokens


def open_tokens(path: Path, dtype: str, vocab_size: int, key: str = "data.args.path") -> np.ndarray:
    """A read-only memory map of a token file (headerless, or an llm.c shard: its header is read
    and checked), checked to hold only ids below vocab_size."""
    if not path.is_file():
        raise ConfigError(f"{key}: {path} not found")
    size = path.stat().st_size
    header = np.fromfile(path, dtype=np.int32, count=LLMC_HEADER) if size >= 4 * LLMC_HEADER else np.zeros(1)
    if header[0] == LLMC_MAGIC:
        if header[1] != LLMC_VERSION:
            raise ConfigError(f"{key}: {path} has an llm.c header of version {header[1]}; version {LLMC_VERSION} "
                              "(uint16 tokens) is the one read")
        count, offset, dtype = int(header[2]), 4 * LLMC_HEADER, "uint16"
        if size != offset + 2 * count:
            raise ConfigError(f"{key}: {path} is truncated or padded: its header says {count} tokens, the file "
                              f"holds {(size - offset) / 2:g}")
    else:
        itemsize, offset = np.dtype(dtype).itemsize, 0
        if size % itemsize:
            raise ConfigError(f"{key}: {path} has {size} bytes, not a whole number of {dtype} token ids")
        count = size // itemsize
    if count == 0:
        return np.zeros(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))
    largest = max(int(tokens[i:i + _CHUNK].max()) for i in range(0, len(tokens), _CHUNK))
    if largest >= vocab_size:
        raise ConfigError(f"{key}: {path} holds token id {largest}, beyond the vocabulary of {vocab_size} tokens "
                          "(meta.json's vocab_size, or data.args.vocab_size)")
    return tokens


def shard_files(folder: Path, pattern, key: str) -> list[Path]:
    """The files a glob (or a list of globs) names, relative to `folder`, in name order."""
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{key} must be a glob or a list of globs of token files, got {pattern!r}")
    files = sorted({f for p in patterns for f in (folder.glob(p) if not Path(p).is_absolute()
                                                   else Path(p).parent.glob(Path(p).name)) if f.is_file()})
    if not files:
        raise ConfigError(f"{key}: {pattern!r} names no file in {folder}")
    return files


def tokens(path: str, block_size: int = 256, workers: int = 0, train=None, val=None, vocab_size: int | None = None,
           dtype: str = "uint16") -> DataBundle:
    """A token folder (train.bin, val.bin, meta.json), or token shards (`train`, `val`: globs in the
    folder `path`; without them, a folder's *val* files and the rest), as windows of block_size + 1."""
    if not path:
        raise ConfigError("data.args.path must name a token folder (train.bin, val.bin, meta.json) or a folder of "
                          "token shards")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data.args.path: no such folder {str(folder)!r} (write one with "
                          "python -m lte.data.prepare_text INPUT OUT_DIR)")
    has_meta = (folder / "meta.json").is_file()
    meta = read_meta(folder) if has_meta else {"vocab_size": vocab_size, "dtype": dtype}
    if not has_meta and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1):
        raise ConfigError(f"data.args.vocab_size must be set for token shards without a meta.json (50257 for GPT-2's "
                          f"tokens), got {vocab_size!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"data.args.dtype must be one of {DTYPES}, got {dtype!r}")
    vocab, dtype = meta["vocab_size"], meta["dtype"]
    splits = []
    for name, pattern in (("train", train), ("val", val)):
        key = f"data.args.{name}"
        if pattern is None:
            default = f"{name}.bin" if has_meta else None
            files = ([folder / default] if default else
                     [f for f in sorted(folder.glob("*.bin")) if ("val" in f.name) == (name == "val")])
            if not files:
                which = "with" if name == "val" else "without"
                raise ConfigError(f"data.args.path: {folder} has no {name} shards (.bin files {which} \"val\" in "
                                  f"their names); name them with {key}")
        else:
            files = shard_files(folder, pattern, key)
        splits.append([open_tokens(f, dtype, vocab, key) for f in files])
    train_set, eval_set = lm_windows(splits[0], splits[1], block_size, str(folder))
    try:
        tokenizer = from_meta(meta) if has_meta else None
    except (KeyError, ValueError):
        tokenizer = None  # the ids train without it; only lte.sample needs it
    return DataBundle(train=train_set, eval=eval_set, task="language_model", model_args={"vocab_size": vocab},
                      sampling="random", workers=workers, tokenizer=tokenizer)
