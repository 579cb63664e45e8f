"""Each server rank's peak memory with the master sharded (dist.servers=K) against one server, on a
1B-shaped GPT master (benchmarks/big_worker.py's shape: 16 layers x 2048 wide, vocabulary 32,000).

    python benchmarks/shard_memory.py                    # K = 1 and 4, one lean nf4 worker, 2 rounds
    python benchmarks/shard_memory.py --servers 1,2,4 --shape 1b

A real mode=ps run through lte's launcher: the server ranks with the fp32 master and the outer
optimizer's momenta (Nesterov), one worker built lean (its base in nf4, never the fp32 model), one
head of rank 16 with LoRA-FA and local chunks, 2 rounds of 1 step on 64-token windows of random
tokens, the final evaluation on one batch. Each server rank's peak resident set comes from the run's
summary (server_peak_memory_bytes with K > 1, peak_memory_bytes with one). No shard holds the whole
master: each draws its own tensors (the GPT's init is per tensor), they evaluate together module by
module, and shard 0 streams final.safetensors (lte.distributed.shards).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from common import ROOT, machine, read_summary, run_train, train_command, write_json

SHAPES = {"1b": (16, 2048, 16), "350m": (24, 1024, 16), "tiny": (4, 128, 4)}  # n_layer, n_embd, n_head
VOCAB = 32_000


def tokens(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("train", "val"):
        rng.integers(0, VOCAB, size=20_000, dtype=np.uint16).tofile(folder / f"{name}.bin")
    return folder


def overrides(shape: str, data: Path) -> list[str]:
    layers, width, heads = SHAPES[shape]
    return ["mode=ps", "seed=0", "model.name=gpt",
            f"model.args={{n_layer: {layers}, n_embd: {width}, n_head: {heads}, block_size: 64, bias: false}}",
            "data.name=tokens", f"data.args={{path: {data}, vocab_size: {VOCAB}, block_size: 64}}",
            "lte.heads=1", "lte.rank=16", "lte.alpha=32", "lte.embeddings=lte", "lte.merge_every=1",
            "lte.outer=nesterov", "lte.outer_lr=1.0", "lte.outer_momentum=0.5",
            "worker.heads=1", "worker.base_dtype=nf4", "worker.activations=lora_fa", "worker.chunks=4",
            "train.steps=2", "train.batch_size=1", "train.device=cpu", "train.log_every=1",
            "eval.batch_size=1", "eval.batches=1", "checkpoint.every=0", "checkpoint.resume=false"]


def run(k: int, shape: str, work: Path) -> dict:
    out_dir = work / f"{shape}-servers{k}"
    if not (out_dir / "summary.json").exists():
        print(f"dist.servers={k} ...", flush=True)
        cmd = train_command(*overrides(shape, tokens(work / "tokens")), f"dist.servers={k}", f"out_dir={out_dir}",
                            nproc=k + 1)
        run_train(cmd, out_dir, log=work / f"{shape}-servers{k}.log")
        for heavy in [*out_dir.glob("checkpoint-*"), *out_dir.glob("final.*")]:  # 15 GB at 1b: only the summary counts
            shutil.rmtree(heavy) if heavy.is_dir() else heavy.unlink()
    s = read_summary(out_dir)
    peaks = s.get("server_peak_memory_bytes") or [s["peak_memory_bytes"]]
    return {"servers": k, "peak_bytes": peaks, "wall_s": s["wall_s"], "eval_loss": s["eval"]["loss"]}


def markdown(rows: list[dict], shape: str) -> str:
    one = rows[0]["peak_bytes"][0] if rows[0]["servers"] == 1 else None
    lines = [f"| {shape} master, dist.servers | server rank | peak RSS MiB | vs one server |", "|---|---:|---:|---:|"]
    for r in rows:
        for rank, b in enumerate(r["peak_bytes"]):
            ratio = f"{b / one:.2f}x" if one else ""
            lines.append(f"| {r['servers']} | {rank} | {b / 2**20:,.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--servers", default="1,4")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "shard_memory")
    parser.add_argument("--out", type=Path, default=None)
    a = parser.parse_args()
    rows = [run(int(k), a.shape, a.work) for k in a.servers.split(",")]
    table = markdown(rows, a.shape)
    print(table)
    out = a.out or ROOT / "benchmarks" / "results" / f"shard_memory_{a.shape}.json"
    write_json(out, {"machine": machine("cpu"), "shape": a.shape, "rows": rows})
    out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
