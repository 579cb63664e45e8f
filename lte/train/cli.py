"""lte-train [--nproc-per-node N] --config configs/X.yaml [dotted.key=value ...]
   lte-train --nproc-per-node N --script my_script.py [ARGS ...]
   lte-train serve --config C [--host H] [--port P] [key=value ...]     an elastic run's server
   lte-train join --server HOST:PORT --config C [--slot S] [key=value ...]   a worker joining it
   lte-train report RUN_DIR [RUN_DIR ...]
   lte-train resize-images SRC DST [--size 256]"""
from __future__ import annotations

import argparse
import os
import sys

from ..distributed import elastic as elastic_run
from ..distributed.launch import launch
from ..errors import UserError
from ..runtime.config import load_config
from .entry import run


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="lte-train", description="Pre-train a model with LoRA-the-Explorer heads, or a baseline.",
        epilog="Examples: lte-train --config configs/digits.yaml mode=full train.steps=500\n"
               "          lte-train --nproc-per-node 3 --config configs/digits.yaml mode=ps\n"
               "          lte-train --nproc-per-node 3 --script my_script.py mode=ps\n"
               "          lte-train report runs/digits-lte runs/digits-full\n"
               "          lte-train resize-images /data/imagenet /data/imagenet-256 --size 256",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", help="YAML config file (defaults for every key otherwise)")
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="start N local processes (mode=ps, ddp or diloco), rendezvous on loopback only")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="R",
                        help="with --nproc-per-node: restart every process up to R times after a failure")
    parser.add_argument("--script", metavar="PATH",
                        help="with --nproc-per-node: run this Python script in every process instead of "
                             "lte-train (it calls lte.train.run); the arguments after it go to the script")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


def leave_now() -> None:
    """End a process of a finished distributed run without running C++ static destructors.

    Everything is written (atomically) and the group was left by then; but Gloo's threads, torn down
    during interpreter shutdown, sometimes abort the process ("terminate called without an active
    exception", SIGABRT, with no Python frame on the stack: seen in about 1 of 20 parameter-server
    runs here), which a launcher reports as a failed run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def elastic(command: str, argv: list[str]) -> int:
    """lte-train serve / join: one elastic run's server, or one worker joining it (lte.distributed.elastic)."""
    parser = argparse.ArgumentParser(prog=f"lte-train {command}", description=(
        "The server of an elastic mode=ps run: workers join and leave without stopping it." if command == "serve"
        else "Join an elastic mode=ps run as a worker (with the server's config)."))
    parser.add_argument("--config", "-c", help="YAML config file (the same for the server and every worker)")
    if command == "serve":
        parser.add_argument("--host", default="127.0.0.1",
                            help="address to listen on (default loopback; beyond it LTE_JOIN_TOKEN must be set)")
        parser.add_argument("--port", type=int, default=29400, help="port to listen on (0: any free one)")
    else:
        parser.add_argument("--server", required=True, metavar="HOST:PORT", help="the server to join")
        parser.add_argument("--slot", type=int, default=None,
                            help="the worker slot to take (0-based; default: the first free one)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if command == "serve":
            elastic_run.serve(cfg, args.host, args.port)
        else:
            elastic_run.join_run(cfg, args.server, args.slot)
    except UserError as exc:
        print(f"lte-train {command}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"lte-train {command}: interrupted", file=sys.stderr)
        return 130
    leave_now()  # Gloo's threads may abort at interpreter teardown (see leave_now)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from .report import main as report

        return report(argv[1:])
    if argv[:1] in (["serve"], ["join"]):
        return elastic(argv[0], argv[1:])
    if argv[:1] == ["resize-images"]:
        from ..data.resize import main as resize_images

        return resize_images(argv[1:])
    args = parse_args(argv)
    try:
        if args.script is not None:
            if args.nproc_per_node is None or args.config is not None:
                raise UserError("--script goes with --nproc-per-node and without --config (give the script "
                                "its config yourself)")
        elif args.nproc_per_node is None:
            run(args.config, overrides=args.overrides)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                leave_now()
            return 0
        else:
            load_config(args.config, args.overrides)  # refuse a bad config before starting anything
        if args.nproc_per_node < 1:
            raise UserError("--nproc-per-node must be >= 1")

        if args.script is not None:
            return launch(args.nproc_per_node, args.overrides, args.max_restarts, script=args.script)
        child_args = (["--config", args.config] if args.config else []) + args.overrides
        return launch(args.nproc_per_node, child_args, args.max_restarts)
    except UserError as exc:
        print(f"lte-train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("lte-train: interrupted", file=sys.stderr)
        return 130
