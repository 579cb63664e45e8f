"""Language-model data: character text, token folders, the prepare_text writer, bad inputs."""
import json
import pickle
import sys

import numpy as np
import pytest
import torch

from helpers import config
from lte.data import build_data
from lte.data.prepare_text import main as prepare_main, pieces, safe_boundary
from lte.data.text import embedded_shakespeare
from lte.data.tokens import token_dtype
from lte.train.cli import main as cli_main

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 3


def write(tmp_path, text=TEXT, name="play.txt"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_text_windows_are_shifted_slices_of_the_characters(tmp_path):
    data = build_data("text", 0, {"path": str(write(tmp_path)), "block_size": 8, "val_fraction": 0.25})
    chars = sorted(set(TEXT))
    ids = [chars.index(c) for c in TEXT]
    cut = len(TEXT) - round(len(TEXT) * 0.25)
    assert data.model_args == {"vocab_size": len(chars)} and data.task == "language_model"
    assert data.sampling == "random" and len(data.train) == cut - 8
    x, y = data.train.gather(torch.tensor([0, 17, cut - 9]))
    for row, start in enumerate([0, 17, cut - 9]):
        assert x[row].tolist() == ids[start:start + 8] and y[row].tolist() == ids[start + 1:start + 9]
    val = ids[cut:]
    assert len(data.eval) == (len(val) - 1) // 8  # non-overlapping windows of the held-out tail
    x, y = data.eval.gather(torch.tensor([2]))
    assert x[0].tolist() == val[16:24] and y[0].tolist() == val[17:25]
    assert data.tokenizer.decode(data.tokenizer.encode("the mind")) == "the mind"


def test_tiny_shakespeare_is_embedded():
    text = embedded_shakespeare()
    assert len(text) == 1_115_394 and len(set(text)) == 65 and text.startswith("First Citizen:\nBefore we proceed")
    data = build_data("text", 0, {"block_size": 64})
    assert data.model_args == {"vocab_size": 65} and len(data.eval) == (111_539 - 1) // 64


def test_prepare_text_writes_the_same_tokens_as_the_text_data(tmp_path, monkeypatch, capsys):
    src = write(tmp_path)
    monkeypatch.setattr("lte.data.prepare_text.PIECE", 16)  # many pieces: cutting must not change the ids
    assert prepare_main([str(src), str(tmp_path / "tok"), "--val-fraction", "0.25"]) == 0
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "char" and meta["chars"] == "".join(sorted(set(TEXT)))
    train = np.fromfile(tmp_path / "tok" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "tok" / "val.bin", dtype=np.uint16)
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    from_text = build_data("text", 0, {"path": str(src), "block_size": 8, "val_fraction": 0.25})
    from_tokens = build_data("tokens", 0, {"path": str(tmp_path / "tok"), "block_size": 8})
    assert from_tokens.model_args == from_text.model_args
    for a, b in [(from_text.train, from_tokens.train), (from_text.eval, from_tokens.eval)]:
        assert len(a) == len(b)
        idx = torch.arange(len(a))
        assert all(torch.equal(u, v) for u, v in zip(a.gather(idx), b.gather(idx)))
    assert from_tokens.tokenizer.decode(train[:5]) == TEXT[:5]


def test_pieces_cut_only_between_a_lone_newline_and_text(tmp_path):
    text = "alpha\n\nbeta gamma\n delta\nepsilon\nzeta  \neta\n" * 20
    parts = list(pieces(write(tmp_path, text), size=10))
    assert "".join(parts) == text and len(parts) > 5
    for part in parts[:-1]:
        assert part.endswith("\n") and not part[-2].isspace()
    assert safe_boundary("a\n\nb") == 0 and safe_boundary("a\nb\n c") == 2


def test_token_folders_of_large_vocabularies_use_uint32(tmp_path):
    assert (token_dtype(65536), token_dtype(65537)) == ("uint16", "uint32")
    folder = tmp_path / "big"
    folder.mkdir()
    ids = np.arange(99_990, 100_000, dtype=np.uint32)
    ids.tofile(folder / "train.bin")
    ids[::-1].tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 100_000, "dtype": "uint32", "tokenizer": "none"}))
    data = build_data("tokens", 0, {"path": str(folder), "block_size": 4})
    x, y = data.train.gather(torch.tensor([3]))
    assert x.tolist() == [[99_993, 99_994, 99_995, 99_996]] and y.tolist() == [[99_994, 99_995, 99_996, 99_997]]
    assert data.tokenizer is None  # an unknown tokenizer trains; only sampling needs one
    # DataLoader workers receive the file's name, not its contents, and read the same windows
    clone = pickle.loads(pickle.dumps(data.train))
    assert len(pickle.dumps(data.train)) < 1000 and torch.equal(clone.gather(torch.tensor([3]))[0], x)


def test_gpt2_tokenizer_without_tiktoken_is_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken fails, installed or not
    assert prepare_main([str(write(tmp_path)), str(tmp_path / "tok"), "--tokenizer", "gpt2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs tiktoken, which is not installed" in err
    assert not (tmp_path / "tok").exists()


def bad_token_folder(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    np.array([0, 1, 2, 70, 3] * 20, dtype=np.uint16).tofile(folder / "train.bin")
    np.array([0, 1, 2, 3] * 20, dtype=np.uint16).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 65, "tokenizer": "char", "chars": "x" * 65}))
    return folder


@pytest.mark.parametrize("case,overrides,message", [
    ("missing", ["data.args.path={tmp}/nope.txt"], "data.args.path: no such file"),
    ("empty", ["data.args.path={tmp}/empty.txt"], "data.args.path: {tmp}/empty.txt is empty"),
    ("short", ["data.args.path={tmp}/short.txt"], "data.args.block_size=16: the validation split of"),
    ("no folder", ["data.name=tokens", "data.args={{path: {tmp}/none, block_size: 16}}"],
     "data.args.path: no such folder"),
    ("ids", ["data.name=tokens", "data.args={{path: {tmp}/tok, block_size: 16}}"],
     "holds token id 70, beyond the vocabulary"),
    ("block", ["model.args={{block_size: 8}}"],
     "data.args.block_size=16 is larger than the model's block_size=8"),
    ("vocab", ["model.args={{vocab_size: 20}}"],
     "model.args.vocab_size: the model's vocabulary of 20 tokens is smaller"),
])
def test_bad_language_model_inputs_are_one_line_errors(tmp_path, capsys, case, overrides, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("a" * 100)  # a 10-character validation split
    if case == "ids":
        bad_token_folder(tmp_path)
    fill = lambda s: s.format(tmp=tmp_path)  # noqa: E731
    code = cli_main(["--config", config("shakespeare_char"), f"out_dir={tmp_path / 'run'}",
                     "data.args.block_size=16", *map(fill, overrides)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lte-train: error: ") and err.count("\n") == 1, err
    assert fill(message) in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", ["shakespeare_char", "gpt_mini_shakespeare", "gpt2_tinystories"])
def test_language_model_configs_are_valid(name):
    from lte.runtime.config import load_config

    cfg = load_config(config(name))
    assert cfg.model.name.startswith("gpt") and cfg.data.name in ("text", "tokens")
    assert cfg.train.batch_size % cfg.lte.heads == 0
