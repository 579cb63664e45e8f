"""Write a token folder (train.bin, val.bin, meta.json; see lte.data.tokens) from a UTF-8 text file.

    python -m lte.data.prepare_text INPUT OUT_DIR [--tokenizer char|gpt2] [--val-fraction 0.1]
    python -m lte.data.prepare_text TRAIN.txt OUT_DIR --tokenizer gpt2 --val-input VALID.txt

The last --val-fraction of the tokens is held out for validation, unless --val-input gives a
separate validation file. The text is read and encoded in pieces, so a file larger than memory
works; pieces end after a newline that has a non-space character on both sides, where GPT-2's
pre-tokenizer splits anyway, so the ids are those of encoding the whole text at once. The char
tokenizer's vocabulary is every character of the input (and of --val-input), sorted; gpt2 needs
tiktoken with its encoding files available locally.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .text import split_point
from .tokenizers import TOKENIZERS, CharTokenizer, GPT2Tokenizer
from .tokens import FORMAT, token_dtype

PIECE = 1 << 23  # characters read at a time


def pieces(path: Path, size: int | None = None) -> Iterator[str]:
    """The text of `path` in pieces of about `size` characters, each ending at a safe boundary."""
    size = size or PIECE
    carry = ""
    with path.open(encoding="utf-8", newline="") as f:
        while True:
            block = f.read(size)
            text = carry + block
            if not block:
                if text:
                    yield text
                return
            cut = safe_boundary(text)
            if cut:
                yield text[:cut]
            carry = text[cut:]


def safe_boundary(text: str) -> int:
    """The last position p with text[p-1] a newline and text[p-2], text[p] not whitespace (0: none).
    Cutting there leaves the newline a token of its own, as it is in the uncut text."""
    p = len(text) - 1
    while True:
        p = text.rfind("\n", 1, p)
        if p < 1:
            return 0
        if not text[p - 1].isspace() and not text[p + 1].isspace():
            return p + 1


def char_vocabulary(paths: list[Path]) -> CharTokenizer:
    chars: set[str] = set()
    for path in paths:
        for piece in pieces(path):
            chars.update(piece)
    return CharTokenizer("".join(sorted(chars)))


def encode_file(src: Path, dst: Path, tokenizer, dtype: str) -> int:
    """Encode `src` into the flat id file `dst`; the number of tokens written."""
    n = 0
    with dst.open("wb") as out:
        for piece in pieces(src):
            ids = tokenizer.encode_array(piece) if hasattr(tokenizer, "encode_array") else tokenizer.encode(piece)
            arr = np.asarray(ids, dtype=dtype)
            out.write(arr.tobytes())
            n += len(arr)
    return n


def split_file(src: Path, cut: int, first: Path, second: Path, dtype: str) -> None:
    """Tokens [0, cut) of `src` into `first`, the rest into `second`, without reading it all at once."""
    tokens = np.memmap(src, dtype=dtype, mode="r")
    for dst, lo, hi in ((first, 0, cut), (second, cut, len(tokens))):
        with dst.open("wb") as out:
            for i in range(lo, hi, 1 << 24):
                out.write(np.asarray(tokens[i:min(hi, i + (1 << 24))]).tobytes())
    del tokens


def prepare(src: Path, out_dir: Path, tokenizer_name: str = "char", val_fraction: float = 0.1,
            val_src: Path | None = None) -> dict:
    """Write out_dir/{train.bin, val.bin, meta.json}; returns the metadata."""
    if val_src is None and not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    for path in (src, val_src):
        if path is not None and not path.is_file():
            raise ValueError(f"no such file {str(path)!r}")
    if tokenizer_name == "char":
        tokenizer = char_vocabulary([p for p in (src, val_src) if p is not None])
    elif tokenizer_name == "gpt2":
        tokenizer = GPT2Tokenizer()
        tokenizer.encode("")  # fails here, before any file is written, when tiktoken cannot load
    else:
        raise ValueError(f"--tokenizer must be one of {TOKENIZERS}, got {tokenizer_name!r}")
    dtype = token_dtype(tokenizer.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = out_dir / "train.bin", out_dir / "val.bin"
    if val_src is None:
        whole = out_dir / "tokens.tmp"
        n = encode_file(src, whole, tokenizer, dtype)
        if n == 0:
            whole.unlink()
            raise ValueError(f"{src} is empty")
        cut = split_point(n, val_fraction)
        split_file(whole, cut, train, val, dtype)
        whole.unlink()
        counts = (cut, n - cut)
    else:
        counts = (encode_file(src, train, tokenizer, dtype), encode_file(val_src, val, tokenizer, dtype))
    meta = {"format": FORMAT, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "dtype": dtype,
            "train_tokens": counts[0], "val_tokens": counts[1], "source": os.path.basename(src)}
    if tokenizer.name == "char":
        meta["chars"] = tokenizer.chars
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lte.data.prepare_text", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="UTF-8 text file")
    parser.add_argument("out_dir", type=Path, help="folder to write train.bin, val.bin and meta.json into")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="char")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out tail of the tokens (default 0.1)")
    parser.add_argument("--val-input", type=Path, default=None, help="a separate validation text file instead")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.input, args.out_dir, args.tokenizer, args.val_fraction, args.val_input)
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        print(f"prepare_text: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}: {meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens "
          f"({meta['tokenizer']}, vocabulary {meta['vocab_size']:,}, {meta['dtype']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
