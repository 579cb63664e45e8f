"""The trainer and the lte-train command: outputs, errors, resumption, the demo's accuracy."""
import json
import subprocess

import pytest
from torch import nn

import lte
from helpers import (DIGITS, TINY_VIT, assert_same_weights, config, final, metrics, summary, train_command,
                     train_crashing_at)
from lte.models import register
from lte.train.cli import main
from lte.runtime.config import load_config
from lte.single.trainer import train


def quick(tmp_path, *overrides):
    return load_config(DIGITS, [f"out_dir={tmp_path}", TINY_VIT, "train.steps=20", "train.log_every=5",
                                "eval.every=1", *overrides])


@register
def conv_only(num_classes=10, in_chans=1, img_size=8):
    return nn.Sequential(nn.Conv2d(in_chans, num_classes, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_lte_run_writes_metrics_and_summary(tmp_path):
    returned = train(quick(tmp_path, "lte.merge_every=5"))
    on_disk = summary(tmp_path)
    assert on_disk == json.loads(json.dumps(returned))
    for key in ("mode", "steps", "samples_seen", "merges", "eval", "wall_s", "samples_per_s", "peak_memory_bytes"):
        assert key in on_disk, key
    assert on_disk["mode"] == "lte" and on_disk["steps"] == 20 and on_disk["merges"] == 4
    assert on_disk["samples_seen"] == 20 * 64
    assert set(on_disk["eval"]) == {"loss", "accuracy"} and 0 <= on_disk["eval"]["accuracy"] <= 1
    assert on_disk["peak_memory_bytes"] > 0
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all("eval_accuracy" in r and "samples_per_s" in r for r in rows)


def test_partial_last_round_is_merged(tmp_path):
    summary = train(quick(tmp_path, "train.steps=12", "lte.merge_every=5"))
    assert summary["merges"] == 3  # 5, 10, and the final partial round at 12


def test_full_mode_trains_every_parameter(tmp_path):
    summary = train(quick(tmp_path, "mode=full"))
    plain = lte.models.create_model("vit_digits", embed_dim=16, depth=1, num_heads=2)
    assert summary["merges"] == 0
    assert summary["trainable_params"] == sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("outer", [[], ["lte.outer=nesterov", "lte.outer_momentum=0.5"], ["comm.upload=int4"]],
                         ids=["plain", "outer", "int4-uploads"])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, outer):
    train(quick(tmp_path / "whole", "checkpoint.every=1", "lte.merge_every=5", *outer))

    cfg = quick(tmp_path / "cut", "checkpoint.every=1", "lte.merge_every=5", *outer)
    train_crashing_at(cfg, 13)
    resumed = train(cfg)  # resumes from the checkpoint at step 10
    assert resumed["steps"] == 20 and resumed["merges"] == 4
    assert [r["step"] for r in metrics(tmp_path / "cut")] == [5, 10, 15, 20]
    assert_same_weights(final(tmp_path / "whole"), final(tmp_path / "cut"))


def test_checkpoint_of_a_different_model_is_refused(tmp_path, capsys):
    train(quick(tmp_path, "checkpoint.every=1", "lte.merge_every=5"))
    code = main(["--config", DIGITS, f"out_dir={tmp_path}", "model.args={embed_dim: 32, depth: 1, num_heads: 2}",
                 "train.steps=20"])
    err = capsys.readouterr().err
    assert code == 2 and "another configuration" in err and "model.args" in err and "Traceback" not in err


@pytest.mark.parametrize("overrides,message", [
    (["train.bogus=1"], "unknown config key 'train.bogus'"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["train.lr=fast"], "train.lr must be a finite number"),
    (["train.steps=0"], "train.steps must be >= 1"),
    (["lte.rank=0"], "lte.rank must be an integer >= 1"),
    (["lte.reset=sometimes"], "lte.reset must be one of"),
    (["lte.product=fused"], "lte.product must be one of ('auto', 'factored', 'merged'), got 'fused'"),
    (["mode=warp"], "mode must be one of"),
    (["train.batch_size=30"], "does not split into lte.heads=4"),
    (["model.name=conv_only"], "has no nn.Linear"),
    (["model.name=not_a_model_anywhere"], "unknown model"),
    (["model.args={depth: two}"], "model.args"),
    (["data.args={test_fraction: 2}"], "test_fraction"),
    (["train.lr"], "dotted.key=value"),
    (["lte.outer=adam"], "lte.outer must be one of"),
    (["lte.outer_momentum=0.9"], "lte.outer is 'none', so lte.outer_lr (1.0) and lte.outer_momentum (0.9)"),
    (["lte.outer=nesterov", "lte.outer_lr=-1"], "lte.outer_lr must be a finite number > 0"),
    (["mode=full", "lte.outer=nesterov"], "mode=full has no merge"),
    (["comm.upload=int3"], "comm.upload must be one of"),
    (["mode=full", "comm.upload=int8"], "mode=full has none"),
    (["comm.upload=int4", "lte.reset=none"], "cannot run with lte.reset=none"),
    (["mode=full", "comm.overlap=true"], "(mode=lte or ps); mode=full has none"),
    (["comm.overlap=true", "lte.reset=none"], "comm.overlap cannot run with lte.reset=none"),
    (["comm.overlap=true", "dist.sync_phases=true"], "set one of them"),
    (["dist.emulate_link_mbps=100"], "mode=lte runs in one process"),
    (["mode=ps", "dist.emulate_link_mbps=-1"], "dist.emulate_link_mbps must be >= 0"),
    (["train.compile=true", "train.compile_mode=fastest"], "train.compile_mode must be one of"),
    (["train.compile_mode=max-autotune"], "set train.compile=true with it"),
])
def test_cli_reports_config_errors_without_traceback(tmp_path, capsys, overrides, message):
    code = main(["--config", DIGITS, f"out_dir={tmp_path}", "train.steps=2", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err


def test_cli_missing_config_file_in_a_real_process(tmp_path):
    proc = subprocess.run(train_command("--config", tmp_path / "nope.yaml"),
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "config file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_mode_in_out_dir_keeps_each_modes_run_apart():
    shakespeare = config("shakespeare_char")
    assert load_config(shakespeare).out_dir == "runs/shakespeare-char-lte"
    assert load_config(shakespeare, ["mode=full"]).out_dir == "runs/shakespeare-char-full"
    assert load_config(DIGITS, ["out_dir=/tmp/x-{mode}/y", "mode=ps"]).out_dir == "/tmp/x-ps/y"


def test_yaml_floats_without_a_dot_are_numbers(tmp_path):
    assert load_config(DIGITS, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)


def test_wandb_offline_logging(tmp_path):
    train(quick(tmp_path, "log.wandb=true", "train.steps=5"))
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline wandb run was written"


def test_demo_reaches_its_accuracies(tmp_path):
    """The README's demo: full-rank >= 0.93 and LTE >= 0.90 test accuracy on the digits."""
    full = train(load_config(DIGITS, [f"out_dir={tmp_path / 'full'}", "mode=full", "train.log_every=500"]))
    heads = train(load_config(DIGITS, [f"out_dir={tmp_path / 'lte'}", "mode=lte", "train.log_every=500"]))
    assert full["eval"]["accuracy"] >= 0.93, full["eval"]
    assert heads["eval"]["accuracy"] >= 0.90, heads["eval"]
