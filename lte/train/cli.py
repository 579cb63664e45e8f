"""lte-train [--nproc-per-node N] --config configs/X.yaml [dotted.key=value ...]"""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="lte-train", description="Pre-train a model with LoRA-the-Explorer heads, or a baseline.",
        epilog="Examples: lte-train --config configs/digits.yaml mode=full train.steps=500\n"
               "          lte-train --nproc-per-node 3 --config configs/digits.yaml mode=ps",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", help="YAML config file (defaults for every key otherwise)")
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="start N local processes (mode=ps or ddp), rendezvous on loopback only")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="R",
                        help="with --nproc-per-node: restart every process up to R times after a failure")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        from .config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.nproc_per_node is not None:
            if args.nproc_per_node < 1:
                raise UserError("--nproc-per-node must be >= 1")
            from ..distributed.launch import launch

            child_args = (["--config", args.config] if args.config else []) + args.overrides
            return launch(args.nproc_per_node, child_args, args.max_restarts)
        if cfg.mode in ("ps", "ddp"):
            from ..distributed import run_distributed

            run_distributed(cfg)
        else:
            from .trainer import train

            train(cfg)
    except UserError as exc:
        print(f"lte-train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("lte-train: interrupted", file=sys.stderr)
        return 130
    return 0
