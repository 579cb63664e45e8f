"""What a parameter server's download sends of the base each round: a strategy per comm.download.

full   the whole encoded base every round, as the layouts lay it out.
delta  the bytes of the encoded base XOR the previous download of the same format, deflated
       (zlib, level 1). A merge moves most weights by less than an nf4 step, so most code bytes,
       and every byte of what did not change, XOR to zero and deflate to little; the worker XORs
       what it receives into the previous download it holds and has the new one, bit for bit (the
       end-of-run base check still compares digests). Both sides start each attempt from zeros, so
       the first download of an attempt is the whole base, deflated.

ef-int8, ef-int4, ef-int2
       error feedback (EF21-P's, Richtarik et al. 2022): the download's fp32 values (the merged
       replicas, and the base itself for workers storing it in fp32) travel as the block-int codes
       (lte.core.upload, blocks of 64 with one scale) of the gap between the new values and what
       the workers hold, and the workers add what the codes decode to; the rest (nf4/fp4/int8
       codes and their scales, the accepted mask) as delta does, exactly. The server keeps the
       workers' copy, so what one download leaves out is part of the next one's gap: the error
       never accumulates. After every download each value the workers hold is within half a code
       step of the master's, a step being its block's largest gap over 127 (int8) or 7 (int4),
       and the gap is the round's change plus the last download's error; tests/test_upload.py
       checks 50 rounds against that bound and against sending the round's change without the
       feedback, which drifts. The first download of a stream is exact; a resumed server restores
       its copy from the checkpoint and the first download of the attempt brings the workers back
       to exactly that copy, so a resumed run downloads the same bits as one never interrupted.

A strategy makes one stream per download sequence (per base format on a torchrun server, per
worker on an elastic one, and on each worker one per server shard); the server's stream encodes
each download buffer into what travels, the worker's decodes it back. A stream whose payloads vary
in size (`sized`) travels with its size first. DOWNLOADS is the registry comm.download names.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from ..errors import ConfigError
from .upload import CODECS


def xor_deflate(after: np.ndarray, before: np.ndarray) -> bytes:
    """The bytes that turn `before` into `after` (XOR), deflated: what did not change costs almost nothing."""
    return zlib.compress(np.bitwise_xor(after, before).tobytes(), 1)


def xor_inflate(before: np.ndarray, change: bytes) -> np.ndarray:
    """`before` with xor_deflate's `change` applied: the `after` it was made from, bit for bit."""
    return np.bitwise_xor(before, np.frombuffer(zlib.decompress(change), dtype=np.uint8))


class Verbatim:
    """The download as it is: the receiver knows its size from the layout."""

    sized = False

    def holds(self, buf: torch.Tensor) -> torch.Tensor:
        return buf

    def encode(self, buf: torch.Tensor) -> torch.Tensor:
        return buf

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        return payload


class DeltaStream:
    """One side of the downloads of one base format under comm.download=delta: the previous
    download, and the step from one download to the next."""

    sized = True

    def __init__(self, nbytes: int):
        self.previous = np.zeros(nbytes, dtype=np.uint8)

    def holds(self, buf: torch.Tensor) -> torch.Tensor:
        return buf

    def encode(self, buf: torch.Tensor) -> torch.Tensor:
        """The server: what to send for the download `buf`."""
        current = buf.cpu().numpy()
        change = xor_deflate(current, self.previous)
        self.previous = current.copy()
        return torch.frombuffer(bytearray(change), dtype=torch.uint8)

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        """A worker: the download that `payload` stands for."""
        self.previous = xor_inflate(self.previous, payload.cpu().numpy().tobytes())
        return torch.from_numpy(self.previous.copy())


class FedBackStream:
    """One side of the downloads of one base format under comm.download=ef-int8|ef-int4|ef-int2: what the
    workers hold (`previous`, the same bytes on both sides), and the step from one download to the
    next. `values`: the (byte offset, count) of each fp32 run of the buffer sent through the codec."""

    sized = True
    EXACT, FED_BACK = 0, 1  # a payload's first byte

    def __init__(self, nbytes: int, values, codec):
        self.codec, self.previous, self.resync = codec, None, False
        self.mask = np.ones(nbytes, dtype=bool)  # the bytes that travel exactly
        for offset, count in values:
            self.mask[offset:offset + 4 * count] = False
        self.count = int((~self.mask).sum()) // 4
        shapes = codec.layout((1, self.count))
        self.parts = [(name, shape, dtype, math.prod(shape) * torch.empty((), dtype=dtype).element_size())
                      for name, (shape, dtype) in shapes.items()]

    def holds(self, buf: torch.Tensor) -> torch.Tensor:
        """The buffer the workers hold once `buf` is sent (the server's copy of theirs)."""
        return torch.from_numpy(self.previous.copy())

    def encode(self, buf: torch.Tensor) -> torch.Tensor:
        current = buf.cpu().numpy()
        if self.previous is None or self.resync:  # a stream's first download: exact (a resumed one: the copy)
            target = current if self.previous is None else self.previous
            payload = self._exact(np.zeros_like(target), target)
            self.previous, self.resync = target.copy(), False
            return payload
        rest = xor_deflate(current[self.mask], self.previous[self.mask])
        held = torch.from_numpy(self.previous[~self.mask].copy()).view(torch.float32)
        gap = torch.from_numpy(current[~self.mask].copy()).view(torch.float32) - held
        coded = self.codec.encode(gap.reshape(1, -1))
        payload = (bytes([self.FED_BACK]) + len(rest).to_bytes(8, "little") + rest
                   + b"".join(coded[name].contiguous().view(torch.uint8).numpy().tobytes() for name, *_ in self.parts))
        self._apply(payload)
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8)

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        data = payload.cpu().numpy().tobytes()
        if data[0] == self.EXACT:
            before = np.zeros(self.mask.size, dtype=np.uint8) if self.previous is None else self.previous
            self.previous = xor_inflate(before, data[1:])
        else:
            self._apply(data)
        return torch.from_numpy(self.previous.copy())

    def _exact(self, before: np.ndarray, after: np.ndarray) -> torch.Tensor:
        return torch.frombuffer(bytearray(bytes([self.EXACT]) + xor_deflate(after, before)), dtype=torch.uint8)

    def _apply(self, data: bytes) -> None:
        """A fed-back payload into `previous`: the same operations on both sides, so the same bits."""
        n = int.from_bytes(data[1:9], "little")
        at, coded = 9 + n, {}
        for name, shape, dtype, size in self.parts:
            coded[name] = torch.frombuffer(bytearray(data[at:at + size]), dtype=torch.uint8).view(dtype).view(shape)
            at += size
        previous = self.previous.copy()
        previous[self.mask] = xor_inflate(previous[self.mask], data[9:9 + n])
        held = torch.from_numpy(previous[~self.mask].copy()).view(torch.float32)
        held += self.codec.decode(coded, (1, self.count)).reshape(-1)
        previous[~self.mask] = held.view(torch.uint8).numpy()
        self.previous = previous

    def state_dict(self) -> dict:
        return {"previous": None if self.previous is None else torch.from_numpy(self.previous.copy())}

    def load_state_dict(self, state: dict) -> None:
        """The server's copy of what the workers held at the checkpoint; the attempt's first download
        brings them back to it."""
        if state and state.get("previous") is not None:
            self.previous, self.resync = state["previous"].numpy().copy(), True


class Download:
    """comm.download=full: every download verbatim."""

    name = "full"
    lossy = False

    def stream(self, nbytes: int, values=()):
        """A new download sequence of buffers of `nbytes` (each side keeps its own); `values`: the
        (byte offset, count) of the fp32 runs a lossy strategy may code."""
        return Verbatim()

    def describe(self) -> str:
        return ""


class DeltaDownload(Download):
    name = "delta"

    def stream(self, nbytes, values=()):
        return DeltaStream(nbytes)

    def describe(self):
        return "downloads as deltas"


class FedBackDownload(Download):
    lossy = True

    def __init__(self, codec):
        self.codec, self.name = codec, f"ef-{codec.name}"

    def stream(self, nbytes, values=()):
        return FedBackStream(nbytes, values, self.codec)

    def describe(self):
        return f"downloads with error feedback ({self.codec.name} values, the rest as deltas)"


DOWNLOADS: dict[str, Download] = {d.name: d for d in (Download(), DeltaDownload(),
                                                      *(FedBackDownload(CODECS[c]) for c in ("int8", "int4", "int2")))}


def get_download(name: str, key: str = "comm.download") -> Download:
    if not isinstance(name, str) or name not in DOWNLOADS:
        raise ConfigError(f"{key} must be one of {tuple(DOWNLOADS)}, got {name!r}")
    return DOWNLOADS[name]
