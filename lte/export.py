"""A finished run's weights in the formats other tools read, for runs that finished before lte wrote
them (every run writes them at its end):

    python -m lte.export --run OUT_DIR --format safetensors     # OUT_DIR/final.safetensors
    python -m lte.export --run OUT_DIR --format hf              # OUT_DIR/hf/ (a transformers model)

A command only: nothing imports this module, so that `lte.export`, the library's function that
exports a prepared model's merged weights, stays that function (importing a submodule named
export would rebind the package's attribute to the module). The code is in lte.runtime.results.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .errors import UserError
from .runtime.results import load_run, safetensors_bytes, write_hf
from .runtime.rundir import atomic_write_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lte.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="the out_dir of a finished lte-train run")
    parser.add_argument("--format", required=True, choices=("safetensors", "hf"))
    args = parser.parse_args(argv)
    try:
        if args.format == "safetensors":
            path, out = args.run / "final.pt", args.run / "final.safetensors"
            if not path.is_file() and out.is_file():  # a sharded server's run wrote only this
                print(out)
                return 0
            if not path.is_file():
                raise UserError(f"{path} not found (did the run finish?)")
            atomic_write_bytes(out, safetensors_bytes(torch.load(path, map_location="cpu", weights_only=True)))
        else:
            model, _, _ = load_run(args.run, torch.device("cpu"))
            out = write_hf(model, args.run / "hf")
    except UserError as exc:
        print(f"lte.export: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
