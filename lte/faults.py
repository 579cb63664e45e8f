"""Fault injection for testing failure paths, from one environment variable:

    LTE_FAULT=<kind>:rank=<r>:round=<n>[:attempt=<a>]     kill | hang | nan, on a ps worker
    LTE_FAULT=sleep:rank=<r>:round=<n>:seconds=<s>        a ps worker that is late by s seconds
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
        spec[name] = float(value) if name == "seconds" else int(value)
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


def before_upload(rank: int, round_index: int, heads: dict[str, torch.Tensor]) -> None:
    spec = _parse()
    if spec is None or spec.get("rank") != rank or spec.get("round") != round_index or not _this_attempt(spec):
        return
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
