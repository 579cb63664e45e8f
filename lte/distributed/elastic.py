"""Elastic parameter-server runs: `lte-train serve` and `lte-train join`, each its own command.

Workers come and go without stopping the run. The server (ElasticServer: the server core of
lte.distributed.server, with this transport) owns one Link per worker (lte.distributed.membership)
and one thread per link that sends that worker its downloads and receives its uploads, so a worker
that dies or hangs breaks only its own link. The worker slots are the ps mode's worker ranks
(lte.heads / worker.heads of them, each with its heads, data streams and worker.per_rank options);
a worker joining takes a free slot.

A round, on the server: wait until every member of the round has uploaded against the current
base, or, with dist.round_deadline_s, until the deadline has passed and at least one has; merge
the heads that came (N = the heads kept); encode; reply to those members and to the workers that
joined meanwhile. An upload that arrives after its round closed is late: it is dropped, and its
worker gets the current base at once and trains on (its heads restart, as after a rejected
update). A worker that joins gets the current base, the step and the merge count, so its learning
rate and data streams continue where the run is, and its heads start afresh. A worker that leaves
is dropped from the round; the run ends with the workers that are left, and waits (up to
dist.timeout_s) for one to join when none is. Every download carries a header: the merge count,
the step, whether to stop, and whether this worker's last upload was merged.

Checkpoints hold the server's state only (the master, its outer step, the loop, the members'
counts); after a server restart the workers join again and start their heads afresh.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .. import core, faults
from ..core.algebra import HEADS_SUFFIX
from ..errors import UserError
from ..runtime.config import Config, resolve_heads
from ..runtime.log import say
from .comm import PeerError, counter_row
from .env import DistEnv, wants_cuda
from .handshake import DIGEST
from .membership import Door, Knock, Link, config_digest, join
from .server import Closing, ParameterServer, Progress, Uploads
from .worker import Route, Worker

HEADER = ("merges", "step", "stop", "accepted")  # server -> worker, before each download
DOWN = torch.int64
UP_HEADER = 1  # worker -> server, before each upload: the merge count of the base it trained against


def slots_of(cfg: Config) -> Config:
    """An elastic run's config with lte.heads and worker.heads filled in (its worker slots =
    lte.heads / worker.heads), or a UserError."""
    if cfg.mode != "ps":
        raise UserError(f"lte-train serve and join run mode=ps (the config says mode={cfg.mode}): set mode=ps")
    n, k = cfg.lte.heads, cfg.worker.heads
    if n is None or k is None:
        raise UserError("an elastic run needs lte.heads and worker.heads both set: its worker slots are "
                        "lte.heads / worker.heads")
    if n % k:
        raise UserError(f"lte.heads={n} is not a multiple of worker.heads={k}")
    if cfg.dist.servers != 1:
        raise UserError("an elastic run has one server process: dist.servers must be 1")
    if cfg.dist.emulate_link_mbps:
        raise UserError("dist.emulate_link_mbps slows the links of torchrun runs; an elastic run's links are real: "
                        "set it to 0")
    if cfg.comm.overlap:
        raise UserError("an elastic run merges what each round brings: comm.overlap (uploads one round stale) "
                        "runs under torchrun only; set comm.overlap=false")
    return resolve_heads(cfg, n // k)


def _header(merges: int, step: int, stop: bool = False, accepted: bool = False) -> torch.Tensor:
    return torch.tensor([merges, step, int(stop), int(accepted)], dtype=DOWN)


# the server -------------------------------------------------------------------------------------
@dataclass
class Member:
    """A worker in the run, as the server sees it. Its thread does all the talking on its link;
    the main loop hands it replies through `replies` and hears from it through the inbox."""

    slot: int
    link: Link
    name: str
    stream: object = None     # its download stream (lte.core.download): what this worker holds
    replies: queue.Queue = field(default_factory=queue.Queue)
    waiting: bool = True      # it waits for a reply (its upload, or its start, was the last word)
    ready: bool = False       # it has built its model and waits for its first base
    started: bool = False     # it has had its first base


@dataclass
class SlotRecord:
    """What a worker slot did over the run: for the summary and checkpoints."""

    joins: int = 0
    contributed: list = field(default_factory=list)  # the merges (1-based) its heads took part in
    late: int = 0
    stale: int = 0            # of its late uploads, those merged one round stale (dist.late=stale)
    dropped: int = 0          # rounds it left in the middle of (died, hung past dist.timeout_s)
    sent: int = 0             # bytes of links that have closed (open links count their own)
    received: int = 0

    def describe(self, slot: int) -> dict:
        return {"rank": slot + 1, "joins": self.joins, "rounds_contributed": len(self.contributed),
                "rounds_late": self.late, "rounds_merged_stale": self.stale, "rounds_dropped": self.dropped,
                "rounds": _spans(self.contributed)}


def _spans(numbers: list[int]) -> list[list[int]]:
    """[1, 2, 3, 7, 8] -> [[1, 3], [7, 8]]: the merges a worker took part in, readably."""
    out: list[list[int]] = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


class ElasticServer(ParameterServer):
    def __init__(self, cfg: Config, host: str, port: int):
        cfg = slots_of(cfg)
        slots = cfg.lte.heads // cfg.worker.heads
        try:
            super().__init__(cfg, torch.device("cuda" if cfg.dist.ps_device == "cuda" else "cpu"), slots,
                             backend="gloo")
            if self.start.finished is not None:
                return  # nothing to serve: the run in out_dir is done
            self.door = Door(host, port, config_digest(cfg), cfg.dist.timeout_s)
        except UserError:
            self.rundir.unlock()
            raise
        self.min_workers = cfg.dist.min_workers or slots
        self.inbox: queue.Queue = queue.Queue()
        self.members: dict[int, Member] = {}  # the workers in the run, by slot
        self.records = [SlotRecord() for _ in range(slots)]
        self.on_time: dict[int, torch.Tensor] = {}  # this round's uploads, by slot
        self.merged = torch.zeros(slots, dtype=torch.int64)  # the slots the last merge took
        self.stale: list = []  # late uploads the next merge takes (dist.late=stale)
        self.replicas_before: dict[str, torch.Tensor] = {}
        self.stopping = False
        say(f"lte-train serve: listening on {host}:{self.door.port} for {slots} worker slot(s); "
            f"join with: lte-train join --server {host}:{self.door.port} --config ... (same config)")

    # membership ------------------------------------------------------------------------------
    def admit_knocks(self) -> None:
        for knock in self.door.knocks():
            reason = self.door.check(knock) or self._slot_problem(knock)
            if reason:
                self.door.refuse(knock, reason)
                self._say(f"refused worker {knock.name!r} (request {knock.ticket}): {reason}")
                continue
            slot = knock.slot if knock.slot is not None else min(set(range(len(self.records))) - set(self.members))
            try:
                link = self.door.admit(knock, slot)
            except PeerError as exc:
                self._say(f"worker {knock.name!r} left while joining ({exc})")
                continue
            # per worker: each holds the download sequence it was sent (it may have joined late)
            stream = self.cfg.comm.download_strategy().stream(self.protos[slot].download.nbytes,
                                                              self.protos[slot].download_values)
            member = self.members[slot] = Member(slot, link, knock.name, stream)
            self.records[slot].joins += 1
            threading.Thread(target=self._talk, args=(member,), daemon=True, name=f"lte-link-{slot + 1}").start()
            self._say(f"worker {knock.name!r} joined as rank {slot + 1} ({len(self.members)} of "
                      f"{len(self.records)} slots filled)")

    def _slot_problem(self, knock: Knock) -> str | None:
        if self.stopping:
            return "the run is ending"
        if knock.slot is None:
            return None if len(self.members) < len(self.records) else f"all {len(self.records)} worker slots are taken"
        if not 0 <= knock.slot < len(self.records):
            return f"slot {knock.slot} does not exist (this run has slots 0..{len(self.records) - 1})"
        return f"slot {knock.slot} is taken" if knock.slot in self.members else None

    def _talk(self, m: Member) -> None:
        """A member's thread: each reply the main loop gives, then the worker's next upload."""
        proto = self.protos[m.slot]
        try:
            failed = int(m.link.recv(torch.empty(1, dtype=DOWN), "the worker's start")[0])
            self.inbox.put((m, "gone" if failed else "ready", "it could not start (see its error)"))
            if failed:
                return
            while True:
                header, download = m.replies.get()
                m.link.send(header, "a download header")
                payload = m.stream.encode(download)
                (m.link.send_sized if m.stream.sized else m.link.send)(payload, "a download")
                if header[2]:  # stop: the worker answers with the digest of the base it holds
                    self.inbox.put((m, "digest", m.link.recv(DIGEST.empty(), "the final base check")))
                    return
                tag = m.link.recv(torch.empty(UP_HEADER, dtype=DOWN), "an upload header")
                self.inbox.put((m, "upload", (int(tag[0]), m.link.recv(proto.upload.empty(), "an upload"))))
        except PeerError as exc:
            self.inbox.put((m, "gone", str(exc)))

    def held_download(self, w: int) -> torch.Tensor:
        return self.members[w].stream.holds(super().held_download(w))

    def reply(self, m: Member, progress: Progress, accepted: bool, stop: bool = False) -> None:
        buf = self.last_download[self.format_of(m.slot)]
        m.waiting, m.started = False, True
        m.replies.put((_header(progress.merges, progress.step, stop, accepted), buf))

    def pump(self, progress: Progress, wait_s: float) -> tuple | None:
        """Admit new workers, then handle one message from a member (waiting up to wait_s for it).
        An upload against an older base is late: its worker gets the current base straight away."""
        self.admit_knocks()
        try:
            m, kind, payload = self.inbox.get(timeout=wait_s)
        except queue.Empty:
            return None
        if kind == "ready":
            m.ready = True
        elif kind == "gone":
            self._leave(m, payload, progress)
        elif kind == "upload":
            tag, buf = payload
            m.waiting = True
            if tag == progress.merges and not self.stopping:
                self.on_time[m.slot] = buf
            elif not self.stopping:
                self.late(m, tag, buf, progress)
        return m, kind, payload

    def late(self, m: Member, tag: int, buf: torch.Tensor, progress: Progress) -> None:
        """An upload after its round closed: with dist.late=stale one round late (and finite), merged
        into the next merge; else dropped. Its worker gets the current base at once."""
        self.records[m.slot].late += 1
        proto = self.protos[m.slot]
        view = proto.upload.unpack(buf)
        stale = self.cfg.dist.late == "stale" and tag == progress.merges - 1 and proto.finite(view)
        if stale:
            if not proto.changes:  # replica values trained from the previous base: as values against this one
                for name in proto.spec.replicas:
                    copies = view[name + HEADS_SUFFIX]
                    copies += (self.master[name] - self.replicas_before[name]).to(copies)
            self.stale.append((m.slot, view, tag))
            self.records[m.slot].stale += 1
        self._say(f"rank {m.slot + 1} was late for round {tag + 1}: its upload is "
                  f"{'merged one round stale' if stale else 'dropped'}")
        self.reply(m, progress, accepted=stale)

    def _leave(self, m: Member, why: str, progress: Progress) -> None:
        if self.members.get(m.slot) is not m:
            return
        del self.members[m.slot]
        record = self.records[m.slot]
        record.sent, record.received = record.sent + m.link.received, record.received + m.link.sent
        if m.started and not m.waiting and not self.stopping:
            record.dropped += 1
        self.on_time.pop(m.slot, None)
        m.link.close()
        if not self.stopping:
            self._say(f"rank {m.slot + 1} left at round {progress.merges + 1}: {why}")

    def _say(self, text: str) -> None:
        (self.log.say if self.log is not None else say)(text)

    # the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            if self.start.finished is not None:
                return self.start.finished
            state = self.start.state or {}
            return self.train(state.get("step", 0), state.get("merges", 0), resume=bool(state))
        finally:
            self.rundir.unlock()

    def resume(self, progress: Progress) -> None:
        for record, saved in zip(self.records, self.start.state.get("elastic", [])):
            vars(record).update(saved)

    def open(self, progress: Progress) -> None:
        """Wait for dist.min_workers to be ready, then start the first round."""
        deadline = time.perf_counter() + self.cfg.dist.timeout_s
        while sum(m.ready for m in self.members.values()) < self.min_workers:
            if time.perf_counter() > deadline:
                raise UserError(f"only {sum(m.ready for m in self.members.values())} worker(s) joined and started "
                                f"within dist.timeout_s="
                                f"{self.cfg.dist.timeout_s:g}s; dist.min_workers={self.min_workers}")
            self.pump(progress, 0.1)
        self.open_round(progress)

    def open_round(self, progress: Progress) -> None:
        """Send the current base to every member waiting for it (the round's members)."""
        for m in self.members.values():
            if m.waiting and m.ready:
                self.reply(m, progress, accepted=m.slot in self.on_time and bool(self.merged[m.slot]))
        self.on_time, self.opened = {}, time.perf_counter()

    def collect(self, progress: Progress) -> Uploads:
        """This round's uploads: every member's, or at the deadline the ones that came."""
        limit = self.cfg.dist.round_deadline_s
        quiet_since = time.perf_counter()
        while True:
            now = time.perf_counter()
            due = [s for s, m in self.members.items() if m.started and s not in self.on_time]
            if self.on_time and (not due or (limit and now - self.opened >= limit)):
                break
            if not self.members and now - quiet_since > self.cfg.dist.timeout_s:
                raise UserError(f"every worker has left and none joined within dist.timeout_s="
                                f"{self.cfg.dist.timeout_s:g}s")
            if self.members:
                quiet_since = now
            if not due and not self.on_time:  # nobody is training this round: start the ones waiting
                self.open_round(progress)
            self.pump(progress, 0.05)
        views: list = [None] * self.workers
        for slot, buf in self.on_time.items():
            views[slot] = self.protos[slot].upload.unpack(buf)
        uploads = self.uploads(views, time.perf_counter() - self.opened)
        uploads.stale, self.stale = self.stale, []
        if self.cfg.dist.late == "stale":  # the replicas as this merge finds them: what uploads now late trained from
            self.replicas_before = {n: self.master[n].detach().clone() for n in self.protos[0].spec.replicas}
        return uploads

    def deliver(self, uploads: Uploads, progress: Progress) -> None:
        """The round's members get the new base; the last round's get it with the order to stop (close)."""
        merged = {slot for slot, ok in enumerate(uploads.accepted) if ok} | {slot for slot, _, _ in uploads.stale}
        for slot in sorted(merged):
            self.records[slot].contributed.append(progress.merges)
        self.merged = uploads.accepted
        if progress.step < self.cfg.train.steps:
            self.open_round(progress)

    def checkpoint_parts(self, progress: Progress, final: bool) -> dict:
        records = [dict(vars(r)) for r in self.records]
        for slot, m in self.members.items():  # the bytes of links still open, so far
            records[slot]["sent"] += m.link.received
            records[slot]["received"] += m.link.sent
        return {"elastic": records}

    def close(self, progress: Progress) -> Closing:
        """Stop every member (the late ones once their upload is in) and check the base each holds."""
        self.stopping, digests = True, {}
        pending = dict(self.members)
        deadline = time.perf_counter() + self.cfg.dist.timeout_s
        while pending and time.perf_counter() < deadline:
            for slot, m in list(pending.items()):
                if m.waiting:
                    self.reply(m, progress, accepted=bool(self.merged[slot]), stop=True)
                    m.waiting = None  # stopped: only its digest (or its leaving) is still to come
            event = self.pump(progress, 0.05)
            if event is not None and event[1] in ("digest", "gone") and pending.get(event[0].slot) is event[0]:
                del pending[event[0].slot]
                if event[1] == "digest":
                    digests[event[0].slot] = int(DIGEST.unpack(event[2])["digest"][0])
        mismatched = [s + 1 for s, d in digests.items() if d != self.expected_digest(s)]
        for m in list(self.members.values()):
            self._leave(m, "the run ended", progress)
        return Closing(mismatched, self.counters(), self.checkpoint_parts(progress, final=True),
                       summary={"elastic": [r.describe(s) for s, r in enumerate(self.records)]})

    def counters(self) -> list[dict]:
        """Bytes per worker slot as the server counted them on its links (what the worker sent is
        what the server received), and the server's own totals as rank 0."""
        rows = [counter_row(s + 1, r.sent, r.received) for s, r in enumerate(self.records)]
        return [counter_row(0, sum(r["bytes_received"] for r in rows), sum(r["bytes_sent"] for r in rows))] + rows


# the worker -------------------------------------------------------------------------------------
class ElasticWorker(Worker):
    """A ps worker that joined through the door: it trains each round against the base the server
    last sent, whatever the round's number, and stops when the server says so. Its link is its one
    route (an elastic run has one server process)."""

    def __init__(self, cfg: Config, link: Link, slot: int, device: torch.device):
        slots = cfg.lte.heads // cfg.worker.heads
        super().__init__(cfg, DistEnv(slot + 1, slots + 1, 0, 1, device, "gloo"))
        if self.error is not None:
            raise self.error
        self.link = link
        self.routes = [Route(link, None, self.protos)]

    def run(self) -> None:
        first = True
        while True:
            header = dict(zip(HEADER, (int(v) for v in self.link.recv(torch.empty(len(HEADER), dtype=DOWN),
                                                                      "a download header"))))
            self.take_download(header, first)
            first = False
            if header["stop"]:
                self.send_digests()  # the server keeps no worker state: no state upload, no counters
                return
            loss, compute_s = self.train_round()
            self.link.fault = faults.link_fault(self.env.worker, header["merges"] + 1)  # tests: a bad message
            self.link.send(torch.tensor([header["merges"]], dtype=DOWN), "an upload header")
            self.upload(header["merges"] + 1, loss, compute_s)

    def take_download(self, header: dict, first: bool) -> None:
        """The server's base, then the heads for the round: afresh on joining; else as a ps worker's
        after a merge (restarted when its upload was dropped as late, or rejected). The merge count
        and the step are the server's, whichever rounds this worker missed."""
        model = self.engine.model
        self.receive_base(f"the download of round {header['merges']}")
        if first:
            core.set_merges_done(model, header["merges"])
            core.reset_heads(model)
        else:
            core.set_merges_done(model, header["merges"] - 1)  # the merge this download is the result of
            self.start_next_round(bool(header["accepted"]))
        self.engine.seek(header["step"])
        model.train()


# the commands -----------------------------------------------------------------------------------
def serve(cfg: Config, host: str, port: int) -> dict:
    return ElasticServer(cfg, host, port).run()


def join_run(cfg: Config, server: str, slot: int | None) -> None:
    cfg = slots_of(cfg)
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--server {server!r}: expected HOST:PORT")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if wants_cuda(cfg) else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    link, slot = join(host, int(port), config_digest(cfg), slot, cfg.dist.timeout_s)
    say(f"lte-train join: joined {server} as rank {slot + 1}")
    try:
        try:
            worker = ElasticWorker(cfg, link, slot, device)
        except UserError:
            link.send(torch.ones(1, dtype=DOWN), "the worker's start")
            raise
        link.send(torch.zeros(1, dtype=DOWN), "the worker's start")  # ready: the first round need not wait for a build
        worker.run()
    finally:
        link.close()


__all__ = ["serve", "join_run", "ElasticServer", "ElasticWorker", "slots_of"]
