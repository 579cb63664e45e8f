"""Fault injection for testing the failure paths of a distributed run, from one environment variable:

    LTE_FAULT=<kind>:rank=<r>:round=<n>[:attempt=<a>]

kind is kill (the worker exits at once), hang (it stops answering) or nan (its factors turn NaN
before the upload). The fault fires on worker rank r just before its upload of round n (1-based),
on launcher attempt a only if given (TORCHELASTIC_RESTART_COUNT), so a restarted run goes through.
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
        spec[name] = int(value)
    return spec


def before_upload(rank: int, round_index: int, heads: dict[str, torch.Tensor]) -> None:
    spec = _parse()
    if spec is None or spec.get("rank") != rank or spec.get("round") != round_index:
        return
    if "attempt" in spec and spec["attempt"] != int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")):
        return
    if spec["kind"] == "kill":
        os._exit(17)
    if spec["kind"] == "hang":
        while True:
            time.sleep(3600)
    if spec["kind"] == "nan":
        with torch.no_grad():
            next(iter(heads.values())).view(-1)[0] = float("nan")
