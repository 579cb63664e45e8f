"""The parameter server (rank 0 of mode=ps): the fp32 master, the merge, evaluation, checkpoints and
the run's summary. It never trains.

Its master weights are the parameters of a plain instance of the user's model, so evaluating and
exporting the master is just using that model. A round: gather every worker's factors, leave out
workers whose upload is not finite, W += (s/N) sum_n B_n A_n over the heads kept (one matmul per
layer, the same function the simulated trainer uses), average the replicas, re-quantize, send.
The server holds the run directory (lte.train.rundir): the workers' state reaches its checkpoints
through the checkpoint upload, and goes back to them on a restart. Workers may differ
(worker.per_rank): the merge takes every head's A and B the same way however its worker trained
(a LoRA-FA worker's A is re-drawn here), and the base is encoded once per format its workers
store and sent to each worker in its own.
"""
from __future__ import annotations

import time

import torch

from .. import core
from ..data import build_data
from ..errors import UserError
from ..train.config import Config
from ..train.log import RunLog, peak_memory, progress_line
from ..train.rundir import RunDir, Start, load_model_state
from ..train.trainer import build_model, eval_batches, evaluate
from .comm import Exchange
from .env import DistEnv
from .handshake import DIGEST, HELLO, Control
from .protocol import STATS, format_groups, worker_protocols

PHASES = ("compute_s", "upload_s", "merge_s", "download_s")


class ParameterServer:
    def __init__(self, cfg: Config, env: DistEnv, exchange: Exchange):
        self.cfg, self.env, self.exchange = cfg, env, exchange
        self.workers = env.world - 1
        self.error: UserError | None = None
        self.rundir = RunDir(cfg)
        self.start = Start()
        try:
            self.start = self.rundir.open(say=RunLog.say)
            if self.start.finished is not None:
                return  # nothing to build: the run in out_dir is done
            self.data = build_data(cfg.data.name, cfg.seed, cfg.data.args)
            self.model = build_model(cfg, self.data, env.device)  # same seed: same init as the workers
            self.eval_set = eval_batches(cfg, self.data, env.device)
            spec, _ = core.plan(self.model, cfg.lte_config())
            sd = self.model.state_dict(keep_vars=True)
            self.master = {k: sd[k] for k in spec.master_keys()}  # views: merging updates the model
            self.protos = worker_protocols(cfg, spec, {k: tuple(v.shape) for k, v in self.master.items()},
                                           self.workers)
            formats, members = format_groups(self.protos)
            self.members = [[r - 1 for r in m] for m in members]  # worker indices storing each format
            if self.start.state is not None:
                load_model_state(self.model, self.start.state["master"], self.start.path)
        except UserError as exc:
            self.error = exc

    # start-up ----------------------------------------------------------------------------
    def handshake(self) -> Control:
        statuses = self.exchange.gather(None, HELLO.nbytes, "the start-up handshake")
        problems = []
        for w, buf in enumerate(statuses):
            failed, size = (int(v) for v in HELLO.unpack(buf)["status"])
            if failed:
                problems.append(f"worker rank {w + 1} could not start (see its error)")
            elif self.error is None and self.start.finished is None and size != self.protos[w].upload.nbytes:
                problems.append(f"worker rank {w + 1} holds a different model (upload of {size} bytes, "
                                f"expected {self.protos[w].upload.nbytes}): every process must use the same config")
        state = self.start.state or {}
        control = Control(abort=bool(self.error or problems), resume=bool(state),
                          finished=self.start.finished is not None, step=state.get("step", 0),
                          merges=state.get("merges", 0))
        self.exchange.broadcast(control.pack(), "the start-up handshake")
        if self.error:
            raise self.error
        if problems:
            raise UserError("; ".join(problems))
        if not control.finished:  # every worker makes the same groups at the same point
            self.groups = [None] if len(self.members) == 1 else self.exchange.groups(
                [[w + 1 for w in m] for m in self.members])
        return control

    def encode(self, accepted: torch.Tensor) -> list[torch.Tensor]:
        """The download, encoded once per base format the workers store."""
        return [self.protos[members[0]].encode_base(self.master, accepted) for members in self.members]

    def send(self, downloads: list[torch.Tensor], what: str) -> None:
        """Each format's download to the workers that store it."""
        for buf, group in zip(downloads, self.groups):
            self.exchange.broadcast(buf, what, group=group)

    def run(self) -> dict:
        try:
            control = self.handshake()  # raises if this server or a worker could not set up
            if control.finished:  # the run directory has said so
                return self.start.finished
            return self.train(control)
        finally:
            self.rundir.unlock()

    # the loop ----------------------------------------------------------------------------
    def train(self, control: Control) -> dict:
        cfg, ex, protos = self.cfg, self.exchange, self.protos
        k, steps, T, batch = cfg.worker.heads, cfg.train.steps, cfg.lte.merge_every, cfg.train.batch_size
        state = self.start.state or {}
        state_sizes, upload_sizes = [p.state.nbytes for p in protos], [p.upload.nbytes for p in protos]
        head_keys = list(protos[0].heads)
        if control.resume:
            ex.scatter([p.state.pack(w) for p, w in zip(protos, state["workers"])], state_sizes,
                       "the checkpoint restore", checkpoint=True)
            torch.set_rng_state(state["rng"])
            ex.add(state["comm"])
        everyone = torch.ones(self.workers, dtype=torch.int64)
        last_download = self.encode(everyone)
        self.send(last_download, "the initial base download")

        log = RunLog(self.rundir.path, cfg.to_dict(), wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                     wandb_mode=cfg.log.wandb_mode)
        if control.resume:
            log.say(f"resumed from {self.start.path} at step {control.step}")
        log.say(self.describe())
        step, merges = control.step, control.merges
        earlier = state.get("totals", {"wall_s": 0.0, "attempts": 0, "rounds_timed": 0, **dict.fromkeys(PHASES, 0.0)})
        rejected, totals = state.get("rejected_heads", 0), dict(earlier)
        last_eval, wall0 = state.get("last_eval", {}), time.perf_counter()
        round_end = wall0

        def collect(what: str):
            """The workers' state for a checkpoint, and the byte counters just before it was sent."""
            snapshot = ex.snapshot()  # taken before the state upload, as the workers take theirs
            return snapshot, ex.gather(None, state_sizes, what, checkpoint=True)

        def write(snapshot, states, **extra) -> None:
            running = {**totals, "wall_s": earlier["wall_s"] + time.perf_counter() - wall0,
                       "attempts": earlier["attempts"] + 1}
            self.rundir.save_checkpoint({
                "master": self.model.state_dict(), "merges": merges, "rejected_heads": rejected,
                "rng": torch.get_rng_state(), "comm": snapshot, "totals": running, "last_eval": last_eval,
                "workers": [{n: t.clone() for n, t in p.state.unpack(b).items()} for p, b in zip(protos, states)],
                **extra}, step)

        while step < steps:
            round_steps = min(T, steps - step)
            if cfg.dist.sync_phases:  # wait out the workers' compute so upload_s is the transfer alone
                ex.barrier("the pre-upload barrier")
            t0 = time.perf_counter()
            uploads = ex.gather(None, upload_sizes, f"the upload of round {merges + 1}")
            t1 = time.perf_counter()
            views = [p.upload.unpack(buf) for p, buf in zip(protos, uploads)]
            accepted = torch.tensor([int(all(torch.isfinite(v[n]).all() for n in p.uploaded))
                                     for p, v in zip(protos, views)])
            kept = [p.factors(v, seed=cfg.seed, first_head=w * k, draw=merges)
                    for w, (p, v, ok) in enumerate(zip(protos, views, accepted)) if ok]
            if kept:
                heads = {n: torch.cat([v[n] for v in kept]).to(self.env.device) for n in head_keys}
                core.merge_into(self.master, heads, protos[0].spec)
            bad = [w + 1 for w, ok in enumerate(accepted) if not ok]
            if bad:
                rejected += k * len(bad)
                log.say(f"round {merges + 1}: rejected the non-finite update of worker rank(s) {bad}; "
                        "their heads restart")
            last_download = self.encode(accepted)
            t2 = time.perf_counter()
            self.send(last_download, f"the download of round {merges + 1}")
            t3 = time.perf_counter()
            step, merges = step + round_steps, merges + 1
            kept_stats = [v["stats"][:len(STATS)] for v, ok in zip(views, accepted) if ok]
            stats = torch.stack(kept_stats) if kept_stats else torch.full((1, len(STATS)), float("nan"))
            chunk_losses = {str(w + 1): v["stats"][len(STATS):].tolist()  # local chunks: each chunk's mean loss
                            for w, (p, v) in enumerate(zip(protos, views)) if p.chunks > 1}
            times = {"compute_s": stats[:, 1].mean().item(), "upload_s": t1 - t0, "merge_s": t2 - t1,
                     "download_s": t3 - t2}
            for name in PHASES:
                totals[name] += times[name]
            totals["rounds_timed"] += 1

            row = {"loss": stats[:, 0].mean().item(), "merges": merges, "rejected_heads": rejected,
                   "samples_per_s": round_steps * batch / max(t3 - round_end, 1e-9),
                   **{f"round_{n}": v for n, v in times.items()}}
            if chunk_losses:
                row["chunk_losses"] = chunk_losses
            evaluated = step == steps or (cfg.eval.every and merges % cfg.eval.every == 0)
            if evaluated:
                last_eval = evaluate(self.model, self.eval_set, self.data.task, self.env.device,
                                     cfg.train.precision)
                row.update({f"eval_{n}": v for n, v in last_eval.items()})
            if cfg.checkpoint.every and merges % cfg.checkpoint.every == 0 and step < steps:
                write(*collect(f"the checkpoint upload of round {merges}"))  # the last step's comes below
            if evaluated or step // cfg.train.log_every != (step - round_steps) // cfg.train.log_every:
                log.log(step, row)
                log.say(progress_line(step, steps, row))
            round_end = time.perf_counter()

        expected = {}  # each worker must hold the server's last encoding in its own format
        for members, buf in zip(self.members, last_download):
            p = protos[members[0]]
            expected.update({w: p.base_digest(p.download.unpack(buf)) for w in members})
        digests = [int(DIGEST.unpack(b)["digest"][0]) for b in ex.gather(None, DIGEST.nbytes, "the final base check")]
        final_state = collect("the final checkpoint upload")
        mismatched = [w + 1 for w, d in enumerate(digests) if d != expected[w]]
        if mismatched:
            log.say(f"error: worker rank(s) {mismatched} ended with a base that differs from the server's")
        per_rank = ex.counters()
        wall = earlier["wall_s"] + time.perf_counter() - wall0
        workers = [r for r in per_rank if r["rank"] != 0]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        options = [cfg.worker_options(w + 1) for w in range(self.workers)]
        summary = {
            "mode": "ps", "steps": step, "samples_seen": step * batch, "merges": merges, "eval": last_eval,
            "wall_s": wall, "samples_per_s": step * batch / max(wall, 1e-9), "attempts": earlier["attempts"] + 1,
            **peak_memory(self.env.device), "device": str(self.env.device), "heads": cfg.lte.heads,
            "workers": self.workers, "worker_heads": k, "base_dtype": cfg.worker.base_dtype,
            "worker_options": [{"rank": w + 1, "base_dtype": o.base_dtype, "activations": o.activations,
                                "velora_subtoken": o.velora_subtoken if o.activations == "velora" else None,
                                "chunks": o.chunks, "upload_bytes_per_round": p.upload.nbytes,
                                "download_bytes_per_round": p.download.nbytes}
                               for w, (o, p) in enumerate(zip(options, protos))],
            "rejected_heads": rejected, "base_check": "mismatch" if mismatched else "match",
            "round_time": {n: totals[n] / max(totals["rounds_timed"], 1) for n in PHASES},
            "comm": {"per_rank": per_rank,
                     "bytes_per_step_per_worker": sum(r["bytes_sent"] + r["bytes_received"] for r in workers)
                     / len(workers) / max(step, 1),
                     # per worker, averaged over the workers (they differ when worker.per_rank mixes options)
                     "upload_bytes_per_round": mean([p.upload.nbytes for p in protos]),
                     "download_bytes_per_round": mean([p.download.nbytes for p in protos]),
                     # per step once started: without the start-up handshake and first base download
                     "steady_bytes_per_step_per_worker": mean([p.upload.nbytes + p.download.nbytes for p in protos]) / T},
        }
        self.rundir.write_results(summary, {n: t.detach().clone() for n, t in self.model.state_dict().items()})
        write(*final_state, finished=True, summary=summary)
        log.finish(summary)
        log.say(f"summary: eval {last_eval}, {merges} merges, {rejected} rejected heads, "
                f"{summary['comm']['bytes_per_step_per_worker']:,.0f} bytes per step per worker")
        return summary

    def describe(self) -> str:
        cfg = self.cfg
        workers = []
        for w, p in enumerate(self.protos):
            o = cfg.worker_options(w + 1)
            extra = "".join([f", velora M={o.velora_subtoken}" if o.activations == "velora" else "",
                             ", lora_fa" if o.activations == "lora_fa" else "",
                             f", {o.chunks} chunks" if o.chunks > 1 else ""])
            workers.append(f"rank {w + 1}: base {o.base_dtype}{extra}, upload {p.upload.nbytes:,} B and download "
                           f"{p.download.nbytes:,} B per round")
        return (f"parameter server on {self.env.device} ({self.env.backend}), {self.workers} workers x "
                f"{cfg.worker.heads} heads = {cfg.lte.heads} heads of rank {cfg.lte.rank}, merge every "
                f"{cfg.lte.merge_every} steps; {cfg.model.name} on {cfg.data.name}, batch {cfg.train.batch_size}, "
                f"{cfg.train.steps} steps; " + "; ".join(workers))
