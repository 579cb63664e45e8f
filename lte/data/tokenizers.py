"""Tokenizers of the language-model data sets: characters, or GPT-2's BPE through tiktoken.

A tokenizer has `name`, `vocab_size`, `encode(text) -> list[int]` and `decode(ids) -> str`. It is
what `lte.sample` turns a prompt and the generated ids with, and what `lte.data.prepare_text`
writes token files with.
"""
from __future__ import annotations

import numpy as np

TOKENIZERS = ("char", "gpt2")


class CharTokenizer:
    """One token per character; ids are the positions of the characters in `chars` (sorted)."""

    name = "char"

    def __init__(self, chars: str):
        if not chars:
            raise ValueError("a character vocabulary needs at least one character")
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}
        self._codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)  # sorted, as chars is
        self.vocab_size = len(chars)

    @classmethod
    def of(cls, text: str) -> "CharTokenizer":
        """The vocabulary of every character in `text`."""
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - set(self._ids))
            raise ValueError(f"characters {''.join(unknown)!r} are not in the vocabulary of {self.vocab_size} "
                             "characters") from None

    def encode_array(self, text: str) -> np.ndarray:
        """encode() for long texts: the ids as an int64 array, by a vectorised lookup of code points."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        vocab = self._codes
        ids = np.searchsorted(vocab, codes)
        known = ids < len(vocab)
        known[known] = vocab[ids[known]] == codes[known]
        if not known.all():
            self.encode(text)  # raises, naming the unknown characters
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50,257 tokens; <|endoftext|> is 50256), from tiktoken. The encoding
    is loaded on first use, so a token folder written with it trains where tiktoken is missing."""

    name = "gpt2"
    vocab_size = 50257

    def __init__(self):
        self._enc = None

    def _encoding(self):
        if self._enc is None:
            try:
                import tiktoken
            except ImportError:
                raise ValueError("the gpt2 tokenizer needs tiktoken, which is not installed (pip install "
                                 "tiktoken); --tokenizer char needs nothing") from None
            try:
                self._enc = tiktoken.get_encoding("gpt2")
            except Exception as exc:  # no network and no cached encoding files, most likely
                raise ValueError(
                    "tiktoken could not load its gpt2 encoding files: it downloads them on first use and caches "
                    "them in $TIKTOKEN_CACHE_DIR, so run it once where the internet is reachable and copy that "
                    f"folder here, or point TIKTOKEN_CACHE_DIR at a copy ({type(exc).__name__}: {exc})") from None
        return self._enc

    def encode(self, text: str) -> list[int]:
        return self._encoding().encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids) -> str:
        return self._encoding().decode([int(i) for i in ids])


def from_meta(meta: dict):
    """The tokenizer a token folder's meta.json names."""
    if meta.get("tokenizer") == "char":
        return CharTokenizer(meta["chars"])
    if meta.get("tokenizer") == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {meta.get('tokenizer')!r}; known: {TOKENIZERS}")
