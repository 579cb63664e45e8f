"""The parameter server (mode=ps) as the number of workers grows, on one server rank or sharded over
K (dist.servers): the round's time split into compute, upload, merge and download, the bytes into
and out of each server rank per round, rounds per second and the final eval loss, measured at a
few worker counts; then a cost model fitted to those points predicts the server's overhead per
round at 64..1024 workers behind 10 or 100 Gbit/s links, one link per server rank.

    python benchmarks/server_scale.py                            # 4, 8, 16 workers x K = 1, 2, 4 (CPU, minutes)
    python benchmarks/server_scale.py --workers 4,8 --servers 1,2 --steps 100 --keep
    python benchmarks/server_scale.py --dry-run                  # 2 workers, 20 steps: the code path

Every run is configs/digits.yaml with a tiny ViT (embed 16, depth 1, 2 attention heads), one head
per worker, a global batch of 8 per worker, T = 10 and dist.sync_phases=true (a barrier before the
upload, so upload_s is the transfer alone), one process per rank through lte's launcher, one thread
each. The numbers come from the run's summary.json: round_time, and comm.per_rank's rank 0 (the
server) divided by the rounds. Writes JSON and a Markdown table (the .md beside it, also printed).

The model is tiny on purpose: what grows with W is the server's work (it sums every worker's
factors) and its traffic, not the workers'. The prediction is of that overhead; compute per round
is the tiny model's, as measured. GPT-2's message sizes (configs/gpt2_tinystories.yaml, one head
of rank 64 per worker, nf4 base) give the link time a round would take for a real model.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, run_train, train_command, write_json
from lte import core
from lte.distributed.protocol import worker_protocols
from lte.models import create_model
from lte.runtime.config import load_config, resolve_heads

CONFIG = ROOT / "configs" / "digits.yaml"
GPT2 = ROOT / "configs" / "gpt2_tinystories.yaml"
OVERRIDES = ["mode=ps", "lte.heads=null", "worker.heads=1", "lte.merge_every=10",
             "model.args={embed_dim: 16, depth: 1, num_heads: 2}", "eval.every=0", "train.log_every=10",
             "dist.sync_phases=true", "train.device=cpu", "checkpoint.resume=false"]
BATCH_PER_WORKER = 8
PHASES = ("compute_s", "upload_s", "merge_s", "download_s")
PREDICT = (64, 128, 256, 512, 1024)
LINKS = {"10 Gbit/s": 10e9 / 8, "100 Gbit/s": 100e9 / 8}  # bytes per second
ASSUMPTIONS = [
    "server time per round = merge_s(W) + (W uploads in + W downloads out) / the server's link bandwidth",
    "with K server ranks, each on its own link, each rank carries 1/K of the bytes and of the merge (the "
    "shards hold whole tensors, so the busiest carries a little more: see the measured runs)",
    "merge_s(W) = a + b W, least squares on the measured points (the merge sums every worker's factors)",
    "the server's link is the bottleneck: the workers' links and the network core are not",
    "transfers to and from different workers share the server's link and do not overlap the merge",
    "compute per round is the measured tiny model's (the W with least CPU contention), so the "
    "prediction is of the server's overhead per round, not of a real model's round",
    "a worker's message sizes do not depend on W (its download grows by 8 bytes a worker: the accepted flags)",
    "a DDP ring all-reduce has no such server bottleneck: each rank moves ~2x the model whatever W is",
]


def run_one(workers: int, servers: int, steps: int, work: Path) -> dict:
    """One mode=ps run of `workers` workers and `servers` server ranks; the server's view of it."""
    out_dir = work / f"w{workers}-k{servers}"
    overrides = [*OVERRIDES, f"train.batch_size={BATCH_PER_WORKER * workers}", f"train.steps={steps}",
                 f"dist.servers={servers}", f"out_dir={out_dir}"]
    t0 = time.perf_counter()
    s = run_train(train_command("--config", CONFIG, *overrides, nproc=workers + servers), out_dir,
                  log=work / f"w{workers}-k{servers}.log")
    ranks = [r for r in s["comm"]["per_rank"] if r["rank"] < servers]
    rt, merges = s["round_time"], s["merges"]
    return {"workers": workers, "servers": servers, "steps": s["steps"], "merges": merges, "round_time": rt,
            # counters include the start-up handshake and first base download, spread over the rounds;
            # per server rank, the busiest (the shards hold whole tensors, so they are not quite even)
            "server_bytes_in_per_round": max(r["bytes_received"] for r in ranks) / merges,
            "server_bytes_out_per_round": max(r["bytes_sent"] for r in ranks) / merges,
            "upload_bytes_per_worker": s["comm"]["upload_bytes_per_round"],
            "download_bytes_per_worker": s["comm"]["download_bytes_per_round"],
            "rounds_per_s": merges / s["wall_s"], "rounds_per_s_from_phases": 1 / sum(rt[p] for p in PHASES),
            "wall_s": s["wall_s"], "process_s": time.perf_counter() - t0, "eval_loss": s["eval"]["loss"],
            "eval_accuracy": s["eval"].get("accuracy")}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """a, b of the least-squares y = a + b x (b = 0 from a single point)."""
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if n > 1 and sxx else 0.0
    return my - b * mx, b


def gpt2_messages(counts: tuple[int, ...]) -> dict:
    """Per-worker upload and download bytes of a round for GPT-2 at each worker count, from the
    parameter server's own message layouts (the model on the meta device: nothing allocated)."""
    out = {}
    for w in counts:
        cfg = resolve_heads(load_config(GPT2, ["lte.heads=null", "worker.heads=1", f"train.batch_size={w}"]), w)
        with core.params_on_meta():
            model = create_model(cfg.model.name, {}, **cfg.model.args)
        spec, _ = core.plan(model, cfg.lte_config())
        shapes = {k: tuple(t.shape) for k, t in model.state_dict().items() if k in spec.master_keys()}
        proto = worker_protocols(cfg, spec, shapes, w)[0]
        out[w] = {"upload": proto.upload.nbytes, "download": proto.download.nbytes,
                  "params": sum(p.numel() for p in model.parameters())}
    return out


def predict(runs: list[dict]) -> dict:
    """The cost model fitted to the one-server runs, and its predictions at PREDICT workers for each
    link, with the server on 1, 2 and 4 ranks (each rank its own link, 1/K of the bytes and of the merge)."""
    single = [r for r in runs if r["servers"] == 1] or runs
    a, b = fit_line([r["workers"] for r in single], [r["round_time"]["merge_s"] for r in single])
    last = max(single, key=lambda r: r["workers"])
    per_worker = last["upload_bytes_per_worker"] + last["download_bytes_per_worker"]
    compute = min(single, key=lambda r: r["workers"])["round_time"]["compute_s"]
    gpt2 = gpt2_messages(PREDICT)
    rows = []
    for w in PREDICT:
        for k in (1, 2, 4):
            merge, through = (a + b * w) / k, w * per_worker / k
            g = (gpt2[w]["upload"] * w + gpt2[w]["download"] * w) / k
            row = {"workers": w, "servers": k, "merge_s": merge, "server_bytes_per_round": through,
                   "gpt2_server_bytes_per_round": g}
            for link, bps in LINKS.items():
                server = merge + through / bps
                row[link] = {"server_s": server, "round_s": compute + server, "rounds_per_s": 1 / (compute + server),
                             "gpt2_link_s": g / bps}
            rows.append(row)
    return {"merge_fit": {"a_s": a, "b_s_per_worker": b}, "compute_s": compute,
            "bytes_per_worker_per_round": per_worker, "gpt2": gpt2[PREDICT[0]] | {"workers_counted": list(PREDICT)},
            "assumptions": ASSUMPTIONS, "rows": rows}


def markdown(report: dict) -> str:
    m, p = report["machine"], report["prediction"]
    kb = lambda x: f"{x / 1e3:,.1f}"  # noqa: E731
    lines = [f"Parameter server scaling: configs/digits.yaml, tiny ViT, 1 head a worker, batch {BATCH_PER_WORKER} a "
             f"worker, T = 10, {report['steps']} steps; {m['device']}, torch {m['torch']}, one thread a process.", "",
             "| workers | server ranks | compute s | upload s | merge s | download s | rounds/s (merges / wall) | "
             "rounds/s (1 / sum of phases) | busiest server rank in KB/round | out KB/round | eval loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        rt = r["round_time"]
        lines.append(f"| {r['workers']} | {r['servers']} | " + " | ".join(f"{rt[k]:.4f}" for k in PHASES)
                     + f" | {r['rounds_per_s']:.2f} | {r['rounds_per_s_from_phases']:.2f} | "
                     f"{kb(r['server_bytes_in_per_round'])} | {kb(r['server_bytes_out_per_round'])} | "
                     f"{r['eval_loss']:.4f} |")
    fit, g = p["merge_fit"], p["gpt2"]
    lines += ["", f"Prediction: merge_s = {fit['a_s']:.5f} + {fit['b_s_per_worker']:.2e} W s (least squares); "
              f"{kb(p['bytes_per_worker_per_round'])} KB a worker a round through the server; compute "
              f"{p['compute_s']:.4f} s a round (the tiny model's, measured). GPT-2 "
              f"({g['params'] / 1e6:.0f}M parameters, rank 64, nf4 base): {g['upload'] / 1e6:.1f} MB up + "
              f"{g['download'] / 1e6:.1f} MB down a worker a round.",
              "", "| workers | server ranks | merge s | MB/round a rank | 10G server s | 10G rounds/s | "
              "100G server s | 100G rounds/s | GPT-2 GB/round a rank | GPT-2 link s, 10G | GPT-2 link s, 100G |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        ten, hundred = r["10 Gbit/s"], r["100 Gbit/s"]
        lines.append(f"| {r['workers']} | {r['servers']} | {r['merge_s']:.4f} | "
                     f"{r['server_bytes_per_round'] / 1e6:.2f} | "
                     f"{ten['server_s']:.4f} | {ten['rounds_per_s']:.1f} | {hundred['server_s']:.4f} | "
                     f"{hundred['rounds_per_s']:.1f} | {r['gpt2_server_bytes_per_round'] / 1e9:.1f} | "
                     f"{ten['gpt2_link_s']:.1f} | {hundred['gpt2_link_s']:.1f} |")
    lines += ["", "Notes:", *(f"- {n}" for n in report["notes"]), "", "Assumptions of the model:",
              *(f"- {a}" for a in p["assumptions"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="4,8,16", help="comma-separated worker counts")
    parser.add_argument("--servers", default="1,2,4", help="comma-separated server rank counts (dist.servers)")
    parser.add_argument("--steps", type=int, default=150, help="steps of every run (T = 10: steps / 10 rounds)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server_scale.json",
                        help="the JSON report; the Markdown table beside it (.md)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders (printed), else a temp dir")
    parser.add_argument("--dry-run", action="store_true", help="2 workers, 20 steps: the code path only")
    args = parser.parse_args()
    counts = [2] if args.dry_run else [int(w) for w in args.workers.split(",")]
    shards = [1, 2] if args.dry_run else [int(k) for k in args.servers.split(",")]
    steps = 20 if args.dry_run else args.steps
    os.environ["OMP_NUM_THREADS"] = "1"  # every rank shares the cores: one thread each, passed on by the launcher
    work = Path(tempfile.mkdtemp(prefix="server-scale-"))
    try:
        runs = [run_one(w, k, steps, work) for w in counts for k in shards]
    finally:
        if args.keep:
            print(f"runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    notes = [f"this machine has {os.cpu_count()} cores shared by all W + K processes, so compute (and every "
             "phase) grows with W here; on one device per worker compute would not; more server ranks add "
             "processes to the same cores, so K > 1 cannot be faster here: the byte columns are what K divides",
             "upload and download are loopback Gloo transfers, not a network link",
             "server bytes per round are its byte counters over the run / rounds: the start-up handshake "
             "and first base download are spread over the rounds"]
    report = {"benchmark": "server_scale", "config": str(CONFIG.relative_to(ROOT)), "overrides": OVERRIDES,
              "batch_per_worker": BATCH_PER_WORKER, "steps": steps, "machine": machine("cpu"), "runs": runs,
              "prediction": predict(runs), "notes": notes}
    out = write_json(args.out, report)
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"-> {out}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
