"""How to run N heads at once in one LTE linear: explicit batched matmuls (what LTELinear does)
against torch.func.vmap over a per-head function. Forward + backward, median over repeats.

    python benchmarks/lte_layer.py [--device cuda] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from common import step_times, write_json
from lte.core.linear import LTELinear

SHAPES = {  # name: (batch, tokens, d_in, d_out, heads, rank)
    "digits-vit fc1": (64, 17, 64, 128, 4, 8),
    "vit-s/32 qkv": (1024, 50, 384, 1152, 32, 64),
    "vit-s/32 fc2": (1024, 50, 1536, 384, 32, 64),
}


def vmap_forward(x, W, A, B, scale):
    n = A.shape[0]
    base = F.linear(x, W)
    per_head = torch.func.vmap(lambda xh, a, b: F.linear(F.linear(xh, a), b))
    lora = per_head(x.reshape(n, -1, x.shape[-1]), A, B)
    return base + scale * lora.reshape(base.shape)


def time_fn(fn, device, repeats):
    return statistics.median(step_times(fn, device, repeats, warmup=3))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shapes", nargs="*", default=None, help=f"subset of {list(SHAPES)}")
    parser.add_argument("--out", default="benchmarks/results/lte_layer.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    names = args.shapes or (list(SHAPES) if device.type == "cuda" else ["digits-vit fc1", "vit-s/32 qkv"])
    rows = []
    for name in names:
        b, t, d_in, d_out, heads, rank = SHAPES[name]
        if device.type == "cpu" and b * t > 20000:
            b = 20000 // t // heads * heads  # keep CPU runs short
        layer = LTELinear(torch.randn(d_out, d_in) / d_in ** 0.5, None, heads=heads, rank=rank, scale=2.0,
                          train_bias=False, resetless=False).to(device, dtype)
        with torch.no_grad():
            layer.lora_A.normal_(0, d_in ** -0.5)
            layer.lora_B.normal_(0, 0.01)
        x = torch.randn(b, t, d_in, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(b, t, d_out, device=device, dtype=dtype)

        def explicit():
            layer(x).backward(g)

        def vmapped():
            vmap_forward(x, layer.weight, layer.lora_A, layer.lora_B, layer.scale).backward(g)

        ref = vmap_forward(x, layer.weight, layer.lora_A, layer.lora_B, layer.scale)
        err = ((layer(x) - ref).norm() / ref.norm()).item()  # same function, both ways
        t_exp, t_vmap = time_fn(explicit, device, args.repeats), time_fn(vmapped, device, args.repeats)
        rows.append({"shape": name, "batch": b, "tokens": t, "d_in": d_in, "d_out": d_out, "heads": heads,
                     "rank": rank, "explicit_ms": 1e3 * t_exp, "vmap_ms": 1e3 * t_vmap, "rel_diff": err})
    write_json(args.out, {"device": str(device), "dtype": args.dtype, "torch": torch.__version__, "rows": rows})
    print(f"LTE linear forward+backward on {device} ({args.dtype}), median of {args.repeats}")
    print(f"{'shape':<16} {'batch':>6} {'explicit ms':>12} {'vmap ms':>9} {'vmap/explicit':>14}")
    for r in rows:
        print(f"{r['shape']:<16} {r['batch']:>6} {r['explicit_ms']:>12.2f} {r['vmap_ms']:>9.2f} "
              f"{r['vmap_ms'] / r['explicit_ms']:>14.2f}")


if __name__ == "__main__":
    main()
