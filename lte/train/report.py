"""Side-by-side table of finished runs: python -m lte.train.report RUN_DIR [RUN_DIR ...]"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(run_dir: str) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise SystemExit(f"report: {path} not found (did the run finish?)")
    return json.loads(path.read_text())


def table(runs: dict[str, dict]) -> str:
    rows = [("run", "mode", "steps", "merges", "test loss", "test acc", "samples/s", "wall s",
             "comm bytes/step/worker")]
    for name, s in runs.items():
        ev, comm = s.get("eval", {}), s.get("comm")
        rows.append((name, s["mode"], str(s["steps"]), str(s["merges"]), f"{ev.get('loss', float('nan')):.4f}",
                     f"{ev.get('accuracy', float('nan')):.4f}", f"{s['samples_per_s']:,.0f}", f"{s['wall_s']:.1f}",
                     f"{comm['bytes_per_step_per_worker']:,.0f}" if comm else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    print(table({Path(d).name: load(d) for d in argv}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
