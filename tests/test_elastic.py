"""Elastic parameter-server runs (lte-train serve / join) as separate processes on loopback: workers
that die, join late, straggle past the deadline, or knock with the wrong config or token."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import DIGITS, ROOT, child_env, final, metrics, run_command, small, summary, train_command
from lte.distributed.membership import Door, Knock, _proof
from lte.errors import UserError

COMMON = ["--config", DIGITS, *small("train.log_every=10"), "mode=ps", "lte.merge_every=10"]


class Run:
    """A server (lte-train serve --port 0) and the workers a test starts against it, each a process
    of its own with its output in a file under tmp_path."""

    def __init__(self, tmp_path, *overrides, env=None):
        self.tmp, self.overrides, self.procs = tmp_path, [*COMMON, *overrides, f"out_dir={tmp_path / 'run'}"], []
        self.server = self._start("server", ["serve", "--port", "0"], env)
        match = self.wait_for("server", r"listening on (127\.0\.0\.1:\d+)")
        self.address = match.group(1)

    def _start(self, name, args, env):
        out = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "lte.train", *args, *self.overrides], cwd=ROOT,
                                env=child_env({"OMP_NUM_THREADS": "1", **(env or {})}), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def join(self, name, *extra, env=None):
        return self._start(name, ["join", "--server", self.address, *extra], env)

    def output(self, name):
        return (self.tmp / f"{name}.log").read_text()

    def wait_for(self, name, pattern, timeout=120):
        t0 = time.time()
        while time.time() - t0 < timeout:
            match = re.search(pattern, self.output(name))
            if match:
                return match
            time.sleep(0.2)
        raise AssertionError(f"{name} never printed {pattern!r}:\n{self.output(name)[-3000:]}")

    def wait(self, proc, timeout=180):
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"a process did not finish:\n{self.output('server')[-3000:]}") from None

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture
def elastic(tmp_path):
    runs = []

    def start(*overrides, env=None):
        runs.append(Run(tmp_path, *overrides, env=env))
        return runs[-1]

    yield start
    for r in runs:
        r.kill()


def test_elastic_run_equals_simulated_heads(tmp_path, elastic):
    """Every worker present, no deadline: 2 joined workers x 2 heads == 4 simulated heads."""
    common = ["worker.base_dtype=fp32", "train.steps=30", "lte.heads=4", "worker.heads=2"]
    run = elastic(*common)
    workers = [run.join(f"w{i}") for i in range(2)]
    assert run.wait(run.server) == 0, run.output("server")
    assert all(run.wait(w) == 0 for w in workers), run.output("w0") + run.output("w1")
    code, out = run_command(train_command(*COMMON, *common, "mode=lte", f"out_dir={tmp_path / 'lte'}"))
    assert code == 0, out
    ps, sim = final(tmp_path / "run"), final(tmp_path / "lte")
    assert max((ps[k] - sim[k]).abs().max().item() for k in ps) < 1e-5
    s = summary(tmp_path / "run")
    assert s["base_check"] == "match" and s["merges"] == 3
    assert [r["rounds"] for r in s["elastic"]] == [[[1, 3]], [[1, 3]]]
    # what each worker moved, as the server counted it: 3 uploads with an 8-byte header each, the
    # 8-byte start message and the 8-byte final digest; 4 downloads (the first base, after rounds 1
    # and 2, and the final one that stops it) with a 32-byte header each
    up, down = s["comm"]["upload_bytes_per_round"], s["comm"]["download_bytes_per_round"]
    for row in s["comm"]["per_rank"][1:]:
        assert row["bytes_sent"] == 3 * (up + 8) + 8 + 8
        assert row["bytes_received"] == 4 * (down + 32)


def test_killed_worker_is_dropped_and_a_new_one_takes_its_slot(tmp_path, elastic):
    """kill -9 of rank 2 before its upload of round 3: the run goes on with ranks 1 and 3; a new
    worker takes slot 1 while rank 1 straggles in round 6 (no deadline: the round waits for rank 1),
    and its heads are merged from its first round on. The result stays close to an undisturbed run."""
    common = ["lte.heads=3", "worker.heads=1", "train.batch_size=48", "train.steps=100"]
    run = elastic(*common, "comm.download=delta")  # the joiner's stream starts from zeros
    w1 = run.join("w1", "--slot", "0", env={"LTE_FAULT": "sleep:rank=1:round=6:seconds=25"})
    w2 = run.join("w2", "--slot", "1", env={"LTE_FAULT": "kill:rank=2:round=3"})
    w3 = run.join("w3", "--slot", "2")
    run.wait_for("server", r"rank 2 left at round 3")
    assert run.wait(w2) != 0
    late = run.join("late", "--slot", "1")
    assert run.wait(run.server) == 0, run.output("server")
    assert all(run.wait(w) == 0 for w in (w1, w3, late)), run.output("late")
    s = summary(tmp_path / "run")
    assert s["steps"] == 100 and s["merges"] == 10 and s["base_check"] == "match"
    ranks = s["elastic"]
    assert ranks[0]["rounds"] == [[1, 10]] and ranks[2]["rounds"] == [[1, 10]]
    assert ranks[1]["joins"] == 2 and ranks[1]["rounds_dropped"] == 1
    assert ranks[1]["rounds"] == [[1, 2], [7, 10]]  # joined during round 6, in every round after it
    code, out = run_command(train_command(*COMMON, *common, "mode=lte", f"out_dir={tmp_path / 'whole'}"))
    assert code == 0, out
    assert s["eval"]["loss"] == pytest.approx(summary(tmp_path / "whole")["eval"]["loss"], rel=0.03)


def test_straggler_past_the_deadline_is_late_and_does_not_hold_the_round(tmp_path, elastic):
    run = elastic("lte.heads=4", "worker.heads=2", "train.steps=100", "dist.round_deadline_s=3", "comm.download=delta")
    w1 = run.join("w1", "--slot", "0")
    w2 = run.join("w2", "--slot", "1", env={"LTE_FAULT": "sleep:rank=2:round=3:seconds=7.5"})
    assert run.wait(run.server) == 0, run.output("server")
    assert run.wait(w1) == 0 and run.wait(w2) == 0
    s = summary(tmp_path / "run")
    assert s["merges"] == 10 and s["elastic"][0]["rounds"] == [[1, 10]]
    assert s["base_check"] == "match"  # delta downloads, one stream a worker: the late one's too
    straggler = s["elastic"][1]
    assert straggler["rounds_late"] == 1 and straggler["rounds_contributed"] < 10
    assert straggler["rounds"][0] == [1, 2] and straggler["rounds"][-1][1] == 10  # back in after the late round
    waits = [row["round_upload_s"] for row in metrics(tmp_path / "run")]
    assert max(waits) < 6, waits  # no round waited out the 7.5 s sleep
    assert "rank 2 was late for round 3" in run.output("server")


def test_an_upload_one_round_late_is_merged_stale_with_dist_late_stale(tmp_path, elastic):
    """Round 3 closes at its 3 s deadline without rank 2, whose upload comes during round 4: it goes
    into merge 4 (beside rank 2's own upload of round 4) instead of being dropped."""
    run = elastic("lte.heads=4", "worker.heads=2", "train.steps=100", "dist.round_deadline_s=3", "dist.late=stale")
    w1 = run.join("w1", "--slot", "0")
    w2 = run.join("w2", "--slot", "1", env={"LTE_FAULT": "sleep:rank=2:round=3:seconds=4.5"})
    assert run.wait(run.server) == 0, run.output("server")
    assert run.wait(w1) == 0 and run.wait(w2) == 0
    straggler = summary(tmp_path / "run")["elastic"][1]
    assert straggler["rounds_late"] == 1 and straggler["rounds_merged_stale"] == 1, straggler
    assert straggler["rounds"] == [[1, 2], [4, 10]], straggler
    assert "rank 2 was late for round 3: its upload is merged one round stale" in run.output("server")


def test_wrong_token_and_wrong_config_are_refused_while_the_run_goes_on(tmp_path, elastic):
    token = {"LTE_JOIN_TOKEN": "s3cret-for-the-test"}
    run = elastic("lte.heads=4", "worker.heads=2", "train.steps=20", env=token)
    intruder = run.join("intruder", env={"LTE_JOIN_TOKEN": "guess"})
    other = run.join("other", "lte.rank=4", env=token)
    assert run.wait(intruder) == 2 and run.wait(other) == 2
    assert "the server refused this worker: no valid join token (LTE_JOIN_TOKEN)" in run.output("intruder")
    assert "the server refused this worker: a different config" in run.output("other")
    assert len(re.findall(r"refused worker .*\n", run.output("server"))) == 2
    workers = [run.join(f"w{i}", env=token) for i in range(2)]
    assert run.wait(run.server) == 0, run.output("server")
    assert all(run.wait(w) == 0 for w in workers)
    assert summary(tmp_path / "run")["merges"] == 2
    assert "s3cret" not in run.output("server")


def test_the_door_checks_the_proof_and_refuses_to_open_beyond_loopback_without_a_token(monkeypatch):
    monkeypatch.delenv("LTE_JOIN_TOKEN", raising=False)
    with pytest.raises(UserError, match="listens beyond loopback: set LTE_JOIN_TOKEN"):
        Door("0.0.0.0", 0, "digest", 5)
    monkeypatch.setenv("LTE_JOIN_TOKEN", "t")
    door = Door("127.0.0.1", 0, "abc", 5)
    good = Knock(1, "abc", _proof(b"t", door.nonce, 1, "abc"), None, "w")
    assert door.check(good) is None
    assert "join token" in door.check(Knock(2, "abc", _proof(b"t", door.nonce, 1, "abc"), None, "w"))  # replayed
    assert "join token" in door.check(Knock(1, "abc", _proof(b"u", door.nonce, 1, "abc"), None, "w"))
    assert "different config" in door.check(Knock(3, "xyz", _proof(b"t", door.nonce, 3, "xyz"), None, "w"))


def test_bad_elastic_configs_are_refused_with_a_message(tmp_path):
    code, out = run_command([sys.executable, "-m", "lte.train", "serve", *COMMON[:-2], "lte.heads=4",
                             f"out_dir={tmp_path}"])
    assert code == 2 and "lte-train serve and join run mode=ps" in out
    code, out = run_command([sys.executable, "-m", "lte.train", "serve", *COMMON, f"out_dir={tmp_path}"])
    assert code == 2 and "needs lte.heads and worker.heads" in out
    code, out = run_command([sys.executable, "-m", "lte.train", "join", "--server", "nowhere", *COMMON,
                             "lte.heads=4", "worker.heads=2"])
    assert code == 2 and "expected HOST:PORT" in out
    code, out = run_command([sys.executable, "-m", "lte.train", "serve", *COMMON, "lte.heads=4", "worker.heads=2",
                             "comm.overlap=true", f"out_dir={tmp_path}"])
    assert code == 2 and "comm.overlap (uploads one round stale) runs under torchrun only" in out



def test_a_restarted_server_resumes_from_its_checkpoint_and_the_workers_join_again(tmp_path, elastic):
    common = ["lte.heads=4", "worker.heads=2", "train.steps=60", "checkpoint.every=2", "dist.timeout_s=60"]
    first = elastic(*common)
    workers = [first.join("w1", "--slot", "0", env={"LTE_FAULT": "sleep:rank=1:round=4:seconds=30"}),
               first.join("w2", "--slot", "1")]
    first.wait_for("server", r"step 30/60")  # round 4 waits for the sleeper: the last checkpoint is step 20's
    os.killpg(first.server.pid, signal.SIGKILL)
    assert first.wait(workers[1]) == 2  # the link to the server broke: an error, not a hang
    assert "the server is gone" in first.output("w2")
    first.kill()
    second = elastic(*common)
    workers = [second.join(f"again{i}") for i in range(2)]
    assert second.wait(second.server) == 0, second.output("server")
    assert all(second.wait(w) == 0 for w in workers)
    assert "at step 20" in second.output("server")
    s = summary(tmp_path / "run")
    assert s["steps"] == 60 and s["merges"] == 6 and s["attempts"] == 2
    assert [r["joins"] for r in s["elastic"]] == [2, 2] and [r["rounds"] for r in s["elastic"]] == [[[1, 6]]] * 2


def test_an_altered_and_a_replayed_message_end_their_links_while_the_others_go_on(tmp_path, elastic):
    """Signed links (LTE_JOIN_TOKEN set): rank 2 flips a byte of its upload of round 3 after signing it,
    rank 3 sends an old message again in round 4; each link ends with its reason, rank 1 finishes."""
    token = {"LTE_JOIN_TOKEN": "s3cret-for-the-test"}
    run = elastic("lte.heads=3", "worker.heads=1", "train.batch_size=63", "lte.merge_every=5", "train.steps=30",
                  env=token)
    faults = {1: {}, 2: {"LTE_FAULT": "flip:rank=2:round=3"}, 3: {"LTE_FAULT": "replay:rank=3:round=4"}}
    workers = [run.join(f"w{r}", "--slot", str(r - 1), env={**token, **f}) for r, f in faults.items()]
    assert run.wait(run.server) == 0, run.output("server")
    log = run.output("server")
    assert re.search(r"rank 2 left at round 3: .*message \d+ from the worker failed its signature check", log), log
    assert re.search(r"rank 3 left at round 4: .*message \d+ from the worker failed its signature check", log), log
    rounds = {r["rank"]: r for r in summary(tmp_path / "run")["elastic"]}
    assert rounds[1]["rounds_contributed"] == 6 and rounds[2]["rounds"] == [[1, 2]] and rounds[3]["rounds"] == [[1, 3]]
    assert run.wait(workers[0]) == 0


def test_signed_links_give_the_weights_of_unsigned_ones(tmp_path):
    weights = []
    for name, env in (("unsigned", {}), ("signed", {"LTE_JOIN_TOKEN": "s3cret-for-the-test"})):
        (tmp_path / name).mkdir()
        run = Run(tmp_path / name, "lte.heads=4", "worker.heads=2", "lte.merge_every=5", "train.steps=10", env=env)
        try:
            workers = [run.join(f"w{i}", "--slot", str(i), env=env) for i in range(2)]
            assert run.wait(run.server) == 0 and all(run.wait(w) == 0 for w in workers), run.output("server")
        finally:
            run.kill()
        weights.append(final(tmp_path / name / "run"))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
