"""What pre-training asks of the trainer: micro-batches that add up to the step's batch, activation
checkpointing, the warmup-stable-decay schedule, token shards as nanoGPT and llm.c write them, and
tokens per second with MFU in the progress rows."""
import json
import math

import numpy as np
import pytest
import torch

import lte
from lte import core
from lte.data import build_data
from lte.errors import ConfigError
from lte.memory.accounting import SavedTensors
from lte.models import create_model
from lte.runtime.config import load_config
from lte.runtime.engine import TrainStep, adamw
from lte.runtime.log import Throughput, flops_per_token, progress_line
from lte.runtime.recompute import recompute_blocks
from lte.runtime.tasks import TrainingLoss
from lte.single.trainer import train

from helpers import DIGITS, config, final, metrics, run_command, small, train_command


def run(args: list[str], nproc: int | None = None):
    return run_command(train_command(*args, nproc=nproc))


def relative(a: dict, b: dict) -> float:
    """|a - b| / |a| over every tensor of two state_dicts together."""
    num = sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in a)
    return math.sqrt(num / sum(float((a[k].float() ** 2).sum()) for k in a))


def digits_run(tmp_path, name, *overrides):
    cfg = load_config(DIGITS, small("train.steps=12", "lte.merge_every=5", "train.log_every=100", "eval.batches=1",
                                    f"out_dir={tmp_path / name}", *overrides))
    train(cfg)
    return final(tmp_path / name)


TWO_BLOCKS = "model.args={embed_dim: 16, depth: 2, num_heads: 2}"  # local chunks need two blocks


@pytest.mark.parametrize("mode", [["mode=full"], ["mode=lte"], ["mode=lte", "worker.chunks=2", TWO_BLOCKS]],
                         ids=["full", "lte", "lte-local-chunks"])
def test_micro_batches_give_the_weights_of_one_batch(tmp_path, mode):
    """Two and four micro-batches of 64 / k against one batch of 64: 12 steps, two merges, fp32."""
    one = digits_run(tmp_path, "one", *mode)
    for k in (2, 4):
        assert relative(one, digits_run(tmp_path, f"k{k}", *mode, f"train.grad_accum_steps={k}")) < 1e-6


@pytest.mark.parametrize("mode,nproc", [("ps", 3), ("ddp", 2), ("diloco", 2)])
def test_micro_batches_in_the_multi_process_modes(tmp_path, mode, nproc):
    """ps: each worker's heads; ddp: the gradients all-reduced on the last micro-batch only (no_sync
    before); diloco: each rank's inner steps, then the outer sync of a round."""
    common = ["--config", DIGITS, *small(f"mode={mode}", "train.steps=4", "lte.merge_every=2", "train.log_every=100",
                                         "eval.batches=1", "worker.base_dtype=fp32")]
    for k in (1, 2):
        code, out = run([*common, f"train.grad_accum_steps={k}", f"out_dir={tmp_path / str(k)}"], nproc=nproc)
        assert code == 0, out
    assert relative(final(tmp_path / "1"), final(tmp_path / "2")) < 1e-6


def test_each_head_keeps_its_own_samples_in_micro_batches():
    heads, per_head, k = 3, 8, 4
    step = TrainStep(None, None, [], None, heads=heads, grad_clip=0, device=torch.device("cpu"), precision="fp32",
                     accum=k)
    x = torch.arange(heads * per_head)  # sample i belongs to head i // per_head
    parts = [step.micro(x, j) for j in range(k)]
    for part in parts:  # every micro-batch: each head's samples, in head order, as the layers cut them
        assert torch.equal(part.view(heads, -1) // per_head, torch.arange(heads).unsqueeze(1).expand(-1, per_head // k))
    assert sorted(torch.cat(parts).tolist()) == x.tolist()  # together: the whole batch, once
    assert torch.equal(step.join(parts), x)


def test_a_run_with_micro_batches_resumes_exactly(tmp_path):
    common = ["mode=lte", "train.grad_accum_steps=2", "checkpoint.every=1"]
    whole = digits_run(tmp_path, "whole", *common, "train.steps=20")
    digits_run(tmp_path, "parts", *common, "train.steps=10")
    resumed = digits_run(tmp_path, "parts", *common, "train.steps=20")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def tiny_gpt():
    torch.manual_seed(0)
    model = create_model("gpt", n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    return core.prepare(model, lte.LTEConfig(heads=2, rank=4, alpha=8)).train()


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less():
    idx, targets = torch.randint(64, (4, 16)), torch.randint(64, (4, 16))
    grads, kept = [], []
    for every in (0, 1, 2):
        model = tiny_gpt()
        if every:
            assert recompute_blocks(model, every) == (4 if every == 1 else 2)
        with SavedTensors(model, watch={}) as saved:
            loss = TrainingLoss("language_model")(model(idx), targets)
        loss.backward()
        kept.append(saved.activation_bytes())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for other in grads[1:]:
        for n in grads[0]:
            torch.testing.assert_close(other[n], grads[0][n], rtol=1e-6, atol=1e-7)
    assert kept[1] < kept[2] < kept[0]


def test_the_wsd_schedule_by_hand():
    cfg = load_config(DIGITS, ["train.schedule=wsd", "train.steps=100", "train.warmup_steps=10",
                               "train.decay_fraction=0.3", "train.min_lr_ratio=0.1"])
    t = cfg.train
    assert t.lr_factor(0) == pytest.approx(0.1) and t.lr_factor(9) == pytest.approx(1.0)  # warm-up
    assert t.lr_factor(10) == t.lr_factor(69) == 1.0                                     # stable until 100 - 30
    assert t.lr_factor(85) == pytest.approx(0.1 + 0.9 * (1 - 15 / 30))                   # linear decay
    sqrt = load_config(DIGITS, ["train.schedule=wsd", "train.steps=100", "train.decay_fraction=0.3",
                                "train.decay_shape=1-sqrt"]).train
    assert sqrt.lr_factor(85) == pytest.approx(1 - math.sqrt(15 / 30))
    assert sqrt.lr_factor(100) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="train.decay_fraction and train.decay_shape shape the wsd schedule"):
        load_config(DIGITS, ["train.decay_fraction=0.5"])
    with pytest.raises(ConfigError, match="train.activation_checkpointing must be none, blocks or blocks:K"):
        load_config(DIGITS, ["train.activation_checkpointing=every"])
    with pytest.raises(ConfigError, match="of train.grad_accum_steps=3 micro-batches each"):
        load_config(DIGITS, ["train.grad_accum_steps=3"])


# ---- token shards -------------------------------------------------------------------------------

def llmc_shard(path, tokens, version=1, count=None):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = 20240520, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def test_shards_in_both_formats_give_the_windows_of_one_file(tmp_path):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 300, 3000).astype(np.uint16), rng.integers(0, 300, 500).astype(np.uint16)
    one = tmp_path / "one"
    one.mkdir()
    train.tofile(one / "train.bin")
    val.tofile(one / "val.bin")
    (one / "meta.json").write_text(json.dumps({"vocab_size": 300}))
    cuts = [0, 1000, 1800, 3000]
    for name, write in (("nanogpt", lambda p, t: t.tofile(p)), ("llmc", llmc_shard)):
        folder = tmp_path / name
        folder.mkdir()
        for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
            write(folder / f"fineweb_train_{i:06d}.bin", train[a:b])
        write(folder / "fineweb_val_000000.bin", val)
        bundle = build_data("tokens", 0, {"path": str(folder), "block_size": 16, "vocab_size": 300})
        whole = build_data("tokens", 0, {"path": str(one), "block_size": 16})
        assert len(bundle.train) == sum(b - a - 16 for a, b in zip(cuts, cuts[1:]))  # no window across shards
        for shard, (a, b) in enumerate(zip(cuts, cuts[1:])):
            first = sum(cb - ca - 16 for ca, cb in zip(cuts[:shard], cuts[1:shard + 1]))
            local = np.arange(0, b - a - 16, 97)
            x, y = bundle.train.gather(first + local)
            wx, wy = whole.train.gather(a + local)  # the same windows, at their place in the one file
            assert torch.equal(x, wx) and torch.equal(y, wy)
        ex, ey = bundle.eval.gather(np.arange(len(bundle.eval)))
        wx, wy = whole.eval.gather(np.arange(len(whole.eval)))
        assert torch.equal(ex, wx) and torch.equal(ey, wy)
        named = build_data("tokens", 0, {"path": str(folder), "block_size": 16, "vocab_size": 300,
                                         "train": ["*train_00000[01].bin"], "val": "*val*"})
        assert len(named.train) == (1000 - 16) + (800 - 16)


@pytest.mark.parametrize("case,message", [
    ("version", "has an llm.c header of version 7"),
    ("truncated", "is truncated or padded: its header says 1000 tokens, the file holds 500"),
    ("vocab", "holds token id 299, beyond the vocabulary of 200 tokens"),
])
def test_bad_shards_are_one_line_errors_naming_the_file(tmp_path, case, message):
    tokens = np.arange(500) % 300
    kwargs = {"version": 7} if case == "version" else {"count": 1000} if case == "truncated" else {}
    llmc_shard(tmp_path / "fineweb_train_000000.bin", tokens, **kwargs)
    llmc_shard(tmp_path / "fineweb_val_000000.bin", np.zeros(100, dtype=np.uint16))
    code, out = run(["--config", DIGITS, "data.name=tokens", "model.name=gpt_tiny", "mode=full", "train.steps=1",
                     f"data.args={{path: {tmp_path}, block_size: 16, vocab_size: 200}}", f"out_dir={tmp_path / 'run'}"])
    assert code == 2, out
    lines = [line for line in out.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0] and "fineweb_train_000000.bin" in lines[0], out


# ---- speed ------------------------------------------------------------------------------------

def test_tokens_per_second_and_mfu_by_hand():
    meter = Throughput(torch.device("cpu"), tokens_per_sample=256,
                       flops_per_token=flops_per_token(1000, 2, 8, 256), peak=1e9, devices=2)
    rates = meter.rates(10.0)
    assert rates["tokens_per_s"] == 2560
    assert rates["mfu"] == pytest.approx(2560 * (6 * 1000 + 12 * 2 * 8 * 256) / 2e9)
    line = progress_line(10, 100, {"loss": 1.0, **rates})
    assert "2,560 tokens/s" in line and f"MFU {100 * rates['mfu']:.1f}%" in line


def test_a_language_model_run_logs_tokens_per_second(tmp_path):
    cfg = load_config(config("shakespeare_char"), ["mode=lte", "train.steps=4", "train.log_every=2",
                                                   "model.name=gpt_tiny", "train.peak_flops=1e12", "eval.batches=1",
                                                   f"out_dir={tmp_path}"])
    train(cfg)
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    block = cfg.data.args.get("block_size", 64)
    assert rows and all(r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * block) and r["mfu"] > 0 for r in rows)


def test_adamw_and_the_step_with_a_head_optimizer_accept_micro_batches():
    model = tiny_gpt()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=1e-3, weight_decay=0.0, heads=True)
    step = TrainStep(model, TrainingLoss("language_model"), params, optimizer, heads=2, grad_clip=1.0,
                     device=torch.device("cpu"), precision="fp32", accum=2)
    loss = step(torch.randint(64, (4, 16)), torch.randint(64, (4, 16)), 1e-3)
    assert torch.isfinite(loss)
