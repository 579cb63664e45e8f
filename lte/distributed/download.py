"""comm.download: what a download sends of the base (mode=ps).

full   the whole encoded base every round, as the layouts lay it out.
delta  the bytes of the encoded base XOR the previous download of the same format, deflated
       (zlib, level 1). A merge moves most weights by less than an nf4 step, so most code bytes,
       and every byte of what did not change, XOR to zero and deflate to little; the worker XORs
       what it receives into the previous download it holds and has the new one, bit for bit (the
       end-of-run base check still compares digests). Both sides start each attempt from zeros, so
       the first download of an attempt is the whole base, deflated.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch



class DeltaStream:
    """One side of the downloads of one base format under comm.download=delta: the previous
    download, and the step from one download to the next."""

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
