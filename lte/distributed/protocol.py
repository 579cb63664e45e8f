"""The messages of the parameter-server protocol, derived from the model alone.

Per round (lte.merge_every steps):
  upload    worker -> server  every local head's factors (A, B; the last-merge snapshot for
                              reset="none") and replica copies, fp32, plus round statistics.
                              Never the dense B A.
  download  server -> all     the new base in the workers' storage format (packed nf4/fp4 bytes
                              and block scales, int8 and row scales, or bf16/fp32), the merged
                              replicas, and which workers' heads were accepted.
At a checkpoint round the workers also upload their state (heads after the reset, optimizer
moments, RNG); after a restart the server scatters it back. Both sides build these layouts from
the same config, so only bytes travel.
"""
from __future__ import annotations

import hashlib
import math

import torch

from ..core.merge import HEADS_SUFFIX, MergeSpec, key
from ..memory import BaseFormat
from .comm import Layout

STATS = ("loss", "compute_s")  # what each worker reports about its round


def head_shapes(spec: MergeSpec, master_shapes: dict[str, tuple[int, ...]], heads: int, rank: int) -> dict:
    """Shapes of a worker's per-head tensors (heads on dim 0), by state_dict key."""
    shapes = {}
    for layer in spec.layers:
        out, *rest = master_shapes[key(layer, "weight")]
        d_in = math.prod(rest)
        shapes[key(layer, "lora_A")] = (heads, rank, d_in)
        shapes[key(layer, "lora_B")] = (heads, out, rank)
        if spec.resetless:
            shapes[key(layer, "lora_A0")] = (heads, rank, d_in)
            shapes[key(layer, "lora_B0")] = (heads, out, rank)
    for name in spec.replicas:
        shapes[name + HEADS_SUFFIX] = (heads, *master_shapes[name])
    return shapes


class Protocol:
    def __init__(self, spec: MergeSpec, master_shapes: dict[str, tuple[int, ...]], *, local_heads: int,
                 rank: int, fmt: BaseFormat, workers: int, trained: list[str]):
        self.spec, self.fmt = spec, fmt
        self.heads = head_shapes(spec, master_shapes, local_heads, rank)
        self.layer_shapes = {layer: _as_matrix(master_shapes[key(layer, "weight")]) for layer in spec.layers}
        self.upload = Layout([(k, s, torch.float32) for k, s in self.heads.items()]
                             + [("stats", (len(STATS),), torch.float64)])
        entries = []
        for layer, shape in self.layer_shapes.items():
            for part, (pshape, dtype) in fmt.layout(shape).items():
                entries.append((_payload_key(layer, part), pshape, dtype))
        entries += [(name, master_shapes[name], torch.float32) for name in spec.replicas]
        entries.append(("accepted", (workers,), torch.int64))
        self.download = Layout(entries)
        # checkpoint state of one worker: heads, AdamW moments and step of each trained tensor, RNG
        state = [(k, s, torch.float32) for k, s in self.heads.items()]
        for k in trained:
            state += [(f"{k}.exp_avg", self.heads[k], torch.float32), (f"{k}.exp_avg_sq", self.heads[k], torch.float32),
                      (f"{k}.step", (), torch.float32)]
        state.append(("rng", (torch.get_rng_state().numel(),), torch.uint8))
        state.append(("comm", (4,), torch.int64))  # the worker's byte counters (Exchange.snapshot)
        self.state = Layout(state)
        self.trained = trained

    def encode_base(self, master: dict[str, torch.Tensor], accepted: torch.Tensor) -> torch.Tensor:
        """The download buffer: the base re-quantized from the fp32 master, merged replicas, accepted mask."""
        tensors = {"accepted": accepted.to(torch.int64)}
        for layer, shape in self.layer_shapes.items():
            w = master[key(layer, "weight")].detach().reshape(shape).float()
            for part, value in self.fmt.encode(w).items():
                tensors[_payload_key(layer, part)] = value.cpu()
        for name in self.spec.replicas:
            tensors[name] = master[name].detach().float().cpu()
        return self.download.pack(tensors)

    def base_digest(self, tensors: dict[str, torch.Tensor]) -> int:
        """A 63-bit digest of a base (layer payloads and merged replicas, keyed as in the download),
        so the server can check at the end that every worker holds exactly what it sent."""
        h = hashlib.blake2b(digest_size=8)
        for name in self.download.names():
            if name != "accepted":
                h.update(tensors[name].detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)

    def worker_base(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A prepared model's installed base, keyed as in the download."""
        from .. import core

        out = {}
        for path, layer in core.lte_layers(model):
            for part, tensor in layer.payload().items():
                out[_payload_key(path, part)] = tensor
        sd = model.state_dict()
        out.update({name: sd[name] for name in self.spec.replicas})
        return out

    def layer_payload(self, views: dict[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        return {part: views[_payload_key(layer, part)] for part in self.fmt.layout(self.layer_shapes[layer])}


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:]))


def _payload_key(layer: str, part: str) -> str:
    return key(layer, "weight" + (f"_{part}" if part else ""))
