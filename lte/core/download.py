"""What a parameter server's download sends of the base each round: a strategy per comm.download.

full   the whole encoded base every round, as the layouts lay it out.
delta  the bytes of the encoded base XOR the previous download of the same format, deflated
       (zlib, level 1). A merge moves most weights by less than an nf4 step, so most code bytes,
       and every byte of what did not change, XOR to zero and deflate to little; the worker XORs
       what it receives into the previous download it holds and has the new one, bit for bit (the
       end-of-run base check still compares digests). Both sides start each attempt from zeros, so
       the first download of an attempt is the whole base, deflated.

A strategy makes one stream per download sequence (per base format on a torchrun server, per
worker on an elastic one, and on each worker one per server shard); the server's stream encodes
each download buffer into what travels, the worker's decodes it back. A stream whose payloads vary
in size (`sized`) travels with its size first. DOWNLOADS is the registry comm.download names.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from ..errors import ConfigError


class Verbatim:
    """The download as it is: the receiver knows its size from the layout."""

    sized = False

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

    def encode(self, buf: torch.Tensor) -> torch.Tensor:
        """The server: what to send for the download `buf`."""
        current = buf.cpu().numpy()
        change = np.bitwise_xor(current, self.previous)
        self.previous = current.copy()
        return torch.frombuffer(bytearray(zlib.compress(change.tobytes(), 1)), dtype=torch.uint8)

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        """A worker: the download that `payload` stands for."""
        change = np.frombuffer(zlib.decompress(payload.cpu().numpy().tobytes()), dtype=np.uint8)
        self.previous = np.bitwise_xor(self.previous, change)
        return torch.from_numpy(self.previous.copy())


class Download:
    """comm.download=full: every download verbatim."""

    name = "full"

    def stream(self, nbytes: int):
        """A new download sequence of buffers of `nbytes` (each side keeps its own)."""
        return Verbatim()

    def describe(self) -> str:
        return ""


class DeltaDownload(Download):
    name = "delta"

    def stream(self, nbytes):
        return DeltaStream(nbytes)

    def describe(self):
        return "downloads as deltas"


DOWNLOADS: dict[str, Download] = {d.name: d for d in (Download(), DeltaDownload())}


def get_download(name: str, key: str = "comm.download") -> Download:
    if not isinstance(name, str) or name not in DOWNLOADS:
        raise ConfigError(f"{key} must be one of {tuple(DOWNLOADS)}, got {name!r}")
    return DOWNLOADS[name]
