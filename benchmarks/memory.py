"""Peak memory of ONE worker at a fixed per-worker batch: a DDP (full-rank) worker against LTE workers
with each per-worker memory option, for GPT-2 124M (lte's gpt2) and timm's ViT-B/32; the step
time of each relative to plain LTE (nf4); and, under a fixed memory cap, the largest GPT that
trains as a DDP worker and as the leanest LTE worker.

    python benchmarks/memory.py                 # on a GPU: torch.cuda.max_memory_allocated, a real cap search
                                                # on a CPU: accounting on the meta device + timings
    python benchmarks/memory.py --dry-run       # tiny shapes, seconds (the GPU suite's smoke test)

How memory is counted on a CPU (no GPU to measure): the model is built on the meta device (shapes
only) and one training step's forward runs there; what autograd keeps for backward is counted
with saved_tensors_hooks (lte.memory.accounting: distinct storages, the model's own tensors
apart), and the peak of a step is

    resident parameters and buffers + optimizer moments + gradients of the trained tensors
    + the tensors saved for backward at the end of the forward,

for the parts resident on the device (with local chunks: the chunk and its proxy; the worst chunk
is the peak; with activation checkpointing, what is saved includes the checkpointed blocks' inputs
and the largest block's activations, which its recomputation holds during its backward). Transient
workspace (a matmul's output before it is consumed, backward's temporaries) is not in it. Attention
is counted as the fused kernel SDPA picks on CPUs and GPUs (it keeps q, k, v, the output and the
log-sum-exp, not the T x T matrix; on the meta device SDPA would fall back to the unfused math
path). The DDP worker is one process's full-rank step (its
gradient buckets, another gradient-sized buffer, are not counted: conservative for LTE). On a
GPU the same steps run for real and the CUDA allocator's peak is reported next to the accounting.
The matmul FLOPs of a step (forward and backward, counted on the meta device with FlopCounterMode;
with local chunks, every chunk's step) are reported next to the measured step time: a CPU shared
with other work times poorly, FLOPs do not depend on it (they leave out elementwise work such as
decoding a 4-bit base).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common import RESULTS, machine, step_times, sync, write_json
import lte
from lte import core
from lte.memory.accounting import SavedTensors
from lte.models.gpt import gpt
from lte.runtime import tasks
from lte.runtime.chunks import LocalChunks, find_blocks
from lte.runtime.engine import TrainStep
from lte.runtime.recompute import recompute_blocks


# ---- models --------------------------------------------------------------------------------------

GPT_FAMILY = {  # name: (width, depth, attention heads); GPT-2 sizes, then larger decoder shapes
    "gpt2-124m": (768, 12, 12), "gpt2-350m": (1024, 24, 16), "gpt2-774m": (1280, 36, 20),
    "gpt2-1.5b": (1600, 48, 25), "gpt-2.7b": (2560, 32, 32), "gpt-6.7b": (4096, 32, 32), "gpt-13b": (5120, 40, 40),
    "gpt-30b": (7168, 48, 56),
}


@dataclass
class Spec:
    name: str
    build: object            # () -> nn.Module
    batch: object            # (n, device) -> (inputs, targets)
    task: str
    heads: int               # LTE heads on this worker
    rank: int
    per_worker: int          # samples per worker and step
    velora_m: int = 128


def gpt_spec(name, d, depth, n_head, vocab=50304, ctx=1024, per_worker=4, heads=1, rank=64) -> Spec:
    def batch(n, device):
        idx = torch.zeros(n, ctx, dtype=torch.long, device=device)
        return idx, idx
    def build():  # the trainer's GPT (lte/models/gpt.py): untied, so LTE keeps one base per layer
        return gpt(vocab_size=vocab, block_size=ctx, n_layer=depth, n_head=n_head, n_embd=d)
    return Spec(name, build, batch, "language_model", heads, rank, per_worker)


def vit_spec(name="vit-b32", img=224, patch=32, d=768, depth=12, n_head=12, classes=1000, per_worker=64, heads=1,
             rank=64) -> Spec:
    def build():
        from timm.models.vision_transformer import VisionTransformer
        return VisionTransformer(img_size=img, patch_size=patch, num_classes=classes, embed_dim=d, depth=depth,
                                 num_heads=n_head)

    def batch(n, device):
        return torch.zeros(n, 3, img, img, device=device), torch.zeros(n, dtype=torch.long, device=device)
    return Spec(name, build, batch, "classification", heads, rank, per_worker)


def specs(dry: bool) -> list[Spec]:
    if dry:
        tiny = [gpt_spec("gpt-tiny", 64, 4, 4, vocab=512, ctx=64, per_worker=2, rank=8),
                vit_spec("vit-tiny", img=32, patch=8, d=64, depth=4, n_head=4, classes=10, per_worker=4, rank=8)]
        for s in tiny:
            s.velora_m = 16
        return tiny
    return [gpt_spec("gpt2-124m", *GPT_FAMILY["gpt2-124m"]), vit_spec()]


ROWS = [  # label, options (None: the DDP worker)
    ("DDP worker (full-rank, fp32)", None),
    ("LTE, bf16 base", dict(base="bf16")),
    ("LTE, nf4 base", dict(base="nf4")),
    ("LTE, nf4 + lora_fa", dict(base="nf4", activations="lora_fa")),
    ("LTE, nf4 + velora", dict(base="nf4", activations="velora")),
    ("LTE, nf4 + 2 chunks", dict(base="nf4", chunks=2)),
    ("LTE, nf4 + 4 chunks", dict(base="nf4", chunks=4)),
    ("LTE, nf4 + lora_fa + 4 chunks", dict(base="nf4", activations="lora_fa", chunks=4)),
    ("LTE, nf4 + LTE embedding", dict(base="nf4", embeddings="lte")),
    ("LTE, nf4 + LTE embedding + lora_fa + 4 chunks", dict(base="nf4", embeddings="lte", activations="lora_fa",
                                                           chunks=4)),
    ("DDP worker, activation checkpointing", dict(full_rank=True, recompute=1)),
    ("LTE, nf4 + activation checkpointing", dict(base="nf4", recompute=1)),
]
LEANEST = ROWS[-3][1]  # the leanest LTE worker (the last rows are the checkpointed ones)
BASELINE = "LTE, nf4 base"
LOGITS_CHUNK_MB = 64.0  # the trainer's default train.logits_chunk_mb


# ---- building ----------------------------------------------------------------------------------

def worker_model(spec: Spec, opts: dict | None, device) -> tuple[nn.Module, list[torch.Tensor]]:
    """The model one worker holds (meta: shapes only) and its trained tensors. An LTE worker on a
    real device is built as the trainer builds a parameter-server worker (lte.core.lean: never its
    fp32 model) and given a seeded base, layer by layer; a DDP worker is the plain model."""
    torch.manual_seed(0)
    every = (opts or {}).get("recompute", 0)  # train.activation_checkpointing=blocks:every
    if not heads_of(opts) or device.type == "meta":
        with torch.device(device):
            model = spec.build()
    else:
        with core.params_on_meta():
            model = spec.build()
    if heads_of(opts):
        opts = {k: v for k, v in opts.items() if k not in ("chunks", "recompute")}
        core.prepare(model, lte.LTEConfig(heads=spec.heads, rank=spec.rank, alpha=4096, velora_subtoken=spec.velora_m,
                                          **opts))
        if device.type != "meta":
            core.materialize(model, device)
            core.seeded_base(model, seed=0)
    if every:
        model._recomputed_blocks = recompute_blocks(model, every)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


# ---- accounting --------------------------------------------------------------------------------

def heads_of(opts: dict | None) -> bool:
    """Whether a row's worker trains LTE heads (None, or full_rank: the DDP worker)."""
    return opts is not None and not opts.get("full_rank")


def nbytes(tensors) -> int:
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


@contextlib.contextmanager
def fused_attention_on_meta():
    """On the meta device SDPA decomposes to the math path; count the fused kernel CPUs and GPUs run."""
    real = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if q.device.type != "meta":
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def account(spec: Spec, opts: dict | None, batch: int | None = None) -> dict:
    """Bytes of one training step's peak on the meta device (see the module docstring)."""
    meta = torch.device("meta")
    model, params = worker_model(spec, opts, meta)
    kept_inputs = checkpointed_inputs(model)  # activation checkpointing: what its blocks keep
    n = batch or spec.per_worker
    x, y = spec.batch(n, meta)
    chunks = (opts or {}).get("chunks", 1)
    plan = LocalChunks(model, chunks, params, None, meta) if chunks > 1 else None
    shared = [] if plan is None else plan.shared
    parts, previous, tap = [], None, []
    for c in range(chunks):
        if plan is None:
            resident_tensors = list(model.parameters()) + list(model.buffers())
            trained = params
            arrange = contextlib.nullcontext()
        else:
            modules = plan.resident_modules(c)
            resident_tensors = [t for m in modules for sub in m.modules()
                                for t in list(sub.parameters(recurse=False)) + list(sub.buffers(recurse=False))]
            resident_tensors += [t for m in shared for t in list(m.parameters(recurse=False))
                                 + [b for b in m.buffers(recurse=False)]]
            trained = plan.trained[c]
            tap = []
            arrange = plan.arranged(c, feed=previous if c > 0 else None, tap=tap)
        loss_fn = tasks.TrainingLoss.of(spec.task, model, LOGITS_CHUNK_MB)
        # backward inside the chunk's arrangement, as the trainer runs it: which tensors train must not
        # change between the forward and the loss chunks recomputed in backward
        with arrange, FlopCounterMode(display=False) as flops, fused_attention_on_meta():
            with SavedTensors(model, watch={}) as saved:
                with loss_fn.forward_mode():
                    outputs = model(x)
                loss = loss_fn(outputs, y)
            loss.backward()
        for p in params:
            p.grad = None
        if plan is not None and c < chunks - 1:
            previous = tap[0]
        state = nbytes(resident_tensors)
        moments = 2 * nbytes(trained)   # AdamW: exp_avg and exp_avg_sq, like the parameter
        grads = nbytes(trained)
        activations = saved.activation_bytes()
        del loss
        recomputed = nbytes(kept_inputs) + (largest_block(spec, opts, n) if kept_inputs else 0)
        kept_inputs.clear()
        parts.append(dict(state=state, moments=moments, grads=grads, saved=activations, recomputed=recomputed,
                          peak=state + moments + grads + activations + recomputed, flops=flops.get_total_flops()))
    worst = max(parts, key=lambda p: p["peak"])
    return {**worst, "chunks": parts if chunks > 1 else None, "trained_params": sum(p.numel() for p in params),
            "batch": n, "flops": sum(p["flops"] for p in parts)}


def checkpointed_inputs(model: nn.Module) -> list[torch.Tensor]:
    """A list that fills, during a forward, with the inputs of the model's checkpointed blocks: what
    they keep for backward (the saved-tensor hooks see none of it; the recomputation keeps its own)."""
    kept: list[torch.Tensor] = []
    if getattr(model, "_recomputed_blocks", 0):
        for block in find_blocks(model)[1]:
            if "forward" in block.__dict__:
                block.register_forward_pre_hook(lambda m, args: kept.append(args[0]))
    return kept


def largest_block(spec: Spec, opts: dict, n: int) -> int:
    """What the largest block keeps for backward without checkpointing: the activations one
    checkpointed block holds again while its own backward runs (one at a time)."""
    model, _ = worker_model(spec, {**opts, "recompute": 0}, torch.device("meta"))
    x, y = spec.batch(n, torch.device("meta"))
    blocks = dict(enumerate(find_blocks(model)[1]))
    with fused_attention_on_meta(), SavedTensors(model, watch={str(i): b for i, b in blocks.items()}) as saved:
        model(x)
    return max(saved.activation_bytes(str(i)) for i in blocks)


def plain_params(spec: Spec) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in spec.build().parameters())


# ---- real steps (timing; memory on a GPU) --------------------------------------------------------

class _Batches:
    def __init__(self, spec, n, device):
        self.xy = spec.batch(n, device)

    def get(self, step):
        return self.xy


class StepRunner:
    """What a worker does per step, without data loading: the Engine's step, or a chunked round."""

    def __init__(self, spec: Spec, opts: dict | None, device: torch.device, batch: int):
        self.spec, self.device = spec, device
        self.model, self.params = worker_model(spec, opts, device)
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.heads = spec.heads if heads_of(opts) else 1
        self.batches, self.step = _Batches(spec, batch, device), 0
        chunks = (opts or {}).get("chunks", 1)
        self.chunks = LocalChunks(self.model, chunks, self.params, self.opt, device) if chunks > 1 else None
        self.loss = tasks.TrainingLoss.of(spec.task, self.model, LOGITS_CHUNK_MB)
        self.step_function = TrainStep(self.model, self.loss, self.params, self.opt, heads=self.heads, grad_clip=1.0,
                                    device=device, precision="fp32")

    def step_on(self, x, y, step=None, advance=True):
        x, y = x.to(self.device), y.to(self.device)  # local chunks keep the round's batches in host memory
        loss = self.step_function(x, y, 1e-4)
        if advance:
            self.step += 1
        return loss

    def round(self, steps: int) -> None:
        if self.chunks is None:
            for _ in range(steps):
                self.step_on(*self.batches.get(self.step))
        else:
            for _ in self.chunks.round(self, steps):
                pass
        sync(self.device)


def time_rows(spec: Spec, device, batch: int, steps: int, repeats: int, ctx: int | None = None) -> dict:
    """Median seconds per step of each row (a round of `steps` steps, after one warm-up round);
    ctx: a shorter sequence for GPTs (a CPU cannot time 1024 tokens in reasonable time)."""
    if ctx is not None and spec.task == "language_model":
        real_batch = spec.batch
        spec = Spec(**{**spec.__dict__, "batch": lambda n, dev: tuple(t[:, :ctx] for t in real_batch(n, dev))})
    out = {}
    for label, opts in ROWS:
        runner = StepRunner(spec, opts, device, batch)
        runner.round(1)
        out[label] = statistics.median(step_times(lambda: runner.round(steps), device, repeats, warmup=0)) / steps
        runner = None  # freed before the next row builds its model (the lambda above holds the name)
    return out


def measure_cuda(spec: Spec, opts, device, batch: int) -> int:
    """The CUDA allocator's peak over a round of 2 steps, after a first step created the moments."""
    runner = StepRunner(spec, opts, device, batch)
    runner.round(1)
    torch.cuda.reset_peak_memory_stats(device)
    runner.round(2)
    peak = torch.cuda.max_memory_allocated(device)
    del runner
    torch.cuda.empty_cache()
    return peak


# ---- the cap search ------------------------------------------------------------------------------

def fits(spec: Spec, opts, device, cap: int, real: bool) -> bool:
    if not real:
        return account(spec, opts)["peak"] <= cap
    torch.cuda.empty_cache()
    try:
        measure_cuda(spec, opts, device, spec.per_worker)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def cap_search(cap: int, device, real: bool, dry: bool, deadline: float) -> dict:
    """The largest GPT of the family (sizes increase) that fits under `cap` as a DDP worker and as the
    leanest LTE worker; on a GPU, under torch.cuda.set_per_process_memory_fraction(cap / total)."""
    family = {"gpt-tiny": (64, 4, 4), "gpt-small": (128, 4, 4), "gpt-mid": (256, 8, 8)} if dry else GPT_FAMILY
    kw = dict(vocab=512, ctx=64, per_worker=2, rank=8) if dry else {}
    if real:
        index = torch.cuda.current_device() if device.index is None else device.index  # 'cuda' has none
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(index).total_memory, index)
    found = {}
    try:
        for who, opts in (("ddp", None), ("lte", LEANEST)):
            best, tried = None, []
            for name, shape in family.items():
                if time.perf_counter() > deadline:
                    tried.append(f"{name}: not tried (time limit)")
                    break
                spec = gpt_spec(name, *shape, **kw)
                if not fits(spec, opts, device, cap, real):
                    tried.append(f"{name}: does not fit")
                    break  # the sizes only grow
                best = (name, plain_params(spec))
                tried.append(f"{name}: fits")
            found[who] = best
            found[who + "_tried"] = tried
    finally:
        if real:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
    return found


# ---- the simulated mode of configs/gpt2_tinystories.yaml ---------------------------------------

SIMULATED = [("replicated embeddings (today's default)", dict(base="nf4")),
             ("LTE embeddings (lte.embeddings=lte)", dict(base="nf4", embeddings="lte")),
             ("LTE embeddings + activation checkpointing", dict(base="nf4", embeddings="lte", recompute=1))]
STEP_WINDOWS = 512  # configs/gpt2_tinystories.yaml's windows a step


def simulated(dry: bool, gpu_bytes: int = 80 * 2**30) -> dict:
    """One process holding all 32 heads of gpt2_tinystories (mode=lte): the fixed part (base, every head's
    trained tensors, their gradients and moments) and the activations per window of 1024 tokens, so the
    windows a step can hold on one GPU of `gpu_bytes`, and the micro-batches (train.grad_accum_steps) its 512
    windows a step then need: the fewest that divides each head's 16 windows and fits."""
    spec = (gpt_spec("gpt-tiny", 64, 4, 4, vocab=512, ctx=64, heads=4, per_worker=4, rank=8) if dry else
            gpt_spec("gpt2-124m", *GPT_FAMILY["gpt2-124m"], heads=32, per_worker=32))
    out = {"heads": spec.heads, "gpu_bytes": gpu_bytes, "rows": {}}
    for label, opts in SIMULATED:
        acc = account(spec, opts)
        fixed = acc["state"] + acc["moments"] + acc["grads"]
        per_window = (acc["saved"] + acc["recomputed"]) / acc["batch"]
        fit = max(0, int((gpu_bytes - fixed) // per_window))
        per_head = STEP_WINDOWS // spec.heads
        micro = next((k for k in range(1, per_head + 1) if per_head % k == 0 and STEP_WINDOWS // k <= fit), None)
        out["rows"][label] = {**acc, "fixed": fixed, "saved_per_window": per_window, "windows_that_fit": fit,
                              "grad_accum_steps": micro}
    return out


def simulated_table(sim: dict) -> str:
    lines = [f"\nSimulated mode, {sim['heads']} heads in one process (fp32 accounting; one GPU of "
             f"{sim['gpu_bytes'] / 2**30:g} GiB):",
             "| embeddings | base + heads + grads + moments (MiB) | saved per window (MiB) "
             f"| windows per step that fit | train.grad_accum_steps for {STEP_WINDOWS} windows |",
             "|---|---|---|---|---|"]
    for label, r in sim["rows"].items():
        lines.append(f"| {label} | {mb(r['fixed'])} | {mb(r['saved_per_window'])} | {r['windows_that_fit']} "
                     f"| {r['grad_accum_steps'] or 'does not fit'} |")
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------

def mb(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="the JSON to write (default: benchmarks/results/)")
    parser.add_argument("--time-limit-s", type=float, default=270,
                        help="the cap search tries no larger model after this many seconds of the run")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, seconds")
    parser.add_argument("--cap-gib", type=float, default=None,
                        help="memory cap of the model-size search (default: 16 GiB; dry run 64 MiB)")
    parser.add_argument("--time-batch", type=int, default=None,
                        help="per-worker samples of the timed steps (default: the accounting batch on a GPU, "
                             "1 on a CPU)")
    parser.add_argument("--time-ctx", type=int, default=None,
                        help="tokens per sequence of the timed GPT steps (default: the full context on a GPU, "
                             "128 on a CPU)")
    parser.add_argument("--time-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    cap = int((args.cap_gib if args.cap_gib is not None else (1 / 16 if args.dry_run else 16)) * 2**30)
    result = {"machine": machine(device), "cap_bytes": cap, "models": {}}

    for spec in specs(args.dry_run):
        rows = {}
        for label, opts in ROWS:
            acc = account(spec, opts)
            if device.type == "cuda":
                acc["cuda_peak"] = measure_cuda(spec, opts, device, spec.per_worker)
            rows[label] = acc
        timing, ctx = {}, None
        if not args.no_timing:
            tb = args.time_batch or (spec.per_worker if device.type == "cuda" else 1)
            ctx = args.time_ctx or (None if device.type == "cuda" or args.dry_run else 128)
            steps, repeats = (1, 1) if args.dry_run else (args.time_steps, args.repeats)
            timing = time_rows(spec, device, tb, steps, repeats, ctx)
        result["models"][spec.name] = {"per_worker_batch": spec.per_worker, "heads": spec.heads, "rank": spec.rank,
                                       "velora_subtoken": spec.velora_m, "params": plain_params(spec), "rows": rows,
                                       "step_s": timing, "time_batch": args.time_batch or (
                                           spec.per_worker if device.type == "cuda" else 1),
                                       "time_ctx": ctx if timing and spec.task == "language_model" else None}
        print(table(spec, rows, timing, device))

    result["simulated"] = simulated(args.dry_run)
    print(simulated_table(result["simulated"]))

    found = cap_search(cap, device, device.type == "cuda", args.dry_run, started + args.time_limit_s)
    result["cap_search"] = found
    ratio = found["lte"][1] / found["ddp"][1] if found["ddp"] and found["lte"] else None
    result["cap_ratio"] = ratio
    print(f"\nUnder a cap of {cap / 2**30:g} GiB ({'measured' if device.type == 'cuda' else 'accounted'}): "
          f"largest GPT as a DDP worker {found['ddp']}, as the leanest LTE worker ({ROWS[-3][0]}) {found['lte']}"
          + (f": {ratio:.1f}x the parameters" if ratio else ""))
    out = args.out or RESULTS / f"memory{'-dry' if args.dry_run else ''}-{device.type}.json"
    print(f"wrote {write_json(out, result)}")


def table(spec: Spec, rows: dict, timing: dict, device) -> str:
    ddp = rows[ROWS[0][0]]["peak"]
    lines = [f"\n{spec.name}: {plain_params(spec) / 1e6:.1f}M parameters, {spec.per_worker} samples per worker, "
             f"{spec.heads} head(s) of rank {spec.rank}, VeLoRA M={spec.velora_m}",
             "| worker | state + moments + grads (MiB) | saved for backward (MiB) | peak (MiB) | vs DDP |"
             + (" CUDA peak (MiB) |" if device.type == "cuda" else "") + " step FLOPs vs LTE nf4 |"
             + (" step time vs LTE nf4 |" if timing else ""),
             "|---|---|---|---|---|---|" + ("---|" if device.type == "cuda" else "") + ("---|" if timing else "")]
    for label, r in rows.items():
        cells = [label, mb(r["state"] + r["moments"] + r["grads"]), mb(r["saved"] + r["recomputed"]), mb(r["peak"]),
                 f"{r['peak'] / ddp:.2f}"]
        if device.type == "cuda":
            cells.append(mb(r["cuda_peak"]))
        cells.append(f"{r['flops'] / rows[BASELINE]['flops']:.2f}")
        if timing:
            cells.append(f"{timing[label] / timing[BASELINE]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
