"""What one training step costs, full-rank against simulated LTE heads, counted rather than timed
(so a CPU can settle most of it): aten ops (the whole step, and the update apart: clipping, the
optimizer, zeroing the gradients), bytes written by those ops, FLOPs, the kernels of the compiled
step (inductor's generated code) with the bytes its kernels read and write (inductor's estimate, per
graph node: a fused kernel or a library call) and the activation memory autograd keeps; on a GPU also the step
time, eager and compiled, and the profiler's summed kernel time against the wall time.

    python benchmarks/step_cost.py                       # ViT-S/32 and a small GPT on this CPU
    python benchmarks/step_cost.py --device cuda         # and the times (ViT-S/32 batch 1024, gpt2)

Counts come from one eager step after a warm-up step, under a TorchDispatchMode (views are not
counted; an in-place op counts its output). Bytes and FLOPs grow with the batch linearly, and so do
a language model's ops (its loss runs the logits in chunks, more of them at a larger batch), so they
are measured at two batches and extrapolated to the report batch (other ops as measured; the
compiled step's bytes likewise, its kernels as compiled at the smaller batch), every
LTE layer running its heads' product the way "auto" picks it at the report batch (LTELinear.merges:
the choice depends on the rows a head). Inputs are random: a step's cost does not depend on their
values. Writes JSON and a markdown table.
"""
from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from common import machine, sync, write_json
import lte
from lte.memory.accounting import SavedTensors
from lte.models import create_model
from lte.runtime.config import COMPILE_MODES
from lte.runtime.engine import TrainStep, adamw
from lte.runtime.tasks import TrainingLoss

MODELS = {
    # the vision setup: ViT-S/32 at 224 px, 32 heads of rank 64, bf16
    "vit_s32": dict(name="vit_small_patch32_224", args=dict(img_size=224, num_classes=1000), task="classification",
                    heads=32, rank=64, alpha=4096, batches=(32, 64), report_batch=1024, gpu_batch=1024),
    # a GPT at the GPU configs' heads and rank, small enough for this CPU (gpt2 itself with --device cuda)
    "gpt_small": dict(name="gpt", args=dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192),
                      task="language_model", heads=32, rank=64, alpha=4096, batches=(32, 64), report_batch=512,
                      gpu_batch=512),
    # tiny, for the GPU suite's dry run on a CPU
    "vit_tiny": dict(name="vit_tiny_patch16_224", args=dict(img_size=32, patch_size=8, depth=2, num_classes=10),
                     task="classification", heads=4, rank=4, alpha=8, batches=(8, 16), report_batch=64, gpu_batch=64),
    "gpt2": dict(name="gpt2", args=dict(block_size=1024), task="language_model", heads=32, rank=64, alpha=4096,
                 batches=(32, 64), report_batch=512, gpu_batch=64),
}


# torch's FLOP counter knows addmm and baddbmm, not their in-place forms (which the LTE layer uses)
IN_PLACE_GEMMS = {torch.ops.aten.addmm_: lambda _, a, b, *args, **kw: flop_counter.mm_flop(a, b),
                  torch.ops.aten.baddbmm_: lambda _, a, b, *args, **kw: flop_counter.bmm_flop(a, b)}


def _writes(func, args, outs: list[torch.Tensor]) -> bool:
    """Whether an op writes its outputs: not a view its schema declares, nor one it does not (aten's
    _unsafe_view, reshape's second half after the clone, hands back storage it was given)."""
    aliases = [r.alias_info for r in func._schema.returns if r.alias_info is not None]
    if aliases:
        return all(a.is_write for a in aliases)  # in place, else a declared view
    given = {t.untyped_storage().data_ptr() for t in _tensors(args)}
    return not outs or not all(t.untyped_storage().data_ptr() in given for t in outs)


class OpCounter(TorchDispatchMode):
    """Every aten op run inside it that writes its outputs (`_writes`), and the bytes they hold, by phase."""

    def __init__(self):
        super().__init__()
        self.phase = "step"
        self.ops: Counter = Counter()
        self.bytes: Counter = Counter()
        self.names: Counter = Counter()
        self.bytes_by_name: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = list(_tensors(out if isinstance(out, (tuple, list)) else [out]))
        if _writes(func, args, outs):
            self.ops[self.phase] += 1
            self.names[func.overloadpacket.__name__] += 1
            written = sum(t.numel() * t.element_size() for t in outs)
            self.bytes[self.phase] += written
            self.bytes_by_name[func.overloadpacket.__name__] += written
        return out


def _tensors(items):
    for t in items:
        if isinstance(t, torch.Tensor):
            yield t
        elif isinstance(t, (tuple, list)):
            yield from _tensors(t)


@dataclass
class Setup:
    step: TrainStep
    x: torch.Tensor
    y: torch.Tensor
    model: torch.nn.Module


def build(spec: dict, mode: str, batch: int, device: torch.device, precision: str, compile_mode: str | None,
          paths_of: int | None = None) -> Setup:
    """The model, its optimizer and its step as the engine builds them (lte.runtime.engine), on random inputs;
    compiled in torch.compile's compile_mode (None: eager). `paths_of`: every LTE layer runs the heads'
    product the way "auto" would at that batch (LTELinear.merges), so that counts at a small batch
    extrapolate to that batch's."""
    torch.manual_seed(0)
    model = create_model(spec["name"], **spec["args"]).to(device)
    heads = 1
    if mode == "lte":
        lte.prepare(model, lte.LTEConfig(heads=spec["heads"], rank=spec["rank"], alpha=spec["alpha"]))
        heads = spec["heads"]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=1e-4, weight_decay=0.0, heads=mode == "lte")
    loss = TrainingLoss.of(spec["task"], model, 64.0)
    step = TrainStep(model, loss, params, optimizer, heads=heads, grad_clip=1.0, device=device, precision=precision,
                     compile=compile_mode is not None, compile_mode=compile_mode or "default")
    if spec["task"] == "language_model":
        block, vocab = spec["args"]["block_size"], spec["args"].get("vocab_size", 50304)
        x = torch.randint(0, vocab, (batch, block), device=device)
        y = torch.randint(0, vocab, (batch, block), device=device)
    else:
        size = spec["args"]["img_size"]
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, spec["args"]["num_classes"], (batch,), device=device)
    if mode == "lte" and paths_of is not None:
        fix_products(model, step, x, y, paths_of / batch)
    return Setup(step, x, y, model)


def fix_products(model: torch.nn.Module, step: TrainStep, x: torch.Tensor, y: torch.Tensor, growth: float) -> None:
    """Fix every LTE layer's products, forward and backward, to what "auto" picks at `growth` times this
    batch (LTELinear.merges, answered as at those rows a head whatever the batch): its rows a head
    grow with the batch, except a layer the step runs more than once (the language-model loss's output
    layer, on chunks of a fixed number of rows). The rows are those each layer's forward asks
    `merges` about (a pre-hook would also see the loss holding the output layer back)."""
    rows = {}
    layers = [layer for _, layer in lte.core.lte_layers(model)]
    for layer in layers:
        layer.merges = lambda n, layer=layer, decide=layer.merges: rows.setdefault(layer, []).append(n) or decide(n)
    with torch.no_grad():
        step.loss_of(x, y)
    for layer in layers:
        del layer.merges
    for layer, seen in rows.items():
        at = max(seen) if len(seen) > 1 else round(seen[0] * growth)
        decided = layer.merges(at)
        layer.merges = lambda n, decided=decided: decided  # as at `at` rows a head, whatever the batch


def counts(spec: dict, mode: str, batch: int, device: torch.device, precision: str) -> dict:
    """Ops, bytes and FLOPs of one eager step after a warm-up step, and the activations kept (the LTE
    layers on the report batch's paths)."""
    s = build(spec, mode, batch, device, precision, compile_mode=None, paths_of=spec["report_batch"])
    s.step(s.x, s.y, 1e-4)  # warm-up: the optimizer's state exists from here on
    counter = OpCounter()
    with counter:
        counter.phase = "forward_backward"
        s.step.forward_backward(s.x, s.y)
        counter.phase = "update"
        s.step.update(1e-4)
    flops = FlopCounterMode(display=False, custom_mapping=IN_PLACE_GEMMS)
    with flops:
        s.step.forward_backward(s.x, s.y)
    s.step.update(1e-4)
    with SavedTensors(s.model, watch={}) as saved:
        loss = s.step.loss_of(s.x, s.y)
    kept = saved.activation_bytes()
    del loss
    return {"ops": sum(counter.ops.values()), "ops_update": counter.ops["update"],
            "bytes_written": sum(counter.bytes.values()), "bytes_update": counter.bytes["update"],
            "flops": flops.get_total_flops(), "activation_bytes": kept,
            "trainable_tensors": len(s.step.params), "trainable_values": sum(p.numel() for p in s.step.params),
            "merged_layers": [sum(m.merges(0)[d] for _, m in lte.core.lte_layers(s.model)) for d in (0, 1)]
            if mode == "lte" else [0, 0],
            "top_ops": dict(counter.names.most_common(12)), "bytes_by_op": dict(counter.bytes_by_name)}


KERNEL = re.compile(r"^\w+ = async_compile\.(?:cpp_pybinding|cpp|triton)\(", re.M)  # one generated kernel each
EXTERN = re.compile(r"\b(extern_kernels\.\w+|aten\.\w+(?:\.\w+)?|torch\.ops\.aten\.\w+(?:\.\w+)?)\(")


# inductor sums its estimate of each graph's bytes (torch._inductor.metrics) only while this logger is on
INDUCTOR_METRICS_LOG = "torch._inductor.compile_fx.__inductor_metrics"


def compiled_kernels(spec: dict, mode: str, batch: int, device: torch.device, precision: str,
                     compile_mode: str) -> dict:
    """The kernels inductor generates for the compiled step (forward, backward and update), and the
    graph breaks: fused kernels it wrote, and the library calls (GEMMs, attention) it kept; and the
    bytes they read and write, as inductor estimates them (every buffer a node reads or writes, once)."""
    from torch._inductor import metrics
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    s = build(spec, mode, batch, device, precision, compile_mode, paths_of=spec["report_batch"])
    log = logging.getLogger(INDUCTOR_METRICS_LOG)
    level, quiet = log.level, logging.NullHandler()
    log.setLevel(logging.INFO)
    log.addHandler(quiet)  # its records are per-node lists: counted, not printed
    metrics.reset()
    try:
        with torch._inductor.config.patch(fx_graph_cache=False):  # a cached graph is not measured again
            _, code = run_and_get_code(lambda: s.step(s.x, s.y, 1e-4))
    finally:
        log.setLevel(level)
        log.removeHandler(quiet)
    bytes_accessed = metrics.num_bytes_accessed
    s.step(s.x, s.y, 2e-4)  # a second step at another learning rate: no new graph
    counters = torch._dynamo.utils.counters
    fused = sum(len(KERNEL.findall(c)) for c in code)
    calls = Counter(m for c in code for m in EXTERN.findall(c) if "empty" not in m and "reinterpret" not in m)
    return {"graphs": len(code), "fused_kernels": fused, "library_calls": sum(calls.values()),
            "kernels": fused + sum(calls.values()), "calls": dict(calls.most_common(8)),
            "bytes_accessed": bytes_accessed,
            "unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}


def timing(spec: dict, mode: str, batch: int, device: torch.device, precision: str, compile_mode: str | None,
           steps: int, warmup: int) -> dict:
    s = build(spec, mode, batch, device, precision, compile_mode)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        s.step(s.x, s.y, 1e-4)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"step_s_median": statistics.median(times), "step_s_min": min(times)}
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(3):
                s.step(s.x, s.y, 1e-4)
            sync(device)
            wall = (time.perf_counter() - t0) / 3
        kernel_us = sum(e.device_time_total for e in prof.key_averages() if e.device_time_total > 0 and e.count)
        out.update(profiled_wall_s=wall, kernel_s=kernel_us / 1e6 / 3)
    return out


def extrapolate(a: dict, b: dict, batch_a: int, batch_b: int, to: int, ops_grow: bool) -> dict:
    """Counts at batch `to` from two measurements, by the line through them; ops too where they grow
    with the batch (`ops_grow`: a language model's chunked loss runs more chunks at a larger batch),
    else as measured at the larger batch (a head's per-sample replicas are views at one sample a
    head, copies from two on)."""
    out = dict(b)
    for key in ("ops",) * ops_grow + ("bytes_written", "bytes_update", "flops", "activation_bytes"):
        slope = (b[key] - a[key]) / (batch_b - batch_a)
        out[key] = b[key] + slope * (to - batch_b)
    # which ops write the bytes at batch `to` (an op's line as above), the twelve largest
    line = {op: b["bytes_by_op"].get(op, 0) + (b["bytes_by_op"].get(op, 0) - a["bytes_by_op"].get(op, 0))
            / (batch_b - batch_a) * (to - batch_b) for op in a["bytes_by_op"].keys() | b["bytes_by_op"].keys()}
    out["bytes_by_op"] = dict(Counter(line).most_common(12))
    return out


def measure_model(name: str, spec: dict, args, device: torch.device) -> dict:
    result = {"model": name, "spec": {k: v for k, v in spec.items() if k != "args"}, "args": spec["args"]}
    (b1, b2), to = spec["batches"], spec["report_batch"]
    for mode in ("full", "lte"):
        print(f"[{name}] {mode}: counts at batches {b1}, {b2}", flush=True)
        at = {b: counts(spec, mode, b, device, args.precision) for b in (b1, b2)}
        row = {"at_batch": {str(b): v for b, v in at.items()},
               "extrapolated": extrapolate(at[b1], at[b2], b1, b2, to, spec["task"] == "language_model")}
        if not args.no_compile:
            # its bytes need a second compile, at b2: on a GPU the timings' compiles have the time
            at_batches = (b1, b2) if device.type == "cpu" else (b1,)
            print(f"[{name}] {mode}: the compiled step at batch {', '.join(map(str, at_batches))}", flush=True)
            c = [compiled_kernels(spec, mode, b, device, args.precision, args.compile_mode) for b in at_batches]
            row["compiled"] = {k: v for k, v in c[0].items() if k != "bytes_accessed"}
            if len(c) == 2:
                by_batch = [x["bytes_accessed"] for x in c]
                slope = (by_batch[1] - by_batch[0]) / (b2 - b1)
                row["compiled"].update(bytes_accessed_at_batch=dict(zip(map(str, at_batches), by_batch)),
                                       bytes_accessed=by_batch[1] + slope * (to - b2))
        if device.type == "cuda":
            for key, compile_mode in (("eager", None), ("compiled_timing", args.compile_mode)):
                row[key] = timing(spec, mode, spec["gpu_batch"], device, args.precision, compile_mode, args.steps,
                                  args.warmup)
        result[mode] = row
    return result


def ratio(lte_value, full_value) -> str:
    return f"{lte_value / full_value:.2f}x" if full_value and not isinstance(full_value, list) else "-"


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        full, lt = r["full"]["extrapolated"], r["lte"]["extrapolated"]
        to = r["spec"]["report_batch"]
        lines += [f"### {r['model']} ({r['spec']['name']}, {r['spec']['heads']} heads x r{r['spec']['rank']}, "
                  f"batch {to} by extrapolation)", "", "| per training step | full-rank | LTE | ratio |",
                  "|---|---|---|---|"]
        rows = [("aten ops (non-view), whole step", "ops", "{:,.0f}"),
                ("aten ops in the update (clip + optimizer + zero)", "ops_update", "{:,.0f}"),
                (f"bytes written by ops, batch {to}", "bytes_written", "{:,.0f}"),
                (f"FLOPs forward + backward, batch {to}", "flops", "{:,.0f}"),
                (f"activations kept for backward, batch {to}", "activation_bytes", "{:,.0f}"),
                ("trainable tensors", "trainable_tensors", "{:,}"), ("trainable values", "trainable_values", "{:,}"),
                (f"LTE layers on their heads' own weights at batch {to}, forward / backward", "merged_layers",
                 "{0[0]} / {0[1]}")]
        for label, key, fmt in rows:
            lines.append(f"| {label} | {fmt.format(full[key])} | {fmt.format(lt[key])} | {ratio(lt[key], full[key])} |")
        if "compiled" in r["full"]:
            f, lc = r["full"]["compiled"], r["lte"]["compiled"]
            lines.append(f"| compiled step's kernels (fused + library calls) | {f['fused_kernels']} + "
                         f"{f['library_calls']} | {lc['fused_kernels']} + {lc['library_calls']} | "
                         f"{ratio(lc['kernels'], f['kernels'])} |")
            if "bytes_accessed" in f:
                lines.append(f"| compiled step's bytes read + written (inductor's estimate), batch {to} | "
                             f"{f['bytes_accessed']:,.0f} | {lc['bytes_accessed']:,.0f} | "
                             f"{ratio(lc['bytes_accessed'], f['bytes_accessed'])} |")
            lines.append(f"| compiled graphs / graph breaks | {f['graphs']} / {f['graph_breaks']} | "
                         f"{lc['graphs']} / {lc['graph_breaks']} | |")
        for key, label in (("eager", "eager"), ("compiled_timing", "compiled")):
            if key in r["full"]:
                f, lc = r["full"][key], r["lte"][key]
                lines.append(f"| step time, {label} (median) | {f['step_s_median']:.4f} s | "
                             f"{lc['step_s_median']:.4f} s | {ratio(lc['step_s_median'], f['step_s_median'])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=None, help="comma-separated, from " + ", ".join(MODELS) +
                        " (default: vit_s32,gpt_small on a CPU, vit_s32,gpt2 on a GPU)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled step's kernel count")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile's mode for the compiled step (train.compile_mode)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (GPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/step_cost.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = (args.models or ("vit_s32,gpt2" if device.type == "cuda" else "vit_s32,gpt_small")).split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"step_cost: unknown model {unknown[0]!r}; known: {', '.join(MODELS)}")
    results = [measure_model(n, MODELS[n], args, device) for n in names]
    report = {"machine": machine(device), "precision": args.precision, "compile_mode": args.compile_mode,
              "results": results}
    path = write_json(args.out, report)
    text = table(results)
    path.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"-> {path}, {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
