"""Character-level language modelling on a UTF-8 text file; tiny Shakespeare is built in.

The vocabulary is every character of the file, sorted; the last val_fraction of the characters
is held out for evaluation. Samples are windows of block_size + 1 characters (lte.data.tokens).
With no path, the data is tiny Shakespeare (Karpathy's char-rnn collection of Shakespeare's
plays, public domain, 1,115,394 characters, 65 distinct), which ships inside this package
compressed, so a language model trains on a fresh machine without a download.
"""
from __future__ import annotations

import lzma
from importlib import resources
from pathlib import Path


from ..errors import ConfigError
from .base import DataBundle
from .tokenizers import CharTokenizer
from .tokens import lm_windows, token_dtype

EMBEDDED = "tinyshakespeare.txt.xz"


def embedded_shakespeare() -> str:
    return lzma.decompress(resources.files(__package__).joinpath(EMBEDDED).read_bytes()).decode("utf-8")


def read_text(path: str | None) -> tuple[str, str]:
    """(text, what to call it in messages) of a UTF-8 file, or of the embedded tiny Shakespeare."""
    if path is None:
        return embedded_shakespeare(), "the embedded tiny Shakespeare"
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"data.args.path: no such file {str(file)!r}")
    try:
        text = file.read_bytes().decode("utf-8")  # no newline translation, as prepare_text reads it
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data.args.path: {file} is not UTF-8 text ({exc})") from None
    if not text:
        raise ConfigError(f"data.args.path: {file} is empty")
    return text, str(file)


def split_point(n: int, val_fraction) -> int:
    """Tokens before the held-out tail of val_fraction of n tokens."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"data.args.val_fraction must be a number in (0, 1), got {val_fraction!r}")
    return n - int(round(n * val_fraction))


def text(path: str | None = None, block_size: int = 64, val_fraction: float = 0.1) -> DataBundle:
    content, what = read_text(path)
    tokenizer = CharTokenizer.of(content)
    ids = tokenizer.encode_array(content).astype(token_dtype(tokenizer.vocab_size))
    cut = split_point(len(ids), val_fraction)
    train, eval_set = lm_windows(ids[:cut], ids[cut:], block_size, what)
    return DataBundle(train=train, eval=eval_set, task="language_model",
                      model_args={"vocab_size": tokenizer.vocab_size}, sampling="random", tokenizer=tokenizer)
