"""Who belongs to an elastic run (lte-train serve / join): the server's door, the join, and the links.

Built on torch.distributed's own pieces, not on a protocol of ours: the server hosts a TCPStore
(the key-value store torchrun's rendezvous uses), a worker knocks by writing a request under a
ticket it takes from the store's counter, and each admitted worker gets its own two-rank Gloo
process group with the server (a `Link`), made from a PrefixStore of that store. A link that
breaks (the worker was killed, its node lost) fails only the calls on that link: the server drops
that worker and the others go on, which one process group over every rank cannot do (a dead rank
fails every collective of the group; torchrun then restarts everyone).

The door: every request names the config's digest, and the server refuses one that differs. With
a join token (LTE_JOIN_TOKEN in the environment of the server and the workers, never on a command
line), a request also proves that it knows the token (an HMAC of the run's nonce, the ticket and
the digest), and the admitted worker's link lives under a key prefix derived from the token, which
nobody without it can name. A server listening beyond loopback refuses to start without a token.
With a token every message on a link is signed too: an HMAC over its bytes, its direction and
its sequence number on the link, keyed from the token, the run's nonce and the ticket, follows it;
a message that fails its check (altered, replayed, reordered) ends that link with a one-line reason,
and nothing of it is used. What this does not do: encrypt the traffic (use a private network or a
tunnel between sites, e.g. WireGuard or an SSH tunnel to the server's port), or stop someone who can
reach the store from filling it with requests.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import struct
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import faults
from ..errors import UserError
from .comm import PeerError

TOKEN_ENV = "LTE_JOIN_TOKEN"


def config_digest(cfg) -> str:
    """What every member of a run must share: its config, every key."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def join_token() -> bytes:
    return os.environ.get(TOKEN_ENV, "").encode()


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except (socket.gaierror, ValueError):
        return False


def _proof(token: bytes, *parts) -> str:
    return hmac.new(token, "/".join(str(p) for p in parts).encode(), hashlib.sha256).hexdigest()


MAC_BYTES = 32  # an HMAC-SHA256 after every message of a signed link


class LinkRefused(PeerError):
    """A message on a signed link failed its check."""


class Link:
    """A server and one worker: a two-rank Gloo group (rank 0 the server), with byte counters, its
    messages signed when it has a key.

    It offers the worker the two calls of Exchange that a ps worker makes (gather: send to the
    server; broadcast: receive from it), so the worker's upload and install run over it unchanged."""

    def __init__(self, store: dist.Store, prefix: str, rank: int, host: str, timeout_s: float,
                 key: bytes | None = None):
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timedelta(seconds=timeout_s)
        # on loopback, bind there; otherwise the interface GLOO_SOCKET_IFNAME names (or the host's)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if is_loopback(host)
                            else dist.ProcessGroupGloo.create_default_device()]
        self.rank, self.timeout = rank, timedelta(seconds=timeout_s)
        try:
            self.group = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, 2, options)
        except (RuntimeError, dist.DistError) as exc:
            raise PeerError(f"could not connect the link ({_first_line(exc)})") from None
        self.sent = self.received = 0
        self.key, self.sent_seq, self.received_seq = key, 0, 0
        self.fault = None          # flip | replay: the next message, for tests (lte.faults)
        # the last message sent of each size, with its MAC: what a replay sends (kept under LTE_FAULT only)
        self._last: dict | None = {} if faults.armed() else None

    def send(self, buf: torch.Tensor, what: str) -> None:
        payload = buf.contiguous()
        mac = self._mac(self.rank, self.sent_seq, payload) if self.key else None
        payload, mac = self._faulty(payload, mac)
        self._raw(lambda: self.group.send([payload], 1 - self.rank, 0), what)
        if mac is not None:
            self._raw(lambda: self.group.send([mac], 1 - self.rank, 0), what)
        if self._last is not None:
            self._last[payload.numel() * payload.element_size()] = (payload, mac)
        self.sent_seq += 1
        self.sent += payload.numel() * payload.element_size() + (MAC_BYTES if mac is not None else 0)

    def recv(self, buf: torch.Tensor, what: str) -> torch.Tensor:
        self._raw(lambda: self.group.recv([buf], 1 - self.rank, 0), what)
        if self.key:
            mac = torch.empty(MAC_BYTES, dtype=torch.uint8)
            self._raw(lambda: self.group.recv([mac], 1 - self.rank, 0), what)
            if not hmac.compare_digest(mac.numpy().tobytes(),
                                       self._mac(1 - self.rank, self.received_seq, buf).numpy().tobytes()):
                peer = "the server" if self.rank == 1 else "the worker"
                raise LinkRefused(f"{what}: message {self.received_seq} from {peer} failed its signature check "
                                  "(altered, replayed or out of order); the link is closed")
        self.received_seq += 1
        self.received += buf.numel() * buf.element_size() + (MAC_BYTES if self.key else 0)
        return buf

    def _mac(self, sender: int, seq: int, payload: torch.Tensor) -> torch.Tensor:
        """HMAC-SHA256 of (who sent it, its sequence number, its bytes) under the link's key."""
        h = hmac.new(self.key, struct.pack("<BQ", sender, seq), hashlib.sha256)
        h.update(payload.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)

    def _faulty(self, payload: torch.Tensor, mac):
        """A fault's message in place of this one (tests): a byte flipped after signing, or the last
        message of the same size sent again."""
        fault, self.fault = self.fault, None
        if fault == "flip":
            payload = payload.clone()
            payload.view(-1).view(torch.uint8)[0] ^= 1
        elif fault == "replay" and self._last is not None:
            payload, mac = self._last.get(payload.numel() * payload.element_size(), (payload, mac))
        return payload, mac

    def send_sized(self, buf: torch.Tensor, what: str) -> None:
        """A message whose size the receiver does not know (a compressed download): its size, then it."""
        self.send(torch.tensor([buf.numel()], dtype=torch.int64), what)
        self.send(buf, what)

    # the worker's side of Exchange
    def gather(self, buf: torch.Tensor, nbytes, what: str, checkpoint: bool = False) -> None:
        self.send(buf, what)

    def broadcast(self, buf: torch.Tensor, what: str, group=None) -> torch.Tensor:
        return self.recv(buf, what)

    def broadcast_sized(self, buf: None, what: str, group=None) -> torch.Tensor:
        """The receiving end of send_sized."""
        size = int(self.recv(torch.empty(1, dtype=torch.int64), what)[0])
        return self.recv(torch.empty(size, dtype=torch.uint8), what)

    def barrier(self, what: str) -> None:
        """Members come and go: an elastic run has no barrier (dist.sync_phases does nothing)."""

    def close(self) -> None:
        try:
            self.group.abort()  # a receive still waiting on a dead or dropped peer returns at once
        except (RuntimeError, AttributeError):
            pass

    def _raw(self, post, what: str) -> None:
        try:
            post().wait(self.timeout)
        except (RuntimeError, dist.DistError) as exc:
            peer = "the server" if self.rank == 1 else "the worker"
            raise PeerError(f"{what}: {peer} is gone or did not answer within dist.timeout_s="
                            f"{self.timeout.total_seconds():g}s ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


@dataclass
class Knock:
    """A worker's request to join, as the door read it."""

    ticket: int
    digest: str
    proof: str
    slot: int | None   # the worker slot it asks for (None: any free one)
    name: str          # how it calls itself, for the log


class Door:
    """The server's side: a store on host:port, the requests that arrive, admission and refusal."""

    def __init__(self, host: str, port: int, digest: str, timeout_s: float):
        self.token = join_token()
        if not is_loopback(host) and not self.token:
            raise UserError(f"lte-train serve --host {host} listens beyond loopback: set {TOKEN_ENV} (a shared "
                            "secret, the same for the server and its workers) in the environment")
        self.host, self.digest, self.timeout_s = host, digest, timeout_s
        try:
            self.store = dist.TCPStore(host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)
        except (RuntimeError, dist.DistError) as exc:
            raise UserError(f"cannot listen on {host}:{port} ({_first_line(exc)})") from None
        self.port = self.store.port
        self.nonce = secrets.token_hex(16)
        self.store.set("run/nonce", self.nonce)
        self.tickets = 0            # tickets handed out so far
        self.waiting: set[int] = set()  # tickets taken whose request has not arrived yet

    def knocks(self) -> list[Knock]:
        """The requests that arrived since the last call (never blocks). A ticket whose request never
        comes (its worker died in between) holds up no other."""
        issued = self.store.add("tickets", 0)
        self.waiting.update(range(self.tickets + 1, issued + 1))
        self.tickets = issued
        out = []
        for t in sorted(self.waiting):
            if not self.store.check([f"knock/{t}"]):
                continue
            self.waiting.discard(t)
            try:
                raw = json.loads(self.store.get(f"knock/{t}"))
                out.append(Knock(t, str(raw["digest"]), str(raw["proof"]),
                                 None if raw.get("slot") is None else int(raw["slot"]), str(raw.get("name", ""))[:64]))
            except (ValueError, KeyError, TypeError):
                self._answer(t, {"refused": "the request is not one lte-train join writes"})
        return out

    def check(self, knock: Knock) -> str | None:
        """Why the request is refused, or None."""
        if self.token and not hmac.compare_digest(knock.proof, _proof(self.token, self.nonce, knock.ticket,
                                                                     knock.digest)):
            return f"no valid join token ({TOKEN_ENV})"
        if knock.digest != self.digest:
            return (f"a different config (digest {knock.digest}, the run's is {self.digest}): join with the "
                    "server's config")
        return None

    def refuse(self, knock: Knock, reason: str) -> None:
        self._answer(knock.ticket, {"refused": reason})

    def admit(self, knock: Knock, slot: int) -> Link:
        self._answer(knock.ticket, {"slot": slot})
        return Link(self.store, _link_prefix(self.token, self.nonce, knock.ticket), 0, self.host, self.timeout_s,
                    key=_mac_key(self.token, self.nonce, knock.ticket))

    def _answer(self, ticket: int, answer: dict) -> None:
        self.store.set(f"answer/{ticket}", json.dumps(answer))


def _link_prefix(token: bytes, nonce: str, ticket: int) -> str:
    return f"link/{_proof(token, nonce, ticket, 'link')[:32]}/"


def _mac_key(token: bytes, nonce: str, ticket: int) -> bytes | None:
    """The key a link's messages are signed with (None without a token: unsigned, loopback only)."""
    return bytes.fromhex(_proof(token, nonce, ticket, "mac")) if token else None


def join(host: str, port: int, digest: str, slot: int | None, timeout_s: float, name: str = "") -> tuple[Link, int]:
    """Knock on the server's door; the link and the worker slot it gave, or a UserError saying why not."""
    token = join_token()
    try:
        store = dist.TCPStore(host, port, None, False, timedelta(seconds=timeout_s))
        nonce = store.get("run/nonce").decode()
        ticket = store.add("tickets", 1)
        store.set(f"knock/{ticket}", json.dumps({"digest": digest, "proof": _proof(token, nonce, ticket, digest),
                                                 "slot": slot, "name": name or socket.gethostname()}))
        answer = json.loads(store.get(f"answer/{ticket}"))
    except (RuntimeError, dist.DistError) as exc:
        raise UserError(f"no answer from a server at {host}:{port} ({_first_line(exc)})") from None
    if "refused" in answer:
        raise UserError(f"the server refused this worker: {answer['refused']}")
    return (Link(store, _link_prefix(token, nonce, ticket), 1, host, timeout_s, key=_mac_key(token, nonce, ticket)),
            int(answer["slot"]))
