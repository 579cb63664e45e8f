"""The start of a parameter-server run: every worker reports whether it could set itself up, then
the server says whether to go on, and from which step (a fresh start or a checkpoint), or that the
run in out_dir is already finished."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .comm import Exchange, Layout

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


def hello(exchange: Exchange, error: UserError | None, size: int, who: str) -> Control:
    """A rank's side of the handshake (a worker, or a server shard other than rank 0): whether it
    could set up and the size of its upload, then how the server says the run starts."""
    status = torch.tensor([int(error is not None), 0 if error is not None else size])
    exchange.gather(HELLO.pack({"status": status}), HELLO.nbytes, "the start-up handshake")
    control = Control.unpack(exchange.broadcast(Control().pack(), "the start-up handshake"))
    if error is not None:
        raise error
    if control.abort:
        raise UserError(f"{who}: the parameter server stopped the run (see its error)")
    return control
