"""Per-worker memory options in the trainer: config refusals, digits runs with lora_fa, velora and
local chunks, exact resumption, and a parameter-server run whose two workers differ."""
import math

import pytest
import torch

import lte
from lte import core
from lte.distributed.protocol import worker_protocols
from lte.distributed.worker import master_shapes
from lte.models import create_model
from lte.runtime.chunks import LocalChunks
from lte.train.cli import main
from lte.runtime.config import load_config, resolve_heads
from lte.single.trainer import train
from helpers import DIGITS, final, metrics, summary
from test_dist import run

SMALL = "model.args={embed_dim: 32, depth: 2, num_heads: 2}"


@pytest.mark.parametrize("overrides,message", [
    (["worker.activations=lora_fa+velora"], "VeLoRA cannot be combined with LoRA-FA"),
    (["worker.activations=lora_fa", "lte.reset=none"], "lora_fa cannot run with lte.reset=none"),
    (["worker.activations=velora", "worker.velora_subtoken=8"],
     "velora_subtoken=8 does not divide the input width 4 of LTE layer 'patch_embed.proj'"),
    (["worker.chunks=2", "train.compile=true"], "cannot run with train.compile=true"),
    (["worker.chunks=9"], "worker.chunks=9 is more than the 4 blocks of 'blocks'"),
    (["mode=full", "worker.activations=lora_fa"], "apply to LTE heads"),
    (["worker.per_rank={1: {chunks: 2}}"], "worker.per_rank sets options per worker process of mode=ps"),
    (["mode=ps", "worker.per_rank={1: {heads: 2}}"], "cannot set 'heads' (every worker holds worker.heads heads)"),
    (["mode=ps", "worker.per_rank={0: {chunks: 2}}"], "rank 0 is the server"),
    (["mode=ps", "worker.per_rank={1: {activations: velora, base_dtype: nf5}}"],
     "worker.per_rank.1.base_dtype must be one of"),
])
def test_meaningless_options_are_refused_in_one_line(tmp_path, capsys, overrides, message):
    code = main(["--config", DIGITS, f"out_dir={tmp_path}", "train.steps=2", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_per_rank_beyond_the_workers_is_refused():
    cfg = load_config(DIGITS, ["mode=ps", "worker.per_rank={3: {chunks: 2}}"])
    with pytest.raises(lte.ConfigError, match="names worker rank 3, but this run's workers are ranks 1..2"):
        resolve_heads(cfg, 2)


@pytest.mark.parametrize("option", [["worker.activations=lora_fa"], ["worker.activations=velora",
                                                                   "worker.velora_subtoken=4"], ["worker.chunks=2"]])
def test_digits_train_with_each_option(tmp_path, option):
    """300 steps of a 2-block demo model (the demo's full-length accuracies are in docs/memory.md): far above
    chance (0.1). Measured: lora_fa 0.716, velora 0.652, 2 chunks 0.596."""
    s = train(load_config(DIGITS, [f"out_dir={tmp_path}", "train.steps=300", "train.log_every=100", "eval.every=0",
                                   "model.args={embed_dim: 64, depth: 2, num_heads: 4}", "lte.lr=6e-3", *option]))
    assert s["eval"]["accuracy"] > 0.5, s["eval"]
    rows = metrics(tmp_path)
    if option == ["worker.chunks=2"]:
        rounds = [r for r in rows if "chunk_losses" in r]
        assert [r["step"] for r in rounds] == list(range(10, 301, 10))  # every round logs each chunk's loss
        assert all(len(r["chunk_losses"]) == 2 and all(math.isfinite(v) for v in r["chunk_losses"]) for r in rounds)
        assert rounds[-1]["chunk_losses"][1] < rounds[0]["chunk_losses"][1]


def test_resume_with_velora_and_chunks_is_exact(tmp_path, monkeypatch):
    opts = ["train.steps=20", "lte.merge_every=5", "checkpoint.every=1", "eval.every=0", SMALL,
            "worker.activations=velora", "worker.velora_subtoken=4", "worker.chunks=2"]
    train(load_config(DIGITS, [f"out_dir={tmp_path / 'whole'}", *opts]))
    real = LocalChunks.round

    def crash_after_step_10(self, engine, steps):
        if engine.step >= 10:
            raise RuntimeError("simulated crash")
        return real(self, engine, steps)

    cut = load_config(DIGITS, [f"out_dir={tmp_path / 'cut'}", *opts])
    monkeypatch.setattr(LocalChunks, "round", crash_after_step_10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cut)
    monkeypatch.setattr(LocalChunks, "round", real)
    assert train(cut)["steps"] == 20
    last = max((tmp_path / "cut").glob("checkpoint-*.pt"), key=lambda f: int(f.stem.split("-")[1]))
    assert torch.load(last, weights_only=True)["model"]["blocks.0.attn.qkv.velora_v"].any()  # v is in the state
    whole, cut = final(tmp_path / "whole"), final(tmp_path / "cut")
    for key in whole:
        torch.testing.assert_close(cut[key], whole[key], rtol=0, atol=0, msg=key)


def test_server_redraws_the_A_a_lora_fa_worker_trained_with():
    cfg = resolve_heads(load_config(DIGITS, ["mode=ps", "lte.heads=4", SMALL, "worker.base_dtype=fp32",
                                             "worker.per_rank={2: {activations: lora_fa}}"]), 2)
    torch.manual_seed(0)
    model = core.prepare(create_model("vit_digits", embed_dim=32, depth=2, num_heads=2),
                         lte.LTEConfig(heads=2, rank=8, alpha=64, activations="lora_fa"), first_head=2)
    protos = worker_protocols(cfg, core.state_of(model).spec, master_shapes(model), 2)
    assert not protos[0].redrawn and protos[1].redrawn
    for merges in range(3):  # the A worker rank 2 (heads 2, 3) holds in round `merges`
        heads = core.head_state(model)
        upload = protos[1].upload.unpack(protos[1].upload.pack({**heads, "stats": torch.zeros(2)}))
        factors = protos[1].factors(upload, {}, seed=0, first_head=2, draw=merges)  # fp32: no master needed
        assert set(factors) == set(heads)
        for key, value in heads.items():
            assert torch.equal(factors[key], value), key
        core.finish_merge(model)


def test_mixed_workers_finish_and_hold_the_servers_base(tmp_path):
    """Rank 1: nf4 base, lora_fa, 2 local chunks; rank 2: bf16 base, velora. Every byte is counted,
    each worker gets the base in its own format, and both end with the server's encoding of it."""
    rounds, k, rank = 3, 2, 8
    code, out = run(["mode=ps", "lte.heads=4", "train.steps=30", "lte.merge_every=10", f"out_dir={tmp_path}",
                     "model.args={embed_dim: 16, depth: 2, num_heads: 2}",
                     "worker.per_rank={1: {base_dtype: nf4, activations: lora_fa, chunks: 2}, "
                     "2: {base_dtype: bf16, activations: velora, velora_subtoken: 4}}"], nproc=3)
    assert code == 0, out
    s = summary(tmp_path)
    assert s["base_check"] == "match" and s["merges"] == rounds and math.isfinite(s["eval"]["loss"])
    # message sizes from the plain model, entry by entry, 8-byte aligned
    model = create_model("vit_digits", embed_dim=16, depth=2, num_heads=2)
    pad = lambda n: -(-n // 8) * 8  # noqa: E731
    a_bytes = b_and_replicas = 0
    download = {"nf4": pad(2 * 8), "bf16": pad(2 * 8)}  # the accepted mask of 2 workers
    for name, p in model.named_parameters():
        if name.endswith(".weight") and p.dim() >= 2:   # the LTE layers (linears and the patch conv)
            out_f, d_in = p.shape[0], p[0].numel()
            a_bytes += pad(k * rank * d_in * 4)
            b_and_replicas += pad(k * out_f * rank * 4)
            download["nf4"] += pad((p.numel() + 1) // 2) + pad(math.ceil(p.numel() / 64) * 4)
            download["bf16"] += pad(p.numel() * 2)
        else:                                           # biases, norms, tokens: one copy per head
            b_and_replicas += pad(k * p.numel() * 4)
            download["nf4"] += pad(p.numel() * 4)
            download["bf16"] += pad(p.numel() * 4)
    upload = {1: b_and_replicas + pad((2 + 2) * 8), 2: a_bytes + b_and_replicas + pad(2 * 8)}  # stats (+ chunk losses)
    opts = {o["rank"]: o for o in s["worker_options"]}
    assert opts[1]["upload_bytes_per_round"] == upload[1] and opts[2]["upload_bytes_per_round"] == upload[2]
    assert opts[1]["download_bytes_per_round"] == download["nf4"]
    assert opts[2]["download_bytes_per_round"] == download["bf16"]
    hello, control, digest = 16, 40, 8
    per_rank = {r["rank"]: r for r in s["comm"]["per_rank"]}
    for w, fmt in ((1, "nf4"), (2, "bf16")):
        assert per_rank[w]["bytes_sent"] == hello + rounds * upload[w] + digest
        assert per_rank[w]["bytes_received"] == control + (rounds + 1) * download[fmt]
    assert per_rank[0]["bytes_received"] == per_rank[1]["bytes_sent"] + per_rank[2]["bytes_sent"]
    assert per_rank[0]["bytes_sent"] == per_rank[1]["bytes_received"] + per_rank[2]["bytes_received"]
    # the LoRA-FA worker's factors: B alone, the server re-draws A
    assert upload[1] - pad(4 * 8) == b_and_replicas
    assert all(len(r["chunk_losses"]["1"]) == 2 for r in metrics(tmp_path))  # worker rank 1's per-chunk losses
