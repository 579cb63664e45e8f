"""The outer optimizer at the merge (lte.OuterOptimizer): against torch.optim.SGD stepping on the
negated merged change, on plain tensors and through a prepared model; its state across a resume."""
import pytest
import torch
from torch import nn

import lte
from lte import core
from lte.core.algebra import MergeSpec


def heads(n=3, r=2, d_in=5, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"fc.lora_A": torch.randn(n, r, d_in, generator=g), "fc.lora_B": torch.randn(n, d_out, r, generator=g),
            "ln.weight_heads": torch.randn(n, d_out, generator=g)}


@pytest.mark.parametrize("kind,lr,momentum", [("nesterov", 0.7, 0.9), ("nesterov", 1.0, 0.5), ("sgd", 0.8, 0.6)])
def test_merges_with_outer_equal_torch_sgd_on_the_negated_change(kind, lr, momentum):
    spec = MergeSpec(layers=("fc",), replicas=("ln.weight",), scale=2.0)
    W0, p0 = torch.randn(4, 5), torch.randn(4)
    master = {"fc.weight": W0.clone(), "ln.weight": p0.clone()}
    outer = lte.OuterOptimizer(kind, lr=lr, momentum=momentum)
    # the reference: torch's SGD, its gradient minus the change each merge finds, computed by hand
    ref_W, ref_p = nn.Parameter(W0.clone()), nn.Parameter(p0.clone())
    sgd = torch.optim.SGD([ref_W, ref_p], lr=lr, momentum=momentum, nesterov=kind == "nesterov")
    for merge in range(4):
        h = heads(seed=merge)
        core.merge_into(master, h, spec, outer=outer)
        n = h["fc.lora_A"].shape[0]
        change_W = 2.0 / n * sum(h["fc.lora_B"][i] @ h["fc.lora_A"][i] for i in range(n))
        change_p = h["ln.weight_heads"].mean(0) - ref_p.detach()
        ref_W.grad, ref_p.grad = -change_W, -change_p
        sgd.step()
        torch.testing.assert_close(master["fc.weight"], ref_W.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(master["ln.weight"], ref_p.detach(), rtol=1e-5, atol=1e-5)
    assert set(outer.momenta) == {"fc.weight", "ln.weight"}


def test_kept_heads_and_the_plain_merge_are_unchanged_by_outer_none():
    spec = MergeSpec(layers=("fc",), replicas=("ln.weight",), scale=2.0)
    master = {"fc.weight": torch.randn(4, 5), "ln.weight": torch.randn(4)}
    plain = {k: v.clone() for k, v in master.items()}
    keep = torch.tensor([True, False, True])
    core.merge_into(plain, heads(), spec, keep=keep)
    core.merge_into(master, heads(), spec, keep=keep, outer=lte.OuterOptimizer("none"))
    for k in master:
        assert torch.equal(master[k], plain[k]), k


def test_lte_merge_with_outer_through_a_prepared_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    lte.prepare(model, lte.LTEConfig(heads=2, rank=2, alpha=4))
    outer = lte.OuterOptimizer("nesterov", lr=1.0, momentum=0.5)
    W0 = model[0].weight.detach().clone()
    changes = []
    for merge in range(2):
        with torch.no_grad():
            model[0].lora_B.normal_()
        A, B = model[0].lora_A.detach().clone(), model[0].lora_B.detach().clone()
        changes.append(2.0 / 2 * (B[0] @ A[0] + B[1] @ A[1]))
        lte.merge(model, outer=outer)
    # nesterov by hand: m1 = d1, step1 = d1 + mu m1; m2 = mu m1 + d2, step2 = d2 + mu m2
    d1, d2 = changes
    m1 = d1
    m2 = 0.5 * m1 + d2
    expected = W0 + (d1 + 0.5 * m1) + (d2 + 0.5 * m2)
    torch.testing.assert_close(model[0].weight.detach(), expected, rtol=1e-5, atol=1e-5)
    assert float(model[0].lora_B.detach().abs().max()) == 0  # the heads were reset as after any merge


def test_state_round_trips_and_refuses_other_settings():
    outer = lte.OuterOptimizer("sgd", lr=0.5, momentum=0.9)
    outer.apply("w", torch.zeros(3), torch.ones(3))
    again = lte.OuterOptimizer("sgd", lr=0.5, momentum=0.9)
    again.load_state_dict(outer.state_dict())
    assert torch.equal(again.momenta["w"], outer.momenta["w"])
    with pytest.raises(lte.ConfigError, match="differs from this run"):
        lte.OuterOptimizer("nesterov", lr=0.5, momentum=0.9).load_state_dict(outer.state_dict())


@pytest.mark.parametrize("kw,message", [
    (dict(kind="adam"), "kind must be one of"),
    (dict(kind="sgd", lr=0), "lr must be a finite number > 0"),
    (dict(kind="sgd", momentum=1.0), "momentum must be a number in [0, 1)"),
    (dict(kind="none", momentum=0.9), "have nothing to act on"),
])
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(lte.ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        lte.OuterOptimizer(**kw)
