"""Compressed uploads: what the merge receives of each head, in fewer bits, without bias over rounds.

A worker's upload is its heads' factors (A, B) and replicated parameters. With `comm.upload` below
fp32 each uploaded tensor is sent in blocks of BLOCK values, every block as integer codes times one
fp32 scale (its largest magnitude over the largest code: per-block absmax), or as bf16, and:

  * a replicated parameter is sent as its change since the last merge (copy - merged value, which
    both sides hold), not its value: a change is small, so its codes spend their range on it;
  * error feedback: what quantisation dropped from a tensor is added to that tensor before it is
    quantised at the next upload (x + e is sent as q; e <- x + e - decode(q)), so over many rounds
    the merge receives what the heads trained, not a biased version of it. A is trained slowly and
    kept across merges (reset "b"), so its error would otherwise repeat round after round.

The codes are a pure function of the tensor (round to nearest, ties to even), so a simulated run
(which encodes and decodes each head's tensors in place of sending them) and a parameter-server run
merge the same values. lte.core.algebra takes the decoded tensors as it takes fp32 ones.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .algebra import HEADS_SUFFIX

BLOCK = 64  # values per scale: 0.5 bit of fp32 scale per value


class UploadCodec:
    """How one uploaded tensor (heads on dim 0) travels: `layout` (the parts of the message, by shape
    and dtype), `encode` (fp32 -> parts), `decode` (parts -> fp32)."""

    name = "fp32"
    lossy = False

    def layout(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"": (shape, torch.float32)}

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"": x.float()}

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return parts[""].float().reshape(shape)

    def describe(self) -> str:
        return f"uploads in {self.name}" if self.lossy else ""


class Bf16Codec(UploadCodec):
    name, lossy = "bf16", True

    def layout(self, shape):
        return {"": (shape, torch.bfloat16)}

    def encode(self, x):
        return {"": x.to(torch.bfloat16)}


class BlockIntCodec(UploadCodec):
    """Symmetric integer codes of `bits` bits in blocks of BLOCK values per head, one fp32 scale a
    block; 4-bit codes are packed two to a byte."""

    lossy = True

    def __init__(self, bits: int):
        self.bits, self.name = bits, f"int{bits}"
        self.qmax = 2 ** (bits - 1) - 1  # symmetric: int8 in [-127, 127], int4 in [-7, 7]

    def blocks(self, shape) -> tuple[int, int]:
        heads, n = shape[0], math.prod(shape[1:])
        return heads, -(-n // BLOCK)

    def layout(self, shape):
        heads, nb = self.blocks(shape)
        codes = (heads, nb * BLOCK) if self.bits == 8 else (heads, nb * BLOCK // 2)
        return {"codes": (codes, torch.int8 if self.bits == 8 else torch.uint8), "scales": ((heads, nb), torch.float32)}

    def encode(self, x):
        heads, nb = self.blocks(x.shape)
        flat = torch.zeros(heads, nb * BLOCK, dtype=torch.float32, device=x.device)
        flat[:, :math.prod(x.shape[1:])] = x.float().reshape(heads, -1)
        flat = flat.view(heads, nb, BLOCK)
        scales = flat.abs().amax(-1) / self.qmax
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block: codes 0
        codes = torch.round(flat / scales.unsqueeze(-1)).clamp_(-self.qmax, self.qmax).to(torch.int8)
        codes = codes.view(heads, -1)
        if self.bits == 4:  # two codes a byte, offset to 1..15
            u = (codes + 8).to(torch.uint8)
            codes = u[:, 0::2] | (u[:, 1::2] << 4)
        return {"codes": codes, "scales": scales}

    def decode(self, parts, shape):
        codes, scales = parts["codes"], parts["scales"].float()
        if self.bits == 4:
            codes = torch.stack([(codes & 0xF).to(torch.int8) - 8, (codes >> 4).to(torch.int8) - 8], dim=-1)
        heads, nb = scales.shape
        values = codes.reshape(heads, nb, BLOCK).float() * scales.unsqueeze(-1)
        return values.reshape(heads, -1)[:, :math.prod(shape[1:])].reshape(shape)


class TwoBitCodec(BlockIntCodec):
    """2-bit codes in blocks of BLOCK values per head, four to a byte: the block's range [-m, m]
    (m its largest magnitude) in four equal steps of s = m / 2, each value sent as the middle of its
    step, (c + 1/2) s for c in -2..1 (a step's floor: no code is wasted on an exact zero, which a
    symmetric 2-bit code would spend one of its four on). At most s / 2 off per value; error feedback
    carries that into the next upload. 2.5 bits a value with the block's fp32 scale."""

    def __init__(self):
        self.bits, self.name, self.lossy = 2, "int2", True

    def layout(self, shape):
        heads, nb = self.blocks(shape)
        return {"codes": ((heads, nb * BLOCK // 4), torch.uint8), "scales": ((heads, nb), torch.float32)}

    def encode(self, x):
        heads, nb = self.blocks(x.shape)
        flat = torch.zeros(heads, nb * BLOCK, dtype=torch.float32, device=x.device)
        flat[:, :math.prod(x.shape[1:])] = x.float().reshape(heads, -1)
        flat = flat.view(heads, nb, BLOCK)
        scales = flat.abs().amax(-1) / 2  # an all-zero block: scale 0, so every value decodes to 0
        steps = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(-1)
        u = (torch.floor(flat / steps).clamp_(-2, 1) + 2).to(torch.uint8).view(heads, -1)
        codes = u[:, 0::4] | (u[:, 1::4] << 2) | (u[:, 2::4] << 4) | (u[:, 3::4] << 6)
        return {"codes": codes, "scales": scales}

    def decode(self, parts, shape):
        codes, scales = parts["codes"], parts["scales"].float()
        c = torch.stack([(codes >> k) & 0x3 for k in (0, 2, 4, 6)], dim=-1).float() - 1.5  # c - 2 + 1/2
        heads, nb = scales.shape
        values = c.reshape(heads, nb, BLOCK) * scales.unsqueeze(-1)
        return values.reshape(heads, -1)[:, :math.prod(shape[1:])].reshape(shape)


CODECS = {c.name: c for c in (UploadCodec(), Bf16Codec(), BlockIntCodec(8), BlockIntCodec(4), TwoBitCodec())}


def get_codec(name: str, key: str = "comm.upload") -> UploadCodec:
    if name not in CODECS:
        raise ConfigError(f"{key} must be one of {tuple(CODECS)}, got {name!r}")
    return CODECS[name]


class Uploader:
    """One process's uploads in a codec: encoding with the error-feedback residual of every uploaded
    tensor (stacked over the process's heads, like the tensor)."""

    def __init__(self, codec: UploadCodec, error_feedback: bool = True):
        self.codec, self.error_feedback = codec, error_feedback
        self.residuals: dict[str, torch.Tensor] = {}

    @property
    def lossy(self) -> bool:
        return self.codec.lossy

    def describe(self) -> str:
        return self.codec.describe() + (" with error feedback" if self.lossy and self.error_feedback else "")

    @torch.no_grad()
    def encode(self, name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.detach().float()
        feedback = self.error_feedback and self.lossy  # fp32 drops nothing to feed back
        if feedback and name in self.residuals:
            x = x + self.residuals[name].to(x.device)
        parts = self.codec.encode(x)
        if feedback:
            self.residuals[name] = x - self.codec.decode(parts, tuple(x.shape))
        return parts

    def sent(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the receiver decodes of each tensor (a simulated run's upload)."""
        return {k: self.codec.decode(self.encode(k, t), tuple(t.shape)) for k, t in tensors.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.residuals.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None, device: torch.device | str = "cpu") -> None:
        self.residuals = {k: v.to(device) for k, v in (state or {}).items()}


def as_changes(heads: dict[str, torch.Tensor], master: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replicated parameters' copies as their change since the merge (other tensors as they are)."""
    return {k: t - master[k[:-len(HEADS_SUFFIX)]].to(t.device) if k.endswith(HEADS_SUFFIX) else t
            for k, t in heads.items()}


def as_values(changes: dict[str, torch.Tensor], master: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of as_changes, from the same master."""
    return {k: master[k[:-len(HEADS_SUFFIX)]].float().to(t.device) + t if k.endswith(HEADS_SUFFIX) else t
            for k, t in changes.items()}


def through_uploads(heads: dict[str, torch.Tensor], master: dict[str, torch.Tensor], keys: list[str],
                    uploader: Uploader, onto: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The head tensors as a parameter server would merge them after `uploader`'s codec: `keys` (what
    is uploaded) encoded and decoded, replicas as changes from the `master` the heads trained against;
    the other head tensors as they are. `onto`: a master a merge ahead of that one (comm.overlap), on
    which the server rebuilds the replicas' values from their changes (sent as changes even in fp32)."""
    if not uploader.lossy and onto is None:
        return heads
    sent = uploader.sent(as_changes({k: heads[k] for k in keys}, master))
    return {**heads, **as_values(sent, master if onto is None else onto)}
