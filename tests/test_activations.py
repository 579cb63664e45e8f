"""Activation options of the LTE layer (lte.memory.activations): gradients against hand-computed
ones, and what autograd really keeps for backward (saved_tensors_hooks)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lte
from lte import core
from lte.memory.accounting import SavedTensors

S = 2.0  # head scale alpha / rank


def layer(activations, base="fp32", m=4, reset="b"):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    model = lte.prepare(lin, lte.LTEConfig(heads=2, rank=3, alpha=3 * S, reset=reset, base=base,
                                           activations=activations, velora_subtoken=m))
    with torch.no_grad():
        model.lora_B.normal_()
    return model


def grads(model, x, g):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(g)
    return y.detach(), x.grad, model.lora_A.grad, model.lora_B.grad


def test_b_gradient_and_outputs_are_exact_under_every_option():
    x, g = torch.randn(2, 6, 16), torch.randn(2, 6, 8)
    y0, gx0, gA0, gB0 = grads(layer("full"), x, g)
    # plain LoRA by hand: head h sees rows 6h..6h+5 of x, y = x W^T + b + s x A^T B^T
    ref = layer("full")
    W, b, A, B = ref.weight, ref.bias, ref.lora_A, ref.lora_B.detach()
    for h in range(2):
        xh, gh = x[h], g[h]
        torch.testing.assert_close(y0[h], xh @ W.T + b + S * xh @ A[h].T @ B[h].T)
        torch.testing.assert_close(gB0[h], S * gh.T @ (xh @ A[h].T))
        torch.testing.assert_close(gA0[h], S * (gh @ B[h]).T @ xh)
    for option in ("lora_fa", "velora"):
        y, gx, gA, gB = grads(layer(option), x, g)
        torch.testing.assert_close(y, y0)
        torch.testing.assert_close(gB, gB0)
        torch.testing.assert_close(gx, gx0)  # the input gradient needs only weights
    assert grads(layer("lora_fa"), x, g)[2] is None  # A is frozen


def test_velora_A_gradient_is_exact_when_sub_tokens_lie_along_v():
    m = 4
    u = F.normalize(torch.randn(2, m), dim=1)                  # one direction per head
    coef = torch.rand(2, 6, 16 // m) + 0.5                      # positive, so the mean points along u
    x = (coef.unsqueeze(-1) * u[:, None, None, :]).reshape(2, 6, 16)
    g = torch.randn(2, 6, 8)
    gA = grads(layer("velora", m=m), x, g)[2]
    torch.testing.assert_close(gA, grads(layer("full"), x, g)[2])


def test_velora_A_gradient_uses_the_input_rebuilt_from_sub_token_projections():
    m = 4
    x, g = torch.randn(2, 6, 16), torch.randn(2, 6, 8)
    model = layer("velora", m=m)
    B = model.lora_B.detach().clone()
    gA = grads(model, x, g)[2]
    for h in range(2):
        sub = x[h].reshape(-1, m)                               # every sub-token of head h's slice
        v = sub.mean(0) / sub.mean(0).norm()
        torch.testing.assert_close(model.velora_v[h], v)
        rebuilt = ((sub @ v)[:, None] * v).reshape(6, 16)       # (z . v) v^T, sub-token by sub-token
        torch.testing.assert_close(gA[h], S * (g[h] @ B[h]).T @ rebuilt)
    assert (gA - grads(layer("full"), x, g)[2]).abs().max() > 1e-3  # and that is not the exact gradient


def test_velora_vector_is_frozen_after_the_first_slice_and_travels_in_the_state_dict():
    model = layer("velora")
    x1 = torch.randn(4, 16)
    model(x1)
    v = model.velora_v.clone()
    model(torch.randn(4, 16) * 5 + 3)
    assert torch.equal(model.velora_v, v)
    model.eval()
    model(torch.randn(3, 16))  # eval: the merged linear only
    fresh = layer("velora")
    assert not fresh.velora_v.any()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.velora_v, v)
    assert "velora_v" not in lte.export(model)  # a plain nn.Linear's keys only
    nn.Linear(16, 8).load_state_dict(lte.export(model))


def test_lora_fa_redraws_A_at_every_merge_and_keeps_no_A_state():
    model = layer("lora_fa")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert not model.lora_A.requires_grad
    draws = [model.lora_A.detach().clone()]
    for _ in range(2):
        model(torch.randn(4, 16)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        lte.merge(model, opt)
        draws.append(model.lora_A.detach().clone())
    assert all(not torch.equal(a, b) for a, b in zip(draws, draws[1:]))
    for merges, A in enumerate(draws):  # A of round m is draw m of (seed, layer, head)
        expected = torch.empty_like(A)
        core.init.init_lora_A(expected, "", 0, 0, draw=merges)
        assert torch.equal(A, expected)
    assert opt.state[model.lora_B]["exp_avg"].abs().sum() > 0  # reset=b keeps B's moments
    assert core.trained_keys(model) == ["lora_B", "bias_heads"]


@pytest.mark.parametrize("activations,reset,message", [
    ("lora_fa+velora", "b", "VeLoRA cannot be combined with LoRA-FA"),
    ("lora_fa", "none", "lora_fa cannot run with reset=none"),
    ("sparse", "b", "must be one of"),
])
def test_meaningless_options_are_refused(activations, reset, message):
    with pytest.raises(lte.ConfigError, match=message):
        layer(activations, reset=reset)


def test_velora_width_not_divisible_names_the_layer():
    model = nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 4))
    with pytest.raises(lte.ConfigError, match=r"input width 12 of LTE layer '2'.*multiple of 4"):
        lte.prepare(model, lte.LTEConfig(heads=2, activations="velora", velora_subtoken=8))


# ---- saved-tensor accounting on a small GPT-like stack of LTE linears --------------------------

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, d=32, depth=2, vocab=64):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def saved_by_layers(activations, base, precision="fp32", m=8):
    torch.manual_seed(0)
    model = lte.prepare(TinyGPT(), lte.LTEConfig(heads=2, rank=4, alpha=8, base=base, activations=activations,
                                                 velora_subtoken=m))
    idx = torch.randint(64, (4, 10))
    inputs = {}  # the input each LTE layer saw, recorded independently of the accounting
    hooks = [mod.register_forward_pre_hook(lambda mod, args, p=p: inputs.__setitem__(p, args[0]))
             for p, mod in core.lte_layers(model)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        with SavedTensors(model) as saved:
            loss = model(idx).float().logsumexp(-1).mean()
    loss.backward()  # what was saved is what backward needs
    for h in hooks:
        h.remove()
    return model, saved, inputs


@pytest.mark.parametrize("base,precision", [("fp32", "fp32"), ("bf16", "fp32"), ("nf4", "fp32"), ("fp32", "bf16")])
def test_saved_tensors_per_option(base, precision):
    runs = {a: saved_by_layers(a, base, precision) for a in ("full", "lora_fa", "velora")}
    model, full, inputs = runs["full"]
    _, fa, _ = runs["lora_fa"]
    _, ve, _ = runs["velora"]
    m, rank, heads = 8, 4, 2

    def batch_sized(run, path):  # saved non-state tensors, less the casts of A and B (bf16 copies under autocast)
        lin = model.get_submodule(path)
        factors = {(heads, *sorted((rank, lin.in_features))), (heads, *sorted((rank, lin.out_features)))}
        return [r for r in run.by_module[path] if not r.state and (r.shape[0], *sorted(r.shape[1:])) not in factors
                and r.shape != lin.shape]

    def acts(run, path):
        return sum({r.storage: r.nbytes for r in batch_sized(run, path)}.values())

    for path, lin in core.lte_layers(model):
        x = inputs[path]
        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        x_bytes = x.numel() * compute.itemsize  # the layer's input, in the head branch's dtype
        xa_bytes = x.numel() // lin.in_features * rank * compute.itemsize
        for run in (full, fa, ve):
            # a dense copy of the weight only of the fp32 master under autocast (its bf16 cast, as a
            # full-rank layer keeps), never of a bf16 or quantized base
            dense = [r for r in run.by_module[path] if not r.state and set(r.shape) == set(lin.shape)]
            cast = base == "fp32" and precision == "bf16"
            assert [(r.shape, r.dtype) for r in dense] == ([(lin.shape, torch.bfloat16)] if cast else []), path
        # full keeps x and x A^T ...
        assert acts(full, path) == x_bytes + xa_bytes, path
        # ... lora_fa only x A^T: no tensor of the layer's input width, also not from the base product
        assert acts(fa, path) == xa_bytes, path
        assert not [r for r in batch_sized(fa, path) if r.shape[-1] == lin.in_features]
        # ... velora x A^T and one number per sub-token of M values
        assert acts(ve, path) == x_bytes // m + xa_bytes, path
    total = lambda run: sum(acts(run, p) for p, _ in core.lte_layers(model))  # noqa: E731
    assert total(full) - total(ve) == pytest.approx((total(full) - total(fa)) * (1 - 1 / m))
    assert heads == model.blocks[0].qkv.heads
