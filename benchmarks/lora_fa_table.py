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
import dataclasses

import torch
from torch import nn

from common import RESULTS, write_json
import lte

ROWS = [(8, "trained"), (8, "kept"), (2, "kept"), (2, "redrawn"), (8, "redrawn")]
LABEL = {"trained": "A trained, kept (LTE default)", "kept": "A frozen, kept across merges",
         "redrawn": "A frozen, re-drawn at every merge (lora_fa)"}
COLUMNS = [5, 100, 0]


def target() -> tuple[torch.Generator, torch.Tensor]:
    """The full-rank 32x32 target W*, and the generator that goes on to draw the inputs."""
    g = torch.Generator().manual_seed(123)
    return g, torch.randn(32, 32, generator=g) / 32 ** 0.5


def error_curve(cfg: lte.LTEConfig, merge_every: int, steps: int, batch: int = 256, a: str = "trained") -> list[float]:
    """The relative error of the merged weight W + (s/N) sum_h B_h A_h after every step of fitting
    W* with cfg's heads from a zero base (merge_every 0: never merged); `a`: the heads' A trained,
    frozen and kept, or frozen and re-drawn at every merge (LoRA-FA)."""
    g, w_star = target()
    linear = nn.Linear(32, 32, bias=False)
    nn.init.zeros_(linear.weight)  # the base weight starts at zero, as in the paper
    model = lte.prepare(linear, dataclasses.replace(cfg, activations="lora_fa" if a == "redrawn" else "full"))
    if a == "kept":
        model.lora_A.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    errors = []
    for step in range(steps):
        x = torch.randn(batch, 32, generator=g)  # x ~ N(0, I), fresh every step
        loss = ((model(x) - x @ w_star.T) ** 2).mean() * cfg.heads  # the sum of the heads' mean losses
        opt.zero_grad()
        loss.backward()
        opt.step()
        if merge_every and (step + 1) % merge_every == 0:
            lte.merge(model, opt)
        with torch.no_grad():
            A, B = model.factors()
            merged = model.weight + (model.scale / cfg.heads) * torch.einsum("hor,hri->oi", B, A)
            errors.append(((merged - w_star).norm() / w_star.norm()).item())
    return errors


def relative_error(heads: int, a: str, merge_every: int, steps: int) -> float:
    """One cell of the table: the error after `steps` steps of rank-4 heads, alpha 8."""
    return error_curve(lte.LTEConfig(heads=heads, rank=4, alpha=8), merge_every, steps, a=a)[-1]


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
    write_json(RESULTS / "lora_fa_table.json", {"steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
