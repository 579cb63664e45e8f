"""One LTE worker of a 1B, 3B or 7B-shaped GPT taking real training steps on this machine's CPU, and
a DDP (full-rank fp32) worker as far as it fits: peak resident memory, time per step, and the loss
of a fixed batch going down.

    python benchmarks/big_worker.py --shape 7b                      # the LTE worker (defaults below)
    python benchmarks/big_worker.py --shape 1b --mode ddp           # a full-rank fp32 worker, if it fits
    python benchmarks/big_worker.py --shape 7b --steps 3 --out benchmarks/results/big_worker_7b.json

The shapes are LLaMA-class: 32 layers x 4096 wide for 7b (26 x 3200 for 3b, 16 x 2048 for 1b), an
MLP 4x wide, vocabulary 32,000, lte's GPT (lte.models.gpt). The LTE worker is built as a
parameter-server worker is (lte.core.lean: the model's parameters on the meta device, the base
allocated in nf4, never the fp32 model), then given a seeded base encoded layer by layer, as a
worker with no server; it trains one head (LoRA-FA by default) through local chunks, with the
token embedding as an LTE layer and the loss over the vocabulary in chunks. Each step trains
every chunk once on the same fixed batch; the batch's loss (training mode, heads included) is
measured before each step and after the last.

Reported (JSON, and a line per step): peak_rss_bytes (getrusage max RSS of the process),
tensor_bytes (the model's tensors and the optimizer's state, by storage, after the steps),
fp32_param_bytes (the model's parameters in fp32: what a worker that builds the fp32 model first
would hold at least once), step_s, losses; and accounted_bytes, benchmarks/memory.py's accounting
of the same worker on the meta device with everything resident, as on a CPU (all of the model and
every chunk's optimizer moments, the worst chunk's gradients and saved activations).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch

from common import RESULTS, machine, write_json
from memory import Spec, account, nbytes, worker_model
from lte import core
from lte.models import create_model
from lte.data.base import DataBundle
from lte.data.tokens import TokenWindows
from lte.runtime.config import config_from_dict
from lte.runtime.engine import Engine

SHAPES = {  # n_layer, n_embd, n_head
    "1b": (16, 2048, 16),
    "3b": (26, 3200, 25),
    "7b": (32, 4096, 32),
    "tiny": (2, 64, 2),  # the test's dry run
}
VOCAB = 32000


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--mode", choices=("lte", "ddp"), default="lte")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (a short one: CPU time)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--chunks", type=int, default=4, help="local chunks (1: off)")
    p.add_argument("--activations", choices=("full", "lora_fa", "velora"), default="lora_fa")
    p.add_argument("--embeddings", choices=("lte", "replica"), default="lte")
    p.add_argument("--base", default="nf4")
    p.add_argument("--out", default=None,
                   help="JSON file (default: benchmarks/results/big_worker_<shape>_<mode>.json)")
    return p.parse_args(argv)


def config(args):
    layers, width, heads = SHAPES[args.shape]
    raw = {"mode": "ddp", "seed": 0, "out_dir": "unused",
           "model": {"name": "gpt", "args": {"n_layer": layers, "n_embd": width, "n_head": heads,
                                             "block_size": args.seq, "bias": False}},
           "train": {"steps": args.steps, "batch_size": args.batch, "lr": 1e-3, "grad_clip": 1.0, "device": "cpu"}}
    if args.mode == "lte":  # one worker of a parameter-server run
        raw.update(mode="ps",
                   lte={"heads": 1, "rank": args.rank, "alpha": 2 * args.rank, "embeddings": args.embeddings},
                   worker={"heads": 1, "base_dtype": args.base, "activations": args.activations, "chunks": args.chunks})
    return config_from_dict(raw)


class FixedBatch:
    """Every step's batch is the same one (the engine asks by step)."""

    def __init__(self, x, y):
        self.xy = (x, y)

    def get(self, step):
        return self.xy


def data(seq: int) -> DataBundle:
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=64 * (seq + 1), dtype=np.int64)
    return DataBundle(train=TokenWindows(tokens, seq), eval=TokenWindows(tokens, seq, stride=seq),
                      task="language_model", model_args={"vocab_size": VOCAB}, sampling="random")


def worker(args, cfg, bundle) -> Engine:
    if args.mode == "ddp":  # the full-rank fp32 model, as a DDP rank holds it (without the process group)
        return Engine(cfg, bundle, torch.device("cpu"), heads=None, streams=range(1), per_stream=args.batch)
    engine = Engine(cfg, bundle, torch.device("cpu"), heads=range(1), streams=range(1), per_stream=args.batch,
                    lte=cfg.lte_config(1), chunks=args.chunks, lean=True)
    assert engine.lean, "the worker was built with its fp32 weights"
    core.seeded_base(engine.model, seed=0)  # no server: a base of its own, layer by layer
    return engine


def fixed_loss(engine, x, y) -> float:
    with torch.no_grad():
        with engine.loss.forward_mode():
            outputs = engine.model.train()(x)
        return engine.loss(outputs, y).item()


def tensor_bytes(engine) -> int:
    tensors = list(engine.model.parameters()) + list(engine.model.buffers())
    tensors += [v for s in engine.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def fp32_param_bytes(cfg) -> int:
    with core.params_on_meta():
        model = create_model("gpt", {"vocab_size": VOCAB}, **cfg.model.args)
    return 4 * sum(p.numel() for p in model.parameters())


def accounted_bytes(args, cfg) -> int:
    """memory.py's accounting of this worker, everything resident (a CPU moves nothing)."""
    def batch(n, device):
        idx = torch.zeros(n, args.seq, dtype=torch.long, device=device)
        return idx, idx

    spec = Spec(args.shape, lambda: create_model("gpt", {"vocab_size": VOCAB}, **cfg.model.args), batch,
                "language_model", heads=1, rank=args.rank, per_worker=args.batch)
    opts = None if args.mode == "ddp" else dict(base=args.base, embeddings=args.embeddings,
                                                 activations=args.activations, chunks=args.chunks)
    worst = account(spec, opts)
    model, trained = worker_model(spec, opts, torch.device("meta"))
    return nbytes(list(model.parameters()) + list(model.buffers())) + 2 * nbytes(trained) + worst["grads"] \
        + worst["saved"]


def main(argv=None) -> dict:
    args = parse(argv)
    torch.manual_seed(0)
    cfg, bundle = config(args), data(args.seq)
    fp32, accounted = fp32_param_bytes(cfg), accounted_bytes(args, cfg)
    if args.mode == "ddp":  # weights, gradients and two AdamW moments in fp32, before any activation
        need, avail = 4 * fp32, _available_bytes()
        if need > avail:
            print(f"{args.shape} DDP worker: {need / 2**30:.1f} GiB of fp32 weights, gradients and AdamW moments "
                  f"do not fit the {avail / 2**30:.1f} GiB available; not run")
            return _report(args, {"fits": False, "fp32_param_bytes": fp32, "needed_bytes": need,
                                  "accounted_bytes": accounted})
    baseline = _current_rss()  # the process before the worker: Python, torch and the libraries
    t0 = time.perf_counter()
    engine = worker(args, cfg, bundle)
    build_s = time.perf_counter() - t0
    x, y = bundle.train.gather(np.arange(args.batch))
    engine.batches = FixedBatch(x, y)
    losses, times = [fixed_loss(engine, x, y)], []
    print(f"{args.shape} {args.mode} worker built in {build_s:.1f} s; peak RSS {_rss() / 2**30:.2f} GiB (before the "
          f"worker {baseline / 2**30:.2f}; accounted {accounted / 2**30:.2f}); fp32 parameters {fp32 / 2**30:.1f} GiB; "
          f"loss {losses[0]:.4f}", flush=True)
    for step in range(args.steps):
        t = time.perf_counter()
        for _ in engine.train_round(1):
            pass
        times.append(time.perf_counter() - t)
        losses.append(fixed_loss(engine, x, y))
        print(f"step {step + 1}: {times[-1]:.1f} s, loss {losses[-1]:.4f}, peak RSS {_rss() / 2**30:.2f} GiB",
              flush=True)
    return _report(args, {"fits": True, "peak_rss_bytes": _rss(), "tensor_bytes": tensor_bytes(engine),
                          "baseline_rss_bytes": baseline, "accounted_bytes": accounted, "fp32_param_bytes": fp32,
                          "build_s": build_s, "step_s": statistics.median(times),
                          "step_times_s": times, "losses": losses, "loss_went_down": losses[-1] < losses[0]})


def _report(args, result: dict) -> dict:
    report = {"benchmark": "big_worker", "shape": args.shape, "mode": args.mode, "config": vars(args),
              "machine": machine(), **result}
    write_json(args.out or RESULTS / f"big_worker_{args.shape}_{args.mode}.json", report)
    return report


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _current_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


if __name__ == "__main__":
    main()
