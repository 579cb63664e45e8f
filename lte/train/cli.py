"""lte-train --config configs/X.yaml [dotted.key=value ...]"""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="lte-train", description="Pre-train a model with LoRA-the-Explorer heads, or a baseline.",
        epilog="Example: lte-train --config configs/digits.yaml mode=full train.steps=500")
    parser.add_argument("--config", "-c", help="YAML config file (defaults for every key otherwise)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from .config import load_config
        from .trainer import train

        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except UserError as exc:
        print(f"lte-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lte-train: interrupted", file=sys.stderr)
        return 130
    return 0
