"""The LTE layer, the merge algebra, resets and export, each checked against a computation by hand."""
import math

import pytest
import timm
import torch
from torch import nn

import lte
from lte.core import clip_grad_norm_per_head_, lte_layers
from lte.core.optim import cosine_with_warmup


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1,
                             num_classes=5, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)


def randomize_heads(model, seed=1):
    """Give every head distinct, non-zero factors and replica copies (fresh heads have B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_merge_matches_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    W0 = model[0].weight.detach().clone()
    cfg = lte.LTEConfig(heads=3, rank=2, alpha=8)
    lte.prepare(model, cfg)
    randomize_heads(model)
    layer = model[0]
    A, B, bias_h = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.bias_heads.detach().clone()

    lte.merge(model)

    s = 8 / 2
    expected_W = W0.clone()
    for h in range(3):
        expected_W += (s / 3) * (B[h] @ A[h])
    expected_b = (bias_h[0] + bias_h[1] + bias_h[2]) / 3
    model.eval()
    x = torch.randn(7, 6)  # any batch size in eval
    torch.testing.assert_close(model(x), x @ expected_W.T + expected_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B, torch.zeros_like(layer.lora_B))  # B reset
    torch.testing.assert_close(layer.lora_A, A)                                # A kept
    torch.testing.assert_close(layer.bias_heads, expected_b.expand(3, -1))    # replicas reset to mean


def test_batched_heads_gradients_match_single_head_on_its_slice():
    torch.manual_seed(0)
    heads, per_head = 4, 3
    multi = nn.Sequential(nn.Linear(8, 6))
    lte.prepare(multi, lte.LTEConfig(heads=heads, rank=2, alpha=4))
    randomize_heads(multi)
    x = torch.randn(heads * per_head, 8)
    target = torch.randn(heads * per_head, 6)
    multi.train()
    ((multi(x) - target) ** 2).sum().backward()
    layer = multi[0]

    for h in range(heads):
        single = nn.Sequential(nn.Linear(8, 6))
        lte.prepare(single, lte.LTEConfig(heads=1, rank=2, alpha=4))
        with torch.no_grad():
            single[0].weight.copy_(layer.weight)
            single[0].lora_A.copy_(layer.lora_A[h:h + 1])
            single[0].lora_B.copy_(layer.lora_B[h:h + 1])
            single[0].bias_heads.copy_(layer.bias_heads[h:h + 1])
        rows = slice(h * per_head, (h + 1) * per_head)
        ((single(x[rows]) - target[rows]) ** 2).sum().backward()
        torch.testing.assert_close(layer.lora_A.grad[h], single[0].lora_A.grad[0])
        torch.testing.assert_close(layer.lora_B.grad[h], single[0].lora_B.grad[0])
        torch.testing.assert_close(layer.bias_heads.grad[h], single[0].bias_heads.grad[0])


def test_whole_vit_heads_are_independent_models():
    """Every replicated kind (patch conv, LayerNorm, pos_embed, cls_token, biases) sees only its slice:
    head h of an N-head model equals a 1-head model holding head h's tensors, run on slice h."""
    heads, per_head = 3, 2
    multi = lte.prepare(tiny_vit(), lte.LTEConfig(heads=heads, rank=2, alpha=4))
    randomize_heads(multi)
    x = torch.randn(heads * per_head, 1, 8, 8)
    y = torch.randint(0, 5, (heads * per_head,))
    multi.train()
    out = multi(x)
    (nn.functional.cross_entropy(out, y, reduction="sum")).backward()
    multi_sd = multi.state_dict()
    grads = {n: p.grad for n, p in multi.named_parameters()}

    for h in range(heads):
        single = lte.prepare(tiny_vit(), lte.LTEConfig(heads=1, rank=2, alpha=4))
        single_params = dict(single.named_parameters())
        with torch.no_grad():
            for name, value in multi_sd.items():
                target = single.state_dict(keep_vars=True)[name]
                target.copy_(value[h:h + 1] if name in single_params else value)
        rows = slice(h * per_head, (h + 1) * per_head)
        single.train()
        out_h = single(x[rows])
        torch.testing.assert_close(out[rows], out_h, rtol=1e-5, atol=1e-5)
        nn.functional.cross_entropy(out_h, y[rows], reduction="sum").backward()
        for name, p in single.named_parameters():
            torch.testing.assert_close(grads[name][h], p.grad[0], rtol=1e-4, atol=1e-6, msg=name)


def effective_weights(layer, resetless):
    W, s = layer.weight, layer.scale
    out = []
    for h in range(layer.heads):
        eff = W + s * layer.lora_B[h] @ layer.lora_A[h]
        if resetless:
            eff = eff - s * layer.lora_B0[h] @ layer.lora_A0[h]
        out.append(eff.detach().clone())
    return out


@pytest.mark.parametrize("reset", ["b", "none", "ab"])
def test_every_reset_keeps_mean_effective_weight(reset):
    model = lte.prepare(tiny_vit(), lte.LTEConfig(heads=4, rank=3, alpha=12, reset=reset))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    for _ in range(3):  # three rounds, so "none" merges non-trivial snapshots
        for _ in range(2):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        layers = lte_layers(model)
        before = {p: sum(effective_weights(m, reset == "none")) / m.heads for p, m in layers}
        A_before = {p: m.lora_A.detach().clone() for p, m in layers}
        lte.merge(model, opt)
        for path, layer in layers:
            after = sum(effective_weights(layer, reset == "none")) / layer.heads
            torch.testing.assert_close(after, before[path], rtol=1e-5, atol=1e-6)
            if reset == "none":
                # after a reset-less merge every head's effective weight is the merged weight itself
                for eff in effective_weights(layer, True):
                    torch.testing.assert_close(eff, layer.weight, rtol=1e-5, atol=1e-6)
            else:
                assert torch.count_nonzero(layer.lora_B) == 0
            a_changed = not torch.equal(layer.lora_A, A_before[path])
            assert a_changed == (reset == "ab"), path


def test_reset_b_keeps_optimizer_state_and_ab_clears_it():
    for reset, kept in (("b", True), ("ab", False)):
        model = lte.prepare(tiny_vit(), lte.LTEConfig(heads=2, rank=2, alpha=4, reset=reset))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(2):  # A gets a gradient only once B is non-zero
            nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
            opt.step()
        layer = lte_layers(model)[1][1]
        lte.merge(model, opt)
        for factor in (layer.lora_A, layer.lora_B):
            assert (torch.count_nonzero(opt.state[factor]["exp_avg"]) > 0) == kept


def test_export_loads_into_fresh_model_and_matches():
    model = lte.prepare(tiny_vit(), lte.LTEConfig(heads=2, rank=2, alpha=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    lte.merge(model)
    state = lte.export(model)
    fresh = tiny_vit(seed=7)
    fresh.load_state_dict(state, strict=True)
    assert state["patch_embed.proj.weight"].shape == (16, 1, 2, 2)
    model.eval()
    fresh.eval()
    x_eval = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(fresh(x_eval), model(x_eval))
    # training moved the weights away from the initial model's
    assert not torch.allclose(fresh(x_eval), tiny_vit()(x_eval))


def test_frozen_other_params_train_only_factors():
    model = lte.prepare(tiny_vit(), lte.LTEConfig(heads=2, rank=2, alpha=4, other_params="frozen"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    before = lte.export(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    lte.merge(model)
    after = lte.export(model)
    torch.testing.assert_close(after["pos_embed"], before["pos_embed"])
    torch.testing.assert_close(after["norm.weight"], before["norm.weight"])
    assert not torch.equal(after["blocks.0.mlp.fc1.weight"], before["blocks.0.mlp.fc1.weight"])


def test_A_is_semi_orthogonal_and_seeded_by_global_head():
    cfg = lte.LTEConfig(heads=4, rank=3, alpha=4, seed=5)
    full = lte.prepare(nn.Sequential(nn.Linear(10, 4)), cfg)
    A = full[0].lora_A.detach()
    for h in range(4):
        torch.testing.assert_close(A[h] @ A[h].T, (3 / 10) * torch.eye(3), atol=1e-5, rtol=0)
    assert not torch.allclose(A[0], A[1])
    part = lte.prepare(nn.Sequential(nn.Linear(10, 4)), lte.LTEConfig(heads=2, rank=3, alpha=4, seed=5),
                       first_head=2)
    torch.testing.assert_close(part[0].lora_A.detach(), A[2:4])
    torch.testing.assert_close(full[0].lora_B.detach(), torch.zeros(4, 4, 3))


def test_per_head_clipping():
    p1 = torch.zeros(3, 4, requires_grad=True)
    p2 = torch.zeros(3, 2, 2, requires_grad=True)
    p1.grad = torch.tensor([[3.0, 0, 0, 0], [0.1, 0, 0, 0], [0, 0, 0, 0]])
    p2.grad = torch.zeros(3, 2, 2)
    p2.grad[0, 0, 0] = 4.0  # head 0 norm 5, head 1 norm 0.1, head 2 norm 0
    norms = clip_grad_norm_per_head_([p1, p2], max_norm=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.1, 0.0]))
    torch.testing.assert_close(p1.grad[0, 0], torch.tensor(3.0 / 5), rtol=1e-4, atol=0)
    torch.testing.assert_close(p2.grad[0, 0, 0], torch.tensor(4.0 / 5), rtol=1e-4, atol=0)
    torch.testing.assert_close(p1.grad[1, 0], torch.tensor(0.1))  # small head untouched


def test_cosine_schedule_shape():
    assert cosine_with_warmup(0, warmup=10, total=110) == pytest.approx(0.1)
    assert cosine_with_warmup(9, warmup=10, total=110) == pytest.approx(1.0)
    assert cosine_with_warmup(60, warmup=10, total=110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_with_warmup(110, warmup=10, total=110, min_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("field,value", [("heads", 0), ("rank", 0), ("rank", 2.5), ("alpha", -1.0),
                                         ("alpha", float("nan")), ("reset", "a"),
                                         ("other_params", "shared"), ("heads", True)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        lte.LTEConfig(**{field: value})


def test_batch_not_divisible_by_heads_is_a_clear_error():
    model = lte.prepare(tiny_vit(), lte.LTEConfig(heads=4, rank=2, alpha=4))
    model.train()
    with pytest.raises(lte.BatchError, match="multiple of the number of heads"):
        model(torch.randn(6, 1, 8, 8))
    model.eval()
    assert model(torch.randn(6, 1, 8, 8)).shape == (6, 5)


def test_models_lte_cannot_prepare_are_refused():
    with pytest.raises(lte.ModelError, match="no nn.Linear"):
        lte.prepare(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), lte.LTEConfig())
    with pytest.raises(lte.ModelError, match="MultiheadAttention"):
        lte.prepare(nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8)), lte.LTEConfig())
    tied = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(lte.ModelError, match="tied"):
        lte.prepare(tied, lte.LTEConfig())
    with pytest.raises(lte.ModelError, match="running statistics"):
        lte.prepare(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), lte.LTEConfig())
    with pytest.raises(lte.ModelError, match="already prepared"):
        lte.prepare(lte.prepare(nn.Sequential(nn.Linear(4, 4)), lte.LTEConfig()), lte.LTEConfig())
