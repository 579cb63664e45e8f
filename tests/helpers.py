"""What several test files share: the repository's paths, the digits ViT at test size, lte-train (or
any command) in a process of its own, what a run leaves in its out_dir, and a simulated crash.

Test files import it as `from helpers import ...`: pytest puts tests/ on sys.path (the rootdir
conftest, no __init__.py), as it does for `from test_compile import tiny`.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lte.runtime.engine import Engine
from lte.single.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def config(name: str) -> str:
    """The path of configs/<name>.yaml."""
    return str(ROOT / "configs" / f"{name}.yaml")


DIGITS = config("digits")
TINY_VIT = "model.args={embed_dim: 16, depth: 1, num_heads: 2}"  # the digits ViT at test width


def small(*overrides: str) -> list[str]:
    """The digits ViT at test width without evaluations during the run, plus a file's own overrides
    (its logging, merges and final evaluation)."""
    return [TINY_VIT, "eval.every=0", *overrides]


def train_command(*args, nproc: int | None = None, torchrun: list[str] | None = None) -> list[str]:
    """lte-train ARGS: through our launcher with nproc processes, through torchrun with a list of its
    flags, else in one process."""
    if torchrun is not None:
        return [sys.executable, "-m", "torch.distributed.run", *torchrun, "-m", "lte.train", *map(str, args)]
    return [sys.executable, "-m", "lte.train", *(["--nproc-per-node", str(nproc)] if nproc else []), *map(str, args)]


def child_env(env: dict | None = None, pythonpath=()) -> dict:
    """The environment of a test's subprocess, plus `env`: this checkout's lte imported wherever it
    runs (ROOT first on PYTHONPATH, ahead of any installed copy; then the folders in `pythonpath`),
    and this interpreter's scripts (torchrun) found first on PATH, as in an activated environment."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(map(str, [ROOT, *pythonpath, *filter(None, [env.get("PYTHONPATH")])]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [env.get("PATH")])])
    return env


def run_command(cmd: list[str], *, cwd=ROOT, env: dict | None = None, pythonpath=(),
                timeout: float = 300) -> tuple[int, str]:
    """Run cmd to its end in child_env(env, pythonpath): its exit code and its stdout and stderr as
    one text. It runs in a session of its own, so that past `timeout` it is killed with every process
    it started (a launcher's workers too) and the test fails with its output."""
    env = child_env(env, pythonpath)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd))} did not finish in {timeout}s:\n{out[-4000:]}")
    return proc.returncode, out


def summary(out_dir) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())


def metrics(out_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per logged step."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def final(out_dir) -> dict:
    """The weights a run exported: final.pt, or (a sharded server writes no final.pt) final.safetensors
    read by safetensors' own loader."""
    path = Path(out_dir) / "final.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    from safetensors.torch import load_file

    return load_file(str(Path(out_dir) / "final.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    """The same names, and bit for bit the same tensors."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def train_crashing_at(cfg, step: int) -> None:
    """Train cfg in this process and crash when `step` steps are done, before the next one, as a
    killed run would: what it wrote (checkpoints, metrics) stays for a resumption to find."""
    real_step = Engine.train_step

    def crash_at_step(self):
        if self.step == step:
            raise RuntimeError("simulated crash")
        return real_step(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "train_step", crash_at_step)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg)
