"""Fault injection for testing failure paths, from one environment variable:

    LTE_FAULT=<kind>:rank=<r>:round=<n>[:attempt=<a>]     kill | hang | nan, on a ps worker
    LTE_FAULT=sleep:rank=<r>:round=<n>[:rounds=<k>]:seconds=<s>   a ps worker that is late by s seconds
    LTE_FAULT=scale:rank=<r>:round=<n>[:rounds=<k>]:factor=<f>   a ps worker whose heads' change is f
                                                          times what it trained, in k rounds from n
    LTE_FAULT=flip|replay:rank=<r>:round=<n>              an elastic worker's upload of round n with a
                                                          byte flipped after it was signed, or its
                                                          previous message sent again in its place
    LTE_FAULT=torn_write:step=<n>[:attempt=<a>]           any mode, while writing a checkpoint

kill (the worker exits at once), hang (it stops answering), nan (its factors turn NaN) and sleep
(a straggler) fire on worker rank r just before its upload of round n (1-based). torn_write kills the process that
writes the checkpoint of step n half-way through writing it. With attempt=a, a fault fires on
launcher attempt a only (TORCHELASTIC_RESTART_COUNT), so a restarted run goes through.
"""
from __future__ import annotations

import os
import time

import torch


def _parse() -> dict | None:
    text = os.environ.get("LTE_FAULT")
    if not text:
        return None
    kind, *fields = text.split(":")
    spec = {"kind": kind}
    for f in fields:
        name, _, value = f.partition("=")
        spec[name] = float(value) if name in ("seconds", "factor") else int(value)
    return spec


def _this_attempt(spec: dict) -> bool:
    return "attempt" not in spec or spec["attempt"] == int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def during_write(step: int, f, data: bytes) -> None:
    """torn_write: leave half of a checkpoint's bytes on disk and die, as a crash mid-write would."""
    spec = _parse()
    if spec is None or spec["kind"] != "torn_write" or spec.get("step") != step or not _this_attempt(spec):
        return
    f.write(data[:len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os._exit(17)


def _fires(spec: dict | None, rank: int, round_index: int) -> bool:
    if spec is None or spec.get("rank") != rank or not _this_attempt(spec):
        return False
    first = spec.get("round", 0)
    return first <= round_index < first + spec.get("rounds", 1)


def armed() -> bool:
    """Whether LTE_FAULT names a fault at all (what a replay needs is kept only then)."""
    return _parse() is not None


def link_fault(rank: int, round_index: int) -> str | None:
    """flip or replay, if LTE_FAULT says so for this worker's upload of this round."""
    spec = _parse()
    return spec["kind"] if _fires(spec, rank, round_index) and spec["kind"] in ("flip", "replay") else None


def before_upload(rank: int, round_index: int, heads: dict[str, torch.Tensor],
                  replicas: dict[str, torch.Tensor] | None = None) -> None:
    """The faults of a worker's upload of a round; `heads` are its uploaded head tensors (changed in
    place), `replicas` the values its replicas' copies started the round from."""
    spec = _parse()
    if not _fires(spec, rank, round_index):
        return
    if spec["kind"] == "scale":  # the change s B A, and each replica copy's change, times the factor
        factor = spec["factor"]
        with torch.no_grad():
            for name, t in heads.items():
                if name.endswith("lora_B"):
                    t.mul_(factor)
                elif name.endswith("_heads") and replicas and name[:-len("_heads")] in replicas:
                    start = replicas[name[:-len("_heads")]].to(t)
                    t.sub_(start).mul_(factor).add_(start)
    if spec["kind"] == "kill":
        os._exit(17)
    if spec["kind"] == "sleep":
        time.sleep(spec.get("seconds", 1))
    if spec["kind"] == "hang":
        while True:
            time.sleep(3600)
    if spec["kind"] == "nan":
        with torch.no_grad():
            first = next(iter(heads.values()))
            first[(0,) * first.dim()] = float("nan")  # in place, whatever the tensor's layout
