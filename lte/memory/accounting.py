"""What autograd keeps for backward, measured with torch.autograd.graph.saved_tensors_hooks.

    with SavedTensors(model) as saved:
        loss = model(x).sum()
    saved.activation_bytes()          # bytes kept alive for backward, beyond the model's own tensors
    saved.by_module["blocks.0.attn.qkv"]   # what that LTE layer's forward saved

Each saved tensor is attributed to the innermost watched module whose forward saved it (by default
the modules that run an activation option: every LTE layer). Bytes are counted per storage, once:
a view saved twice, or a weight saved as its transpose, costs what its storage costs. Storages of
the model's parameters and buffers are counted apart (`state_bytes`): keeping a reference to a
weight costs nothing extra.
Works on the meta device too (shape-only accounting of models too large to run here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .activations import Activations


@dataclass
class Saved:
    module: str | None     # innermost watched module whose forward saved it (None: outside them)
    shape: tuple[int, ...]
    dtype: torch.dtype
    storage: int           # identity of the storage
    nbytes: int            # bytes of the storage
    state: bool            # the storage is one of the model's parameters or buffers


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    return t.untyped_storage()


class SavedTensors:
    def __init__(self, model: nn.Module, watch: dict[str, nn.Module] | None = None):
        if watch is None:  # the layers whose saved tensors an activation option decides
            watch = {p: m for p, m in model.named_modules() if isinstance(getattr(m, "activations", None), Activations)}
        self.model, self.watch = model, watch
        self.records: list[Saved] = []
        self._stack: list[str] = []
        self._handles = []
        self._outer = None
        self._inner: dict[str, object] = {}

    # recording --------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        st = _storage(t)
        self.records.append(Saved(self._stack[-1] if self._stack else None, tuple(t.shape), t.dtype, st._cdata,
                                  st.nbytes(), st._cdata in self._state))
        return t

    def __enter__(self) -> "SavedTensors":
        self._state = {_storage(t)._cdata for t in list(self.model.parameters()) + list(self.model.buffers())}
        for path, module in self.watch.items():
            self._handles.append(module.register_forward_pre_hook(self._enter_module(path)))
            self._handles.append(module.register_forward_hook(self._leave_module(path), always_call=True))
        self._outer = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._outer.__enter__()
        return self

    def _enter_module(self, path):
        def hook(module, args):
            self._stack.append(path)
        return hook

    def _leave_module(self, path):
        def hook(module, args, output):
            self._stack.pop()
        return hook

    def __exit__(self, *exc) -> None:
        self._outer.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # reading ----------------------------------------------------------------------------
    @property
    def by_module(self) -> dict[str | None, list[Saved]]:
        out: dict[str | None, list[Saved]] = {}
        for r in self.records:
            out.setdefault(r.module, []).append(r)
        return out

    @staticmethod
    def _distinct(records) -> dict[int, int]:
        return {r.storage: r.nbytes for r in records}

    def activation_bytes(self, module: str | None = "*") -> int:
        """Bytes of the distinct non-state storages saved (by one module, or "*": by anything)."""
        recs = [r for r in self.records if not r.state and (module == "*" or r.module == module)]
        return sum(self._distinct(recs).values())

    def state_bytes(self) -> int:
        return sum(self._distinct([r for r in self.records if r.state]).values())
