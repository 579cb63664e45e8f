"""LTE paper, Appendix A.2 / Figure 8: LoRA heads on least squares with a full-rank 32x32 target.

The target W* is full rank, so no single rank-4 head can reach it; only merging can. The error is
that of the merged weight W + (s/N) sum_h B_h A_h (for reset="none": minus the snapshot term).
"""
import sys
from pathlib import Path

import torch

import lte

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
# The benchmark's experiment, held to the independently measured table below.
from lora_fa_table import error_curve, relative_error, target  # noqa: E402

STEPS = 1500


def relative_error_curve(heads, reset, merge_every, steps=STEPS, rank=4, batch_per_head=64):
    assert torch.linalg.matrix_rank(target()[1]) == 32
    cfg = lte.LTEConfig(heads=heads, rank=rank, alpha=rank, reset=reset)
    return error_curve(cfg, merge_every, steps, batch=heads * batch_per_head)


def steps_to_reach(errors, level):
    return next((i for i, e in enumerate(errors) if e < level), len(errors))


def test_one_head_with_A_redrawn_needs_merging():
    no_merge = relative_error_curve(1, "ab", merge_every=0)
    merged = relative_error_curve(1, "ab", merge_every=50)
    # rank 4 of a full-rank 32x32 target: the error plateaus far from zero without merging
    assert min(no_merge[500:]) > 0.7
    assert abs(no_merge[-1] - no_merge[700]) < 0.02
    assert merged[-1] < 0.02


def test_lte_heads_reach_full_rank_target_and_frequent_merges_are_faster():
    every_10 = relative_error_curve(8, "b", merge_every=10)
    every_50 = relative_error_curve(8, "b", merge_every=50)
    never = relative_error_curve(8, "b", merge_every=0)
    assert every_10[-1] < 0.03
    assert every_50[-1] < 0.06
    assert min(never[500:]) > 0.7  # without merges, 8 rank-4 heads all chase the same top subspace
    assert steps_to_reach(every_10, 0.1) < steps_to_reach(every_50, 0.1)


def test_single_head_with_A_kept_stays_in_its_row_space():
    kept = relative_error_curve(1, "b", merge_every=10)
    assert min(kept) > 0.6


def test_resetless_lte_converges_too():
    assert relative_error_curve(8, "none", merge_every=10)[-1] < 0.03


def test_lora_fa_must_redraw_A_at_every_merge():
    """The 'merge every 5' column of the issue's table after 1500 of its 3000 steps (the whole table,
    through this API: python benchmarks/lora_fa_table.py, in docs/memory.md). Measured here at 1500 steps:
    A trained 8 heads 0.001, kept 8 heads 0.383, kept 2 heads 0.842, re-drawn 2 heads 0.066, re-drawn
    8 heads 0.129."""
    assert relative_error(8, "trained", 5, 1500) < 0.01
    kept_8, kept_2 = relative_error(8, "kept", 5, 1500), relative_error(2, "kept", 5, 1500)
    assert kept_2 > 0.8   # a kept frozen A: the weights only move inside the span of the 2 x 4 A rows
    assert kept_8 > 0.35
    assert relative_error(2, "redrawn", 5, 1500) < 0.1   # re-drawn at every merge, 2 heads reach any direction
    assert relative_error(8, "redrawn", 5, 1500) < 0.15
