"""The LTE math: the layer, its initialisation, the merge algebra and the injection API."""
from .config import LTEConfig
from .init import named_generator
from .lean import materialize, params_on_meta, seeded_base, unfilled
from .linear import BaseCopies, LinearType, LTELinear, LTEPatchConv, precast, precasting, register_linear
from .algebra import MergeSpec, lora_delta, merge_into
from .outer import OuterOptimizer
from .overlap import OverlappedMerge, CarriedRound
from .optim import HeadOptimizer, clip_grad_norm_per_head_, cosine_with_warmup, head_grad_norms
from .inject import (MERGES_KEY, clear_optimizer_state, export, finish_merge, head_state, is_prepared, load_merged,
                      lte_layers, master_state, merge, merges_done, option_state, plan, prepare, reset_heads,
                      restart_heads, set_merges_done, state_of, trained_keys)

__all__ = ["LTEConfig", "named_generator",
           "materialize", "params_on_meta", "seeded_base", "unfilled", "LinearType", "LTELinear",
           "LTEPatchConv", "BaseCopies", "precast", "precasting", "register_linear", "MergeSpec", "lora_delta",
           "merge_into", "OuterOptimizer",
           "OverlappedMerge", "CarriedRound", "HeadOptimizer", "clip_grad_norm_per_head_",
           "cosine_with_warmup", "head_grad_norms", "MERGES_KEY", "clear_optimizer_state", "export", "finish_merge",
           "head_state", "is_prepared", "load_merged", "lte_layers", "master_state", "merge", "merges_done",
           "option_state", "plan", "prepare", "reset_heads", "restart_heads", "set_merges_done", "state_of",
           "trained_keys"]
