"""Why LoRA-FA must re-draw A at every merge in LTE: the least-squares setting of the LTE paper
(Appendix A.2) through lte's public API.

A full-rank 32x32 target, rank-4 heads, alpha 8, Adam lr 1e-2, a batch of 256 split over the
heads, 3000 steps; the relative error of the merged W (lower is better), for heads whose A is
trained (LTE's default), frozen and kept (plain LoRA-FA), or frozen and re-drawn at every merge
(lte.LTEConfig(..., activations="lora_fa")).

    python benchmarks/lora_fa_table.py [--steps 3000]      # about a minute on one core
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import lte

ROWS = [(8, "trained"), (8, "kept"), (2, "kept"), (2, "redrawn"), (8, "redrawn")]
LABEL = {"trained": "A trained, kept (LTE default)", "kept": "A frozen, kept across merges",
         "redrawn": "A frozen, re-drawn at every merge (lora_fa)"}
COLUMNS = [5, 100, 0]


def relative_error(heads: int, a: str, merge_every: int, steps: int) -> float:
    g = torch.Generator().manual_seed(123)
    w_star = torch.randn(32, 32, generator=g) / 32 ** 0.5
    linear = nn.Linear(32, 32, bias=False)
    nn.init.zeros_(linear.weight)
    model = lte.prepare(linear, lte.LTEConfig(heads=heads, rank=4, alpha=8,
                                              activations="lora_fa" if a == "redrawn" else "full"))
    if a == "kept":
        model.lora_A.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        x = torch.randn(256, 32, generator=g)
        loss = ((model(x) - x @ w_star.T) ** 2).mean() * heads
        opt.zero_grad()
        loss.backward()
        opt.step()
        if merge_every and (step + 1) % merge_every == 0:
            lte.merge(model, opt)
    with torch.no_grad():
        A, B = model.factors()
        merged = model.weight + (model.scale / heads) * torch.einsum("hor,hri->oi", B, A)
        return ((merged - w_star).norm() / w_star.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # 32x32 products: threads only add overhead
    rows = []
    print(f"| ({args.steps} steps) | merge every 5 | every 100 | never |\n|---|---|---|---|")
    for heads, a in ROWS:
        errors = [relative_error(heads, a, t, args.steps) for t in COLUMNS]
        rows.append({"heads": heads, "A": a, "errors": dict(zip(["5", "100", "never"], errors))})
        print(f"| {LABEL[a]}, {heads} heads | " + " | ".join(f"{e:.3f}" for e in errors) + " |", flush=True)
    out = Path(__file__).parent / "results" / "lora_fa_table.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
