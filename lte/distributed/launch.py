"""lte-train --nproc-per-node N: a single-node launcher that listens on loopback only.

torchrun's rendezvous store listens on every interface of the machine, even with --standalone.
This launcher binds its store to 127.0.0.1 itself, passes the bound socket to the store, and starts
N copies of `python -m lte.train` with the environment torchrun would give them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT, TORCHELASTIC_RESTART_COUNT); the processes then keep their own data
sockets on loopback too (lte.distributed.env). Like torchrun, when a process fails it stops the others and,
with --max-restarts, starts them all again; a run with checkpoints resumes from the last one.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import torch.distributed as dist


def launch(nproc: int, args: list[str], max_restarts: int = 0, script: str | None = None) -> int:
    """Run `python -m lte.train ARGS` (or `python SCRIPT ARGS`) in nproc processes."""
    command = [sys.executable, script] if script else [sys.executable, "-m", "lte.train"]
    for attempt in range(max_restarts + 1):
        code = _attempt(nproc, command + list(args), attempt)
        if code == 0:
            return 0
        if attempt < max_restarts:
            print(f"lte-train: a process failed (exit {code}); restart {attempt + 1} of {max_restarts}",
                  file=sys.stderr, flush=True)
    return code


def _attempt(nproc: int, command: list[str], attempt: int) -> int:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(nproc * 4)
    port = listener.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, None, True, timedelta(minutes=30), False, False,
                          listener.detach(), True)  # the store owns the bound socket from here
    procs = []
    try:
        for rank in range(nproc):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                   "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True",
                   "TORCHELASTIC_RESTART_COUNT": str(attempt)}
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
            procs.append(subprocess.Popen(command, env=env))
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 130
    finally:
        _stop(procs)
        del store


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
