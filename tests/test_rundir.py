"""A run never loses what it produced: re-runs of finished runs, continuation with more steps,
rotated checkpoints with fallback past a torn one, atomic writes, one run per out_dir."""
import json
import os
from pathlib import Path

import pytest

from helpers import DIGITS, assert_same_weights, final, metrics, run_command, small, summary, train_command
from lte.train.cli import main
from lte.runtime.config import load_config
from lte.runtime.rundir import RunDir, first_difference

SMALL = small("train.log_every=5", "lte.merge_every=5", "eval.batches=2", "eval.batch_size=64")


def cli(tmp, *args, nproc=None):
    return train_command("--config", DIGITS, *SMALL, f"out_dir={tmp}", *args, nproc=nproc)


def files(out_dir):
    """Every file the run wrote, with its bytes (the lock file aside)."""
    return {p.name: p.read_bytes() for p in Path(out_dir).iterdir() if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("mode", ["lte", "full"])
def test_rerunning_a_finished_run_changes_nothing_and_more_steps_continue_it(tmp_path, capsys, mode):
    args = ["--config", DIGITS, *SMALL, f"out_dir={tmp_path}", f"mode={mode}", "train.steps=10"]
    assert main(args) == 0
    before = files(tmp_path)
    first = json.loads(before["summary.json"])
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path} already holds a finished run of 10 steps" in out and '"eval": {"loss"' in out
    assert files(tmp_path) == before  # byte for byte: summary, final.pt, metrics, checkpoints, config

    assert main([*args[:-1], "train.steps=15"]) == 0  # a longer run continues the finished one
    longer = summary(tmp_path)
    assert longer["steps"] == 15 and longer["samples_seen"] == 15 * 64 and longer["attempts"] == 2
    assert longer["wall_s"] > first["wall_s"] and longer["train_s"] > first["train_s"]
    assert longer["eval"] and longer["eval"] != first["eval"]  # evaluated after step 15
    assert [r["step"] for r in metrics(tmp_path)] == [5, 10, 15]


def test_checkpoints_rotate_and_a_torn_newest_one_falls_back_bit_identically(tmp_path, capsys):
    args = ["--config", DIGITS, *SMALL, "checkpoint.every=1", "train.steps=20"]
    assert main([*args, f"out_dir={tmp_path / 'whole'}"]) == 0
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*.pt")) == [
        "checkpoint-000000015.pt", "checkpoint-000000020.pt"]  # checkpoint.keep=2

    cut = tmp_path / "cut"
    assert main([*args, f"out_dir={cut}", "train.steps=15"]) == 0
    newest = cut / "checkpoint-000000015.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn, as by a full disk
    capsys.readouterr()
    assert main([*args, f"out_dir={cut}"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {newest} cannot be read" in out and "resumed from" in out and "at step 10" in out
    assert_same_weights(final(cut), final(tmp_path / "whole"))


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    code, out = run_command(cli(tmp_path / "whole", "checkpoint.every=1", "train.steps=20"))
    assert code == 0, out
    cmd = cli(tmp_path / "killed", "checkpoint.every=1", "train.steps=20")
    code, out = run_command(cmd, env={"LTE_FAULT": "torn_write:step=10"})
    assert code == 17, out  # died half-way through writing the checkpoint of step 10
    assert [p.name for p in (tmp_path / "killed").glob("checkpoint-*.pt")] == ["checkpoint-000000005.pt"]
    code, out = run_command(cmd)
    assert code == 0 and "at step 5" in out, out
    assert_same_weights(final(tmp_path / "killed"), final(tmp_path / "whole"))


def test_parameter_server_reruns_continues_and_falls_back(tmp_path):
    base = ["mode=ps", "lte.heads=4", "checkpoint.every=1", "worker.base_dtype=fp32"]
    code, out = run_command(cli(tmp_path / "whole", *base, "train.steps=15", nproc=3))
    assert code == 0, out

    ps = tmp_path / "ps"
    code, out = run_command(cli(ps, *base, "train.steps=10", nproc=3))
    assert code == 0, out
    before = files(ps)
    first = json.loads(before["summary.json"])
    code, out = run_command(cli(ps, *base, "train.steps=10", nproc=3))
    assert code == 0 and "already holds a finished run of 10 steps" in out, out
    assert files(ps) == before

    newest = ps / "checkpoint-000000010.pt"  # the finished checkpoint; the one of step 5 is older
    newest.write_bytes(newest.read_bytes()[:2000])
    code, out = run_command(cli(ps, *base, "train.steps=15", nproc=3))
    assert code == 0 and "cannot be read" in out and "at step 5" in out, out
    assert_same_weights(final(ps), final(tmp_path / "whole"))
    s = summary(ps)
    assert s["steps"] == 15 and s["attempts"] == 2 and s["merges"] == 3
    # communication over both attempts: the first up to its step-5 checkpoint, then all of the second
    upload, download = s["comm"]["upload_bytes_per_round"], s["comm"]["download_bytes_per_round"]
    worker = {r["rank"]: r for r in s["comm"]["per_rank"]}[1]
    hello, control, digest = 16, 40, 8
    assert worker["bytes_sent"] == 2 * hello + (1 + 2) * upload + digest
    assert worker["bytes_received"] == 2 * control + (2 + 3) * download
    assert first["comm"]["per_rank"][1]["bytes_sent"] == hello + 2 * upload + digest


def test_one_run_per_out_dir(tmp_path, capsys):
    cfg = load_config(DIGITS, [f"out_dir={tmp_path}"])
    holder = RunDir(cfg)
    holder.lock()  # as a run in progress would
    try:
        assert main(["--config", DIGITS, *SMALL, f"out_dir={tmp_path}", "train.steps=5"]) == 2
        err = capsys.readouterr().err
        assert f"out_dir {tmp_path} is in use by another run (pid {os.getpid()}" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        holder.unlock()
    code, out = run_command(cli(tmp_path, "mode=lte", "train.steps=5", nproc=2))
    assert code != 0 and "mode=lte runs in one process" in out and "Traceback" not in out, out
    assert not (tmp_path / "summary.json").exists()


def test_a_run_resumes_under_another_product_or_from_before_the_key_existed():
    """lte.product changes the rounding only, so a run may resume under another one, and a checkpoint
    written before the key existed still matches."""
    ours = load_config(DIGITS, ["lte.product=factored"]).to_dict()
    older = load_config(DIGITS, []).to_dict()
    del older["lte"]["product"]
    assert first_difference(older, ours) is None
    older["lte"]["rank"] = 4
    assert first_difference(older, ours) == ("lte.rank", 4, 8)


def test_another_configuration_is_refused_or_moved_aside_when_asked(tmp_path, capsys):
    args = ["--config", DIGITS, *SMALL, f"out_dir={tmp_path}", "train.steps=5"]
    assert main(args) == 0
    before = files(tmp_path)
    assert main([*args, "lte.rank=4"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with another configuration (first difference: lte.rank is 8 there, 4 here)" in err
    assert files(tmp_path) == before
    assert main([*args, "lte.rank=4", "checkpoint.resume=false"]) == 0
    out = capsys.readouterr().out
    moved = next(tmp_path.glob("replaced-*"))
    assert f"moved the previous run in {tmp_path} to {moved}" in out
    assert files(moved) == before  # the old run, whole, where the message said
    assert json.loads((tmp_path / "config.json").read_text())["lte"]["rank"] == 4
