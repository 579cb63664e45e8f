"""The messages of the parameter-server protocol, derived from the model alone.

Per round (lte.merge_every steps):
  upload    worker -> server  every local head's factors (A, B; the last-merge snapshot for
                              reset="none") and replica copies, fp32, plus round statistics;
                              with comm.upload below fp32, in that codec (lte.core.upload), the
                              replicas as their change since the merge.
                              Never the dense B A. A LoRA-FA worker leaves A out: its A is draw
                              `merges` of (seed, layer, head), which the server re-draws itself.
  download  server -> workers the new base in the worker's storage format (packed nf4/fp4 bytes
                              and block scales, int8 and row scales, or bf16/fp32), the merged
                              replicas, and which workers' heads were accepted. Encoded once per
                              format and sent to the workers that store that format.
At a checkpoint round the workers also upload their state (heads after the reset, optimizer
moments, VeLoRA vectors, RNG); after a restart the server scatters it back. Workers may differ
(worker.per_rank), so there is one Protocol per worker; every process builds all of them from the
same config (`worker_protocols`), so only bytes travel and everyone knows every message's size.
"""
from __future__ import annotations

import hashlib

import torch

from ..core import lte_layers
from ..core.init import init_lora_A
from ..core.algebra import HEADS_SUFFIX, MergeSpec, key
from ..core.upload import CODECS, UploadCodec, Uploader, as_changes, as_values
from ..memory import Activations, BaseFormat
from .comm import Layout

STATS = ("loss", "compute_s")  # what each worker reports about its round
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state of a trained tensor, shaped like it (and its "step" count)


def head_shapes(spec: MergeSpec, master_shapes: dict[str, tuple[int, ...]], heads: int, rank: int) -> dict:
    """Shapes of a worker's per-head tensors (heads on dim 0), by state_dict key."""
    shapes = {}
    for layer in spec.layers:
        out, d_in = spec.matrix_shape(layer, master_shapes[key(layer, "weight")])
        shapes[key(layer, "lora_A")] = (heads, rank, d_in)
        shapes[key(layer, "lora_B")] = (heads, out, rank)
        if spec.resetless:
            shapes[key(layer, "lora_A0")] = (heads, rank, d_in)
            shapes[key(layer, "lora_B0")] = (heads, out, rank)
    for name in spec.replicas:
        shapes[name + HEADS_SUFFIX] = (heads, *master_shapes[name])
    return shapes


class Protocol:
    """The messages of one worker, from its options: `activations` (an A it does not train is not
    uploaded, and the server re-draws it; the option's layer buffers are part of its checkpoint
    state) and `chunks` (local chunks, whose per-chunk losses ride along with the round statistics)."""

    def __init__(self, spec: MergeSpec, master_shapes: dict[str, tuple[int, ...]], *, local_heads: int,
                 rank: int, fmt: BaseFormat, workers: int, activations: Activations, chunks: int = 1,
                 codec: UploadCodec = CODECS["fp32"], overlap: bool = False):
        self.spec, self.fmt, self.chunks, self.codec = spec, fmt, chunks, codec
        # replicas travel as their change from the base the worker holds: a compressed change spends
        # its codes on what moved, and with comm.overlap the server adds it to a master a merge ahead
        self.changes = codec.lossy or overlap
        self.heads = head_shapes(spec, master_shapes, local_heads, rank)
        self.layer_shapes = {layer: spec.matrix_shape(layer, master_shapes[key(layer, "weight")])
                             for layer in spec.layers}
        frozen_A = not activations.trains_A
        self.redrawn = {key(layer, "lora_A"): layer for layer in spec.layers} if frozen_A else {}
        self.uploaded = [k for k in self.heads if k not in self.redrawn]
        self.trained = spec.trained_keys(frozen_A)
        self.stats_size = len(STATS) + (chunks if chunks > 1 else 0)  # then each chunk's mean loss
        self.upload = Layout([(_part_key(k, part), shape, dtype) for k in self.uploaded
                              for part, (shape, dtype) in codec.layout(self.heads[k]).items()]
                             + [("stats", (self.stats_size,), torch.float64)])
        self.download = Layout(self._download_entries(master_shapes, workers))
        # the download's fp32 values (merged replicas; an fp32 base) as (byte offset, count): what a
        # lossy download strategy codes (lte.core.download)
        self.download_values = [(self.download.offsets[n][0], self.download.offsets[n][1] // 4)
                                for n, _, dtype in self.download.entries if dtype == torch.float32
                                and (n in spec.replicas or fmt.name == "fp32")]
        self.option_state = [(key(layer, name), shape) for layer in spec.layers
                             for name, shape in activations.layer_state(local_heads).items()]
        self.state = Layout(self._state_entries())

    def _download_entries(self, master_shapes, workers: int) -> list:
        entries = []
        for layer, shape in self.layer_shapes.items():
            for part, (pshape, dtype) in self.fmt.layout(shape).items():
                entries.append((_payload_key(layer, part), pshape, dtype))
        entries += [(name, master_shapes[name], torch.float32) for name in self.spec.replicas]
        entries.append(("accepted", (workers,), torch.int64))
        return entries

    def _state_entries(self) -> list:
        """A worker's checkpoint state: heads, AdamW moments and step of each trained tensor, the
        activations option's buffers, RNG and byte counters."""
        state = [(k, s, torch.float32) for k, s in self.heads.items()]
        for k in self.trained:
            state += [(f"{k}.{m}", self.heads[k], torch.float32) for m in MOMENTS] + [(f"{k}.step", (), torch.float32)]
        state += [(k, s, torch.float32) for k, s in self.option_state]
        if self.codec.lossy:  # the error-feedback residual of every uploaded tensor
            state += [(f"{k}.residual", self.heads[k], torch.float32) for k in self.uploaded]
        state.append(("rng", (torch.get_rng_state().numel(),), torch.uint8))
        state.append(("comm", (4,), torch.int64))  # the worker's byte counters (Exchange.snapshot)
        return state

    def optimizer_state(self, optimizer: torch.optim.Optimizer, heads: dict[str, torch.Tensor]
                        ) -> dict[str, torch.Tensor]:
        """The optimizer's state of every trained head tensor, named as in the state layout (zeros
        for a tensor not stepped yet)."""
        out = {}
        for k in self.trained:
            st = optimizer.state.get(heads[k], {})
            out.update({f"{k}.{m}": st.get(m, torch.zeros_like(heads[k])) for m in MOMENTS})
            out[f"{k}.step"] = torch.as_tensor(st.get("step", 0.0), dtype=torch.float32)
        return out

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, heads: dict[str, torch.Tensor],
                             views: dict[str, torch.Tensor]) -> None:
        """Install what optimizer_state gave (unpacked from a state message) back into the optimizer."""
        fused = bool(optimizer.defaults.get("fused"))  # fused AdamW keeps its step counts on the device
        for k in self.trained:
            p = heads[k]
            optimizer.state[p] = {"step": views[f"{k}.step"].clone().to(p.device if fused else "cpu"),
                                  **{m: views[f"{k}.{m}"].clone().to(p.device) for m in MOMENTS}}

    def encode_upload(self, heads: dict[str, torch.Tensor], replicas: dict[str, torch.Tensor],
                      uploader: Uploader) -> dict[str, torch.Tensor]:
        """A worker's uploaded tensors by their names in the upload layout: its heads' tensors in the
        codec, replicas as their change from the merged `replicas` (as they are, in plain fp32)."""
        if not self.changes:
            return {k: heads[k] for k in self.uploaded}
        changes = as_changes({k: heads[k] for k in self.uploaded}, replicas)
        return {_part_key(k, part): t for k in self.uploaded for part, t in uploader.encode(k, changes[k]).items()}

    def finite(self, upload: dict[str, torch.Tensor]) -> bool:
        """Whether every value of an unpacked upload (the round statistics aside) is finite."""
        return all(bool(torch.isfinite(t).all()) for name, t in upload.items()
                   if name != "stats" and t.is_floating_point())

    def factors(self, upload: dict[str, torch.Tensor], master: dict[str, torch.Tensor], *, seed: int,
                first_head: int, draw: int) -> dict:
        """A worker's head tensors as the merge takes them: its upload decoded (replicas from their
        change and the `master`), plus A re-drawn for LoRA-FA (the A it trained with this round:
        draw `draw` of every head, as lte.core.reset_heads drew it)."""
        if self.changes:
            out = as_values({k: self.codec.decode({part: upload[_part_key(k, part)]
                                                   for part in self.codec.layout(self.heads[k])}, self.heads[k])
                             for k in self.uploaded}, master)
        else:
            out = {k: upload[k] for k in self.uploaded}
        for k, layer in self.redrawn.items():
            out[k] = torch.empty(self.heads[k])
            init_lora_A(out[k], layer, seed, first_head, draw=draw)
        return out

    def encode_base(self, master: dict[str, torch.Tensor], accepted: torch.Tensor) -> torch.Tensor:
        """The download buffer: the base re-quantized from the fp32 master, merged replicas, accepted mask."""
        tensors = {"accepted": accepted.to(torch.int64)}
        for layer in self.layer_shapes:
            w = self.spec.matrix(layer, master[key(layer, "weight")].detach()).float().contiguous()
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
        out = {}
        for path, layer in lte_layers(model):
            for part, tensor in layer.payload().items():
                out[_payload_key(path, part)] = tensor
        sd = model.state_dict()
        out.update({name: sd[name] for name in self.spec.replicas})
        return out

    def layer_payload(self, views: dict[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
        return {part: views[_payload_key(layer, part)] for part in self.fmt.layout(self.layer_shapes[layer])}


def _payload_key(layer: str, part: str) -> str:
    return key(layer, "weight" + (f"_{part}" if part else ""))


def _part_key(name: str, part: str) -> str:
    return f"{name}.{part}" if part else name


def worker_protocols(cfg, spec: MergeSpec, master_shapes: dict[str, tuple[int, ...]], workers: int) -> list[Protocol]:
    """One Protocol per worker (rank w+1 at index w), from its worker.* options."""
    out = []
    for w in range(workers):
        heads_cfg = cfg.lte_config(w + 1)
        out.append(Protocol(spec, master_shapes, local_heads=cfg.worker.heads, rank=cfg.lte.rank,
                            fmt=heads_cfg.base_format(), workers=workers, activations=heads_cfg.activation_option,
                            chunks=cfg.worker_options(w + 1).chunks, codec=cfg.comm.codec(),
                            overlap=cfg.comm.overlap))
    return out


def format_groups(protos: list[Protocol]) -> tuple[list[str], list[list[int]]]:
    """The distinct base formats of the workers, and the worker ranks that store each."""
    names = sorted({p.fmt.name for p in protos})
    return names, [[w + 1 for w, p in enumerate(protos) if p.fmt.name == name] for name in names]
