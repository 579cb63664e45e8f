"""The parameter server and the DDP baseline as real multi-process runs on Gloo/CPU."""
import json
import math
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import (DIGITS, ROOT, assert_same_weights, child_env, config, final, metrics, run_command, small, summary,
                     train_command)
from lte.core.linear import is_patch_conv
from lte.core.algebra import MergeSpec
from lte.distributed.shards import shard_specs
from lte.errors import ConfigError
from lte.models import create_model
from lte.runtime.config import load_config

SMALL = small("train.log_every=10")
# A tiny character GPT on the embedded tiny Shakespeare, in place of the digits ViT.
GPT = ["--config", config("shakespeare_char"),
       "model.args={n_layer: 1, n_head: 2, n_embd: 16, block_size: 16}", "data.args.block_size=16",
       "train.batch_size=16", "eval.batches=2", "eval.batch_size=32", "lte.rank=4", "lte.alpha=16",
       "train.warmup_steps=0"]


def run(args, *, nproc=None, torchrun=None, **kw):
    """lte-train (helpers.train_command) on the digits ViT unless args start with another --config
    (GPT); helpers.run_command's exit code and output."""
    setup = [] if args[:1] == ["--config"] else ["--config", DIGITS, *SMALL]
    return run_command(train_command(*setup, *args, nproc=nproc, torchrun=torchrun), **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ps_against_simulated(tmp_path, common, **launch):
    """Train 2 workers x 2 heads (mode=ps) and 4 simulated heads (mode=lte) for 3 rounds from the
    same config; the largest difference of their final weights."""
    setup, common = (common[:2], common[2:]) if common[:1] == ["--config"] else ([], common)  # theirs win
    common = [*setup, "worker.base_dtype=fp32", "train.steps=30", "lte.merge_every=10", "lte.heads=4", *common]
    code, out = run([*common, "mode=ps", "worker.heads=2", f"out_dir={tmp_path / 'ps'}"], **launch)
    assert code == 0, out
    code, out = run([*common, "mode=lte", f"out_dir={tmp_path / 'lte'}"])
    assert code == 0, out
    ps, sim = final(tmp_path / "ps"), final(tmp_path / "lte")
    assert ps.keys() == sim.keys()
    return max((ps[k].float() - sim[k].float()).abs().max().item() for k in ps)


def test_ps_equals_simulated_heads_with_rounds_that_grow_and_2bit_uploads(tmp_path):
    """lte.merge_every as a list of (step, T): rounds of 4 steps, then of 7 from the first round that
    starts at or after step 8, end (by hand) at 4, 8, 15, 22, 29 and 30, in both modes; there every
    round merges and evaluates, and ps == lte with 2-bit uploads and an outer optimizer."""
    overrides = ["lte.merge_every=[[0, 4], [8, 7]]", "eval.every=1", "comm.upload=int2", "lte.outer=nesterov",
                 "lte.outer_lr=0.9", "lte.outer_momentum=0.5"]
    assert ps_against_simulated(tmp_path, overrides, nproc=3) < 1e-5
    for mode in ("ps", "lte"):
        assert [r["step"] for r in metrics(tmp_path / mode) if "eval_loss" in r] == [4, 8, 15, 22, 29, 30], mode
        assert summary(tmp_path / mode)["merges"] == 6


OUTER_INT4_DELTA = ["lte.outer=nesterov", "lte.outer_lr=0.9", "lte.outer_momentum=0.5", "comm.upload=int4",
                    "comm.download=delta"]


@pytest.mark.parametrize("model", [[], GPT, OUTER_INT4_DELTA, ["comm.overlap=true"],
                                   ["comm.overlap=true", *OUTER_INT4_DELTA]],
                         ids=["vit", "gpt", "vit-outer-int4-uploads-delta-downloads", "vit-overlap",
                              "vit-overlap-int4-outer-delta"])
def test_ps_with_two_workers_equals_simulated_heads(tmp_path, model):
    """2 workers x 2 heads through torchrun == 4 simulated heads: same master after 3 rounds (with
    comm.overlap, the simulated heads train one merge behind their master as the workers do)."""
    assert ps_against_simulated(tmp_path, model, torchrun=["--standalone", "--nproc_per_node=3"]) < 1e-5
    s = summary(tmp_path / "ps")
    assert s["eval"]["loss"] == pytest.approx(summary(tmp_path / "lte")["eval"]["loss"], abs=1e-6)
    assert s["merges"] == 3 and s["base_check"] == "match"
    if "comm.download=delta" in model:  # the 4 downloads (first base, 3 rounds) took fewer bytes than whole
        received = [r["bytes_received"] for r in s["comm"]["per_rank"][1:]]
        assert all(r < 4 * s["comm"]["download_bytes_per_round"] for r in received), received


def expected_message_bytes(heads_per_worker, rank, workers, fmt):
    """Upload and download sizes computed from the plain model, entry by entry (8-byte aligned)."""
    model = create_model("vit_digits", embed_dim=16, depth=1, num_heads=2)
    pad = lambda n: -(-n // 8) * 8  # noqa: E731
    upload, download = pad(2 * 8), pad(workers * 8)  # round stats (2 float64), accepted mask (int64)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or is_patch_conv(module):
            out_f, d_in = module.weight.shape[0], module.weight[0].numel()
            upload += pad(heads_per_worker * rank * d_in * 4) + pad(heads_per_worker * out_f * rank * 4)
            n = module.weight.numel()
            download += pad((n + 1) // 2) + pad(math.ceil(n / 64) * 4) if fmt == "nf4" else pad(n * 4)
            if module.bias is not None:
                upload += pad(heads_per_worker * out_f * 4)
                download += pad(out_f * 4)
        else:
            for p in module.parameters(recurse=False):
                upload += pad(heads_per_worker * p.numel() * 4)
                download += pad(p.numel() * 4)
    return upload, download


@pytest.mark.parametrize("fmt,sync", [("nf4", "false"), ("fp32", "true")])
def test_communication_counters_match_the_protocol(tmp_path, fmt, sync):
    k, rank, workers, rounds = 2, 8, 2, 3
    code, out = run(["mode=ps", f"worker.base_dtype={fmt}", "lte.heads=4", "train.steps=30", "lte.merge_every=10",
                     f"dist.sync_phases={sync}", f"out_dir={tmp_path}"], nproc=workers + 1)
    assert code == 0, out
    s = summary(tmp_path)
    upload, download = expected_message_bytes(k, rank, workers, fmt)
    assert s["comm"]["upload_bytes_per_round"] == upload
    assert s["comm"]["download_bytes_per_round"] == download
    hello, control, digest = 16, 40, 8
    per_rank = {r["rank"]: r for r in s["comm"]["per_rank"]}
    for w in range(1, workers + 1):
        assert per_rank[w]["bytes_sent"] == hello + rounds * upload + digest
        assert per_rank[w]["bytes_received"] == control + (rounds + 1) * download
    assert per_rank[0]["bytes_received"] == workers * per_rank[1]["bytes_sent"]
    assert per_rank[0]["bytes_sent"] == workers * per_rank[1]["bytes_received"]
    per_step = (per_rank[1]["bytes_sent"] + per_rank[1]["bytes_received"]) / 30
    assert s["comm"]["bytes_per_step_per_worker"] == pytest.approx(per_step)
    assert s["base_check"] == "match"  # every worker ends holding exactly the server's encoding


def test_ddp_counts_ring_all_reduce_bytes(tmp_path):
    code, out = run(["mode=ddp", "train.steps=6", f"out_dir={tmp_path}"], nproc=2)
    assert code == 0, out
    s = summary(tmp_path)
    params = sum(p.numel() for p in create_model("vit_digits", embed_dim=16, depth=1, num_heads=2).parameters())
    per_step = 2 * (2 * (2 - 1) / 2 * params * 4)  # sent + received of a 2-rank ring all-reduce
    assert s["comm"]["bytes_per_step_per_worker"] == pytest.approx(per_step)
    assert s["steps"] == 6 and s["mode"] == "ddp"


def test_ddp_trains_the_gpt(tmp_path):
    code, out = run([*GPT, "mode=ddp", "train.steps=30", "train.lr=3e-3", "eval.every=1", f"out_dir={tmp_path}"],
                    nproc=2)
    assert code == 0, out
    evals = [r["eval_loss"] for r in metrics(tmp_path) if "eval_loss" in r]
    # from ln 65 = 4.17 at the start, down at every evaluation
    assert len(evals) == 3 and evals[0] < 4.0 and evals[0] > evals[1] > evals[2] and evals[2] < 3.7, evals
    assert set(summary(tmp_path)["eval"]) == {"loss", "perplexity"}


def test_diloco_on_one_rank_is_full_rank_training(tmp_path):
    """Averaging the weights of one rank leaves them as they are: DiLoCo's loop on one rank (no outer
    optimizer) trains exactly what mode=full trains."""
    code, out = run(["mode=diloco", "lte.merge_every=5", "train.steps=20", f"out_dir={tmp_path / 'diloco'}"],
                    nproc=1)
    assert code == 0, out
    code, out = run(["mode=full", "train.steps=20", f"out_dir={tmp_path / 'full'}"])
    assert code == 0, out
    assert_same_weights(final(tmp_path / "diloco"), final(tmp_path / "full"))
    assert summary(tmp_path / "diloco")["merges"] == 4


DILOCO = ["mode=diloco", "lte.merge_every=10", "lte.outer=nesterov", "lte.outer_lr=0.7", "lte.outer_momentum=0.9",
          "train.warmup_steps=0", "train.min_lr_ratio=1", "checkpoint.every=1"]  # a constant lr: a run can grow


def test_diloco_counts_one_ring_all_reduce_a_round_and_resumes_exactly(tmp_path):
    code, out = run([*DILOCO, "train.steps=30", f"out_dir={tmp_path / 'whole'}"], nproc=2)
    assert code == 0, out
    s = summary(tmp_path / "whole")
    params = sum(p.numel() for p in create_model("vit_digits", embed_dim=16, depth=1, num_heads=2).parameters())
    per_round = 2 * (2 * (2 - 1) / 2 * params * 4)  # sent + received of a 2-rank ring all-reduce
    assert s["mode"] == "diloco" and s["merges"] == 3
    assert s["comm"]["bytes_per_step_per_worker"] == pytest.approx(3 * per_round / 30)
    # 20 steps, then the same run continued to 30 from its final checkpoint: every rank's inner AdamW
    # state and RNG come back from rank 0's checkpoint
    for steps in (20, 30):
        code, out = run([*DILOCO, f"train.steps={steps}", f"out_dir={tmp_path / 'grown'}"], nproc=2)
        assert code == 0, out
    assert_same_weights(final(tmp_path / "whole"), final(tmp_path / "grown"))


def test_nonfinite_worker_update_is_rejected(tmp_path):
    code, out = run(["mode=ps", "lte.heads=4", "train.steps=40", "lte.merge_every=10", f"out_dir={tmp_path}"],
                    nproc=3, env={"LTE_FAULT": "nan:rank=1:round=2"})
    assert code == 0, out
    s = summary(tmp_path)
    assert s["rejected_heads"] == 2 and s["merges"] == 4
    assert "rejected the non-finite update of worker rank(s) [1]" in out
    assert all(torch.isfinite(t).all() for t in final(tmp_path).values() if t.is_floating_point())
    assert math.isfinite(s["eval"]["loss"])


def test_hung_worker_ends_the_run_with_a_clear_error(tmp_path):
    t0 = time.time()
    code, out = run(["mode=ps", "lte.heads=4", "train.steps=40", "dist.timeout_s=5", f"out_dir={tmp_path}"],
                    nproc=3, env={"LTE_FAULT": "hang:rank=2:round=2"}, timeout=120)
    assert code != 0
    assert "dist.timeout_s=5s" in out and "the upload of round 2" in out, out[-3000:]
    assert time.time() - t0 < 100


def test_killed_worker_restarted_by_torchrun_resumes_to_the_same_result(tmp_path):
    """The workers' error-feedback residuals (int4 uploads) come back from the checkpoint, and with
    comm.overlap the checkpoint rounds settle, so the rounds after the restart overlap as before.
    (The sharded-server test resumes a worker without overlap, from the shards' checkpoint.)"""
    common = ["mode=ps", "lte.heads=4", "train.steps=50", "lte.merge_every=10", "comm.upload=int4",
              "comm.overlap=true", "checkpoint.every=2"]
    code, out = run([*common, f"out_dir={tmp_path / 'whole'}"], nproc=3)
    assert code == 0, out
    code, out = run([*common, f"out_dir={tmp_path / 'killed'}"], env={"LTE_FAULT": "kill:rank=2:round=3:attempt=0"},
                    torchrun=["--standalone", "--nproc_per_node=3", "--max-restarts=1"])
    assert code == 0, out
    assert "resumed from" in out and "at step 20" in out
    s = summary(tmp_path / "killed")
    assert s["steps"] == 50 and s["merges"] == 5
    whole, killed = final(tmp_path / "whole"), final(tmp_path / "killed")
    for key in whole:
        torch.testing.assert_close(killed[key], whole[key], rtol=0, atol=0, msg=key)
    assert [r["step"] for r in metrics(tmp_path / "killed")] == [10, 20, 30, 40, 50]


def test_two_nodes_on_loopback(tmp_path):
    """Multi-node torchrun (c10d rendezvous) as two 'nodes' of two processes: a server and 3 workers."""
    env = child_env({"NNODES": "2", "NPROC_PER_NODE": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
                     "RDZV_ID": "test-two-nodes"})
    args = ["--config", DIGITS, *SMALL, "mode=ps", "lte.heads=null", "worker.heads=1", "train.batch_size=48",
            "train.steps=20", f"out_dir={tmp_path}"]
    nodes = [subprocess.Popen(["bash", str(ROOT / "launch" / "multinode.sh"), *args], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for _ in range(2)]
    outs = []
    try:
        for node in nodes:
            outs.append(node.communicate(timeout=240)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert all(node.returncode == 0 for node in nodes), "\n".join(outs)[-4000:]
    s = summary(tmp_path)
    assert s["workers"] == 3 and s["heads"] == 3 and s["steps"] == 20 and s["base_check"] == "match"


def listening_addresses(pids):
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                found.append(fields[1].split(":")[0])
    return found


def test_standalone_launcher_listens_on_loopback_only(tmp_path):
    cmd = train_command("--config", DIGITS, *SMALL, "mode=ps", "lte.heads=4", "train.steps=200", f"out_dir={tmp_path}",
                        nproc=3)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        children = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        addresses = listening_addresses([proc.pid, *map(int, children)])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert addresses, "found no listening socket to check"
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 (as /proc/net shows them)
    assert set(addresses) <= loopback, addresses


def test_an_out_dir_of_another_model_stops_every_process(tmp_path):
    """The run directory holds another run's config (written here as that run would have): the
    server refuses it and tells the workers, who would otherwise wait for a first download."""
    ours = ["mode=ps", "lte.heads=4", "train.steps=20", f"out_dir={tmp_path}"]
    theirs = load_config(DIGITS, [*SMALL, *ours, "model.args={embed_dim: 32, depth: 1, num_heads: 2}"])
    (tmp_path / "config.json").write_text(json.dumps(theirs.to_dict()))
    code, out = run(ours, nproc=3, timeout=120)
    assert code != 0
    assert "holds a run with another configuration" in out and "model.args" in out
    assert "the parameter server stopped the run" in out  # the workers were told, not left waiting


@pytest.mark.parametrize("launch,args,message", [
    (dict(nproc=1), ["mode=ps"], "needs at least 2 processes"),
    (dict(), ["mode=ps"], "launch it with `torchrun"),
    (dict(nproc=3), ["mode=ps", "lte.heads=5"], "does not split over 2 workers"),
    (dict(nproc=3), ["mode=ps", "lte.heads=4", "worker.heads=1"], "must equal workers x worker.heads"),
    (dict(nproc=3), ["mode=ps", "lte.heads=4", "train.batch_size=30"], "does not split into lte.heads=4"),
    (dict(nproc=3), ["mode=ps", "worker.base_dtype=nf5"], "worker.base_dtype must be one of"),
    (dict(nproc=2), ["mode=ps", "dist.backend=nccl"], "dist.backend=nccl needs every process on a GPU"),
    (dict(nproc=2), ["mode=ps", "dist.servers=2"], "needs at least 3 processes (2 server rank(s) and a worker)"),
    (dict(), ["mode=lte", "dist.servers=2"], "dist.servers must be 1 outside mode=ps"),
])
def test_bad_launches_are_refused_with_a_message(tmp_path, launch, args, message):
    code, out = run([*args, "train.steps=10", f"out_dir={tmp_path}"], timeout=120, **launch)
    assert code != 0
    assert message in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_sharded_server_equals_one_server_and_resumes_exactly(tmp_path):
    """dist.servers=2 (ranks 0 and 1 each hold part of the master) == one server, bit for bit, with
    an outer optimizer, int4 uploads, delta downloads and workers of two base formats; a worker
    killed in round 3 and restarted by the launcher resumes from the shards' checkpoint to the same
    weights."""
    common = ["mode=ps", "lte.heads=4", "worker.heads=2", "train.steps=50", "lte.merge_every=10", "checkpoint.every=1",
              "lte.outer=nesterov", "lte.outer_lr=0.9", "lte.outer_momentum=0.5", "comm.upload=int4",
              "comm.download=delta", "worker.per_rank={2: {base_dtype: bf16}}"]
    code, out = run([*common, f"out_dir={tmp_path / 'one'}"], nproc=3)
    assert code == 0, out
    code, out = run([*common, "dist.servers=2", f"out_dir={tmp_path / 'two'}"], nproc=4)
    assert code == 0, out
    assert "parameter server in 2 shards" in out
    code, out = run([*common, "dist.servers=2", f"out_dir={tmp_path / 'killed'}"],
                    env={"LTE_FAULT": "kill:rank=2:round=3:attempt=0"},
                    torchrun=["--standalone", "--nproc_per_node=4", "--max-restarts=1"])
    assert code == 0, out
    # from round 2's checkpoint, or round 1's where the kill came before round 2's was committed (the
    # shards write theirs while the workers train round 3: a loaded machine can lose that race)
    assert re.search(r"resumed from \S+ at step (10|20)\b", out), out[-3000:]
    one = final(tmp_path / "one")
    assert not (tmp_path / "two" / "final.pt").exists()  # shard 0 streams final.safetensors alone
    assert_same_weights(final(tmp_path / "two"), one)
    assert_same_weights(final(tmp_path / "killed"), one)
    s = summary(tmp_path / "two")
    assert s["eval"] == summary(tmp_path / "one")["eval"] and s["base_check"] == "match"
    assert [r["rank"] for r in s["comm"]["per_rank"]] == [0, 1, 2, 3] and s["comm"]["servers"] == 2
    assert len(s["server_peak_memory_bytes"]) == 2  # each shard's (benchmarks/shard_memory.py compares them)
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == [
        "checkpoint-000000040.dcp", "checkpoint-000000040.pt", "checkpoint-000000050.dcp", "checkpoint-000000050.pt"]


def test_sharded_gpt_draws_its_own_tensors_and_evaluates_together(tmp_path):
    """A GPT's shards each draw only their own tensors (its init is per tensor: no rank builds the whole
    model), evaluate together (each module's tensors from its owner as it runs) and stream the final
    weights into shard 0's final.safetensors: every evaluation and the weights == one server's."""
    common = [*GPT, "mode=ps", "lte.heads=2", "worker.heads=2", "train.steps=6", "lte.merge_every=2",
              "eval.every=1", "checkpoint.every=0"]
    code, out = run([*common, f"out_dir={tmp_path / 'one'}"], nproc=2)
    assert code == 0, out
    code, out = run([*common, "dist.servers=3", f"out_dir={tmp_path / 'three'}"], nproc=4)
    assert code == 0, out
    evals = [[r["eval_loss"] for r in metrics(tmp_path / name) if "eval_loss" in r] for name in ("one", "three")]
    assert len(evals[0]) == 3 and evals[0] == evals[1]
    assert_same_weights(final(tmp_path / "three"), final(tmp_path / "one"))


def test_a_killed_worker_resumes_exactly_with_growing_rounds_2bit_uploads_and_error_fed_downloads(tmp_path):
    """Every byte-saving option of issue 27 at once (rounds of 5 steps then 10, int2 uploads with their
    residuals, error-fed int8 downloads with the server's copy of the workers' values in the checkpoint)
    and fp32 and nf4 workers: a worker killed in round 3 and restarted resumes to the uninterrupted
    run's weights, bit for bit, and every worker ends holding what the server says it holds."""
    common = ["mode=ps", "lte.heads=4", "worker.heads=2", "train.steps=40", "lte.merge_every=[[0, 5], [10, 10]]",
              "checkpoint.every=1", "comm.upload=int2", "comm.download=ef-int8", "worker.base_dtype=fp32",
              "worker.per_rank={2: {base_dtype: nf4}}"]
    code, out = run([*common, f"out_dir={tmp_path / 'whole'}"], nproc=3)
    assert code == 0, out
    code, out = run([*common, f"out_dir={tmp_path / 'killed'}"], env={"LTE_FAULT": "kill:rank=1:round=3:attempt=0"},
                    torchrun=["--standalone", "--nproc_per_node=3", "--max-restarts=1"])
    assert code == 0, out
    assert re.search(r"resumed from \S+ at step (5|10)\b", out), out[-3000:]  # round 2's checkpoint, or 1's
    assert_same_weights(final(tmp_path / "killed"), final(tmp_path / "whole"))
    for name in ("whole", "killed"):
        s = summary(tmp_path / name)
        assert s["base_check"] == "match" and s["merges"] == 5, name  # ends 5, 10, 20, 30, 40


def test_shards_hold_whole_tensors_balanced_by_bytes():
    """Largest first to the least loaded shard, checked against a hand assignment."""
    spec = MergeSpec(layers=("big", "mid", "small"), replicas=("norm.weight", "big.bias"), scale=1.0)
    shapes = {"big.weight": (64, 64), "mid.weight": (32, 48), "small.weight": (16, 16), "norm.weight": (64,),
              "big.bias": (64,)}
    a, b = shard_specs(spec, shapes, 2)
    # 4096 -> shard 0; 1536 -> 1; 256 -> 1; 64 (big.bias, by name) -> 1; 64 -> 1: loads 4096 and 1984
    assert (a.layers, a.replicas) == (("big",), ())
    assert (b.layers, b.replicas) == (("mid", "small"), ("norm.weight", "big.bias"))
    assert shard_specs(spec, shapes, 1) == [spec]
    with pytest.raises(ConfigError, match="more than the model's 5 master tensors"):
        shard_specs(spec, shapes, 6)
