"""Finished runs side by side:

    lte-train report RUN_DIR [RUN_DIR ...]                  a table of their summaries
    lte-train report RUN_DIR [RUN_DIR ...] --plot OUT.png   and their evaluation curves (loss against
                                                            samples seen) on one set of axes
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class ReportError(Exception):
    pass


def load(run_dir: str) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ReportError(f"{path} not found (did the run finish?)")
    return json.loads(path.read_text())


def eval_curve(run_dir: str | Path) -> dict[str, list[float]]:
    """A run's evaluations: samples seen, training seconds (when logged) and eval loss at each."""
    run_dir = Path(run_dir)
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.json"
    if not metrics.is_file() or not config.is_file():
        raise ReportError(f"{run_dir} has no metrics.jsonl and config.json: not an lte-train run folder")
    batch = json.loads(config.read_text())["train"]["batch_size"]
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "eval_loss" in r]
    return {"samples": [r["step"] * batch for r in rows], "train_s": [r.get("train_s") for r in rows],
            "eval_loss": [r["eval_loss"] for r in rows]}


def table(runs: dict[str, dict]) -> str:
    lm = any("perplexity" in s.get("eval", {}) for s in runs.values())
    metric = ("perplexity", "eval ppl") if lm else ("accuracy", "test acc")
    rows = [("run", "mode", "steps", "merges", "eval loss" if lm else "test loss", metric[1], "samples/s",
             "wall s", "comm bytes/step/worker")]
    for name, s in runs.items():
        ev, comm = s.get("eval", {}), s.get("comm")
        rows.append((name, s["mode"], str(s["steps"]), str(s["merges"]), f"{ev.get('loss', float('nan')):.4f}",
                     f"{ev.get(metric[0], float('nan')):.4f}", f"{s['samples_per_s']:,.0f}", f"{s['wall_s']:.1f}",
                     f"{comm['bytes_per_step_per_worker']:,.0f}" if comm else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("plots need matplotlib: pip install 'lte[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(curves: dict[str, dict], out: Path, title: str = "") -> None:
    """Eval loss against samples seen, one line per run, into a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        ax.plot(c["samples"], c["eval_loss"], marker=".", label=name)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("eval loss")
    ax.set_title(title or "evaluation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lte-train report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--plot", type=Path, metavar="OUT.png", help="also plot their eval curves into this PNG")
    args = parser.parse_args(argv)
    names = [Path(d).name or str(d) for d in args.runs]
    if len(set(names)) < len(names):  # runs/a/lte and runs/b/lte: name them by their paths
        names = [str(d) for d in args.runs]
    try:
        print(table({n: load(d) for n, d in zip(names, args.runs)}))
        if args.plot is not None:
            curves = {n: eval_curve(d) for n, d in zip(names, args.runs)}
            empty = [n for n, c in curves.items() if not c["samples"]]
            if empty:
                raise ReportError(f"run(s) {empty} logged no evaluation (set eval.every to evaluate during training)")
            plot(curves, args.plot)
            print(f"wrote {args.plot}")
    except ReportError as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
