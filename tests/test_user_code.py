"""A model and a data set defined only here (registered nowhere in lte) train in every mode, by import
path in the config and through the Python entry; bad import paths are one-line errors."""
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import final, run_command, train_command
from lte.data import DataBundle
from lte.train.cli import main

HERE = Path(__file__).resolve().parent
COMMON = ["train.steps=20", "train.batch_size=32", "lte.heads=4", "lte.merge_every=5", "train.log_every=10",
          "eval.every=0", "checkpoint.resume=false"]


class UserNet(nn.Module):
    """An MLP over flattened 8x8 digits: a model class lte knows nothing about."""

    def __init__(self, hidden: int = 32, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.out(self.body(x))


class Pairs:
    """Map-style: pairs[i] -> (image, label), as a torch Dataset would be."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def user_digits(seed, scale=1.0):
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) * (scale / 16.0)
    y = torch.tensor(raw.target)
    return DataBundle(train=Pairs(x[:1500], y[:1500]), eval=Pairs(x[1500:], y[1500:]), task="classification",
                      model_args={"num_classes": 10})


def not_a_model():
    return {"weights": 1}


def not_data(seed):
    return [1, 2, 3]


def run(cmd, cwd):
    """helpers.run_command with this file importable by name (model.name=test_user_code:UserNet)."""
    return run_command(cmd, cwd=cwd, pythonpath=[HERE])


def loads_into_user_class(out_dir):
    model = UserNet(hidden=24)
    model.load_state_dict(final(out_dir), strict=True)
    return model


@pytest.mark.parametrize("mode", ["lte", "full"])
def test_import_paths_in_one_process(tmp_path, monkeypatch, mode):
    monkeypatch.syspath_prepend(str(HERE))
    code = main([f"mode={mode}", "model.name=test_user_code:UserNet", "model.args={hidden: 24}",
                 "data.name=test_user_code:user_digits", "data.args={scale: 2.0}", f"out_dir={tmp_path}", *COMMON])
    assert code == 0
    model = loads_into_user_class(tmp_path)
    assert model.out.weight.shape == (10, 24)


def test_import_paths_in_ps_mode(tmp_path):
    code, out = run(train_command("mode=ps", "model.name=test_user_code:UserNet", "model.args={hidden: 24}",
                                  "data.name=test_user_code:user_digits", f"out_dir={tmp_path}", *COMMON, nproc=3),
                    cwd=tmp_path)
    assert code == 0, out[-3000:]
    loads_into_user_class(tmp_path)


SCRIPT = """
import sys
import torch
from torch import nn
import lte.train
from lte.data import ArrayDataset, DataBundle

class ScriptNet(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.GELU(), nn.Linear(24, num_classes))

    def forward(self, x):
        return self.net(x)

def data(seed):
    from sklearn.datasets import load_digits
    raw = load_digits()
    x, y = torch.tensor(raw.images, dtype=torch.float32) / 16, torch.tensor(raw.target)
    return DataBundle(train=ArrayDataset(x[:1500], y[:1500]), eval=ArrayDataset(x[1500:], y[1500:]),
                      model_args={"num_classes": 10})

summary = lte.train.run({"model": {"args": {}}, "out_dir": sys.argv[1]}, model=ScriptNet, data=data,
                        overrides=sys.argv[2:])
if summary is not None:
    print("SUMMARY", summary["mode"], summary["steps"], round(summary["eval"]["accuracy"], 3))
    net = ScriptNet(10)
    net.load_state_dict(torch.load(sys.argv[1] + "/final.pt", weights_only=True), strict=True)
    print("LOADED")
"""


def test_python_entry_runs_a_script_in_every_mode(tmp_path):
    script = tmp_path / "my_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    for mode in ("lte", "full"):
        code, out = run([sys.executable, str(script), str(tmp_path / mode), f"mode={mode}", *COMMON], cwd=tmp_path)
        assert code == 0, out[-3000:]
        assert f"SUMMARY {mode} 20" in out and "LOADED" in out
    code, out = run(train_command("--script", script, tmp_path / "ps", "mode=ps", *COMMON, nproc=3), cwd=tmp_path)
    assert code == 0, out[-3000:]
    assert out.count("SUMMARY ps 20") == 1 and "LOADED" in out  # only the server returns the summary


@pytest.mark.parametrize("overrides,message", [
    (["model.name=no_such_module_xyz:Net"], "model.name: cannot import module 'no_such_module_xyz'"),
    (["model.name=test_user_code:Missing"], "model.name: module 'test_user_code' has no 'Missing'"),
    (["model.name=test_user_code:COMMON"], "model.name: 'test_user_code:COMMON' is a list, not a callable"),
    (["model.name=test_user_code:not_a_model"], "model.name: test_user_code:not_a_model returned a dict"),
    (["data.name=test_user_code:not_data"], "data.name: test_user_code:not_data returned a list"),
    (["data.name=no_such_module_xyz:data"], "data.name: cannot import module 'no_such_module_xyz'"),
])
def test_bad_import_paths_are_one_line_errors(tmp_path, monkeypatch, capsys, overrides, message):
    monkeypatch.syspath_prepend(str(HERE))
    code = main(["model.name=test_user_code:UserNet", "data.name=test_user_code:user_digits", *overrides,
                 f"out_dir={tmp_path}", *COMMON])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
