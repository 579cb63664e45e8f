"""The start of a parameter-server run: every worker reports whether it could set itself up, then
the server says whether to go on, and from which step (a fresh start or a checkpoint), or that the
run in out_dir is already finished."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import Layout

HELLO = Layout([("status", (2,), torch.int64)])    # worker -> server: (failed, upload size)
CONTROL = Layout([("control", (5,), torch.int64)])  # server -> all: (abort, resume, finished, step, merges)
DIGEST = Layout([("digest", (1,), torch.int64)])    # worker -> server at the end: digest of its base


@dataclass
class Control:
    abort: bool = False
    resume: bool = False
    finished: bool = False   # out_dir holds a finished run with nothing left to do: everyone stops
    step: int = 0
    merges: int = 0

    def pack(self) -> torch.Tensor:
        values = [int(self.abort), int(self.resume), int(self.finished), self.step, self.merges]
        return CONTROL.pack({"control": torch.tensor(values)})

    @staticmethod
    def unpack(buf: torch.Tensor) -> "Control":
        a, r, f, s, m = (int(v) for v in CONTROL.unpack(buf)["control"])
        return Control(bool(a), bool(r), bool(f), s, m)
