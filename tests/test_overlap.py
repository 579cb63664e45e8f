"""comm.overlap: a round trains against the master of one merge back, carrying its heads' previous
round, and its change goes into the newest master (one round stale), checked by hand on a prepared
model; the emulated link's waits. (ps == simulated heads with overlap, and an exact resume after a
kill: tests/test_dist.py.)"""
import pytest
import torch
from torch import nn

import lte
from lte.core import OverlappedMerge, merges_done
from lte.core.upload import Uploader, get_codec
from lte.distributed.comm import Exchange


def test_merges_go_into_the_master_ahead_while_the_heads_train_one_merge_behind_carrying_their_round():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    lte.prepare(model, lte.LTEConfig(heads=2, rank=2, alpha=4, overlap=True))  # s = 2
    ahead, upload = OverlappedMerge(), Uploader(get_codec("fp32"))
    W, g = model[0].weight.detach().clone(), model[1].weight.detach().clone()  # the master, kept by hand
    copies = model.state_dict(keep_vars=True)["1.weight_heads"]
    carried_g = torch.zeros(2, 5)
    for merge in range(3):
        settle = merge == 2
        with torch.no_grad():  # what a round of training would leave in the heads
            model[0].lora_B.normal_()
            copies.add_(torch.randn_like(copies))
        A, B = model[0].lora_A.detach().clone(), model[0].lora_B.detach().clone()
        started = model[1].weight.detach() + carried_g  # each copy's start: the base plus its carried change
        change_g = copies.detach() - started
        before = W.clone(), g.clone()
        W = W + 2.0 / 2 * (B[0] @ A[0] + B[1] @ A[1])  # only the round's own factors are merged
        g = g + change_g.mean(0)
        ahead.merge(model, None, None, upload, settle=settle)
        torch.testing.assert_close(ahead.master["0.weight"], W)
        torch.testing.assert_close(ahead.master["1.weight"], g)
        want_W, want_g = (W, g) if settle else before  # the next round trains against the previous master
        torch.testing.assert_close(model[0].weight.detach(), want_W)
        torch.testing.assert_close(model[1].weight.detach(), want_g)
        assert float(model[0].lora_B.detach().abs().max()) == 0
        carried_g = torch.zeros(2, 5) if settle else change_g
        torch.testing.assert_close(copies.detach(), want_g + carried_g)  # each copy restarts with its change
        carried = (torch.zeros_like(A), torch.zeros_like(B)) if settle else (A, B)
        torch.testing.assert_close(model[0].lora_Ac, carried[0])
        torch.testing.assert_close(model[0].lora_Bc, carried[1])
        if not settle:
            with ahead.newest(model):  # evaluation sees the master
                torch.testing.assert_close(model[0].weight.detach(), W)
            torch.testing.assert_close(model[0].weight.detach(), want_W)
    assert merges_done(model) == 3


def test_a_head_runs_with_its_carried_factors_beside_its_new_ones():
    torch.manual_seed(1)
    model = lte.prepare(nn.Sequential(nn.Linear(6, 5)), lte.LTEConfig(heads=2, rank=2, alpha=4, overlap=True))
    lin = model[0]
    with torch.no_grad():
        for t in (lin.lora_A, lin.lora_B, lin.lora_Ac, lin.lora_Bc):
            t.normal_()
    x = torch.randn(8, 6)
    y = model.train()(x)
    W, b = lin.weight.detach(), lin.bias
    for h, rows in enumerate((x[:4], x[4:])):
        new = rows @ lin.lora_A[h].T @ lin.lora_B[h].T
        carried = rows @ lin.lora_Ac[h].T @ lin.lora_Bc[h].T
        want = rows @ W.T + b + 2.0 * (new + carried)
        torch.testing.assert_close(y[4 * h:4 * h + 4], want)


def test_the_emulated_link_waits_bytes_over_bandwidth_on_the_workers_side(monkeypatch):
    waits = []
    monkeypatch.setattr("lte.distributed.comm.time.sleep", waits.append)
    monkeypatch.setattr("lte.distributed.comm.dist.gather", lambda *a, **k: None)  # the collectives themselves
    monkeypatch.setattr("lte.distributed.comm.dist.broadcast", lambda *a, **k: None)
    worker = Exchange(1, 3, torch.device("cpu"), 10, link_mbps=8.0)  # 8 Mbit/s: a byte a microsecond
    server = Exchange(0, 3, torch.device("cpu"), 10, link_mbps=8.0)
    worker.gather(torch.zeros(5000, dtype=torch.uint8), 5000, "an upload")
    worker.broadcast(torch.zeros(3000, dtype=torch.uint8), "a download")
    worker.gather(torch.zeros(2000, dtype=torch.uint8), 2000, "a checkpoint upload", checkpoint=True)
    server.broadcast(torch.zeros(3000, dtype=torch.uint8), "a download")  # the server's link is not emulated
    assert waits == [pytest.approx(5e-3), pytest.approx(3e-3), pytest.approx(2e-3)]
    assert (worker.sent, worker.received, worker.ckpt_sent) == (5000, 3000, 2000) and server.sent == 2 * 3000
    assert worker.count_ring_all_reduce(1500) == 2 * (3 - 1) * 1500 // 3  # what a DDP rank's link carries
    assert server.link_s(1000) == pytest.approx(1e-3) and Exchange(1, 3, "cpu", 10).link_s(1000) == 0
