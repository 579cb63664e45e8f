"""The GPT model: its attention, causality, the paper's shapes, LTE export, sampling."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lte
from lte.errors import ConfigError
from lte.models import create_model
from lte.sample import generate


def tiny(**kw):
    torch.manual_seed(0)
    return create_model("gpt", **{**dict(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=16), **kw})


def test_attention_is_causal_softmax_attention():
    model = tiny().eval()
    attn = model.blocks[0].attn
    x = torch.randn(3, 7, 16)
    W, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = (x @ W.T + b).split(16, dim=2)
    heads = lambda t: t.view(3, 7, 2, 8).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 7, 16)
    expected = y @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_logits_depend_only_on_earlier_tokens():
    model = tiny().eval()
    idx = torch.randint(0, 11, (2, 10))
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 11
    a, b = model(idx), model(changed)
    assert a.shape == (2, 10, 11)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert (a[:, 6:] - b[:, 6:]).abs().amax(-1).min() > 0  # every later position sees the change


def test_named_shapes_have_the_papers_parameter_counts():
    """Table 4 counts as nanoGPT does: output layer tied to the token embedding, and (MiniGPT)
    without the position table. Ours is untied: subtract the output layer to compare."""
    def count(model, *skip):
        return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))

    with torch.device("meta"):
        mini, gpt2, padded = create_model("gpt_mini"), create_model("gpt2", vocab_size=50257), create_model("gpt2")
    L, C, V = 6, 384, 65  # no biases; a LayerNorm weight per norm
    assert count(mini, "lm_head", "pos_emb") == L * (12 * C * C + 2 * C) + V * C + C == 10_646_784  # "10.7M"
    L, C, V, T = 12, 768, 50257, 1024  # with biases (qkv 3C, proj C, fc 4C, proj C, two norms 4C)
    assert count(gpt2, "lm_head") == L * (12 * C * C + 13 * C) + V * C + T * C + 2 * C == 124_439_808  # "124.4M"
    assert (gpt2.block_size, mini.block_size, padded.vocab_size) == (1024, 256, 50304)
    assert mini.lm_head.weight is not mini.tok_emb.weight


def test_sequences_longer_than_the_block_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="block_size=12"):
        tiny()(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ConfigError, match="model.args: gpt rejected its arguments: n_embd=16 must be a multiple"):
        create_model("gpt", n_embd=16, n_head=3)
    with pytest.raises(ConfigError, match="unknown GPT argument"):
        create_model("gpt_mini", n_layers=2)


def test_lte_trained_gpt_exports_into_a_fresh_model():
    model = lte.prepare(tiny(), lte.LTEConfig(heads=2, rank=4, alpha=8))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 11, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
        opt.zero_grad()
    lte.merge(model, opt)
    fresh = tiny()
    fresh.load_state_dict(lte.export(model), strict=True)
    assert not torch.equal(fresh.pos_emb, tiny().pos_emb)  # the replicated position table trained
    torch.testing.assert_close(fresh.eval()(idx), model.eval()(idx))


class Bigram(nn.Module):
    """Next-token logits from a fixed table of the current token; refuses contexts over 4 tokens."""

    block_size = 4

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, idx):
        assert idx.shape[1] <= self.block_size
        return self.table[idx]


def test_generate_follows_the_model_and_crops_to_its_block():
    table = torch.full((5, 5), -10.0)
    for a, b in [(0, 3), (3, 1), (1, 4), (4, 0)]:  # the most likely successor of each token
        table[a, b] = 10.0
    model = Bigram(table)
    greedy = generate(model, torch.tensor([[0]]), 9, block_size=4, temperature=0)
    assert greedy[0].tolist() == [0, 3, 1, 4, 0, 3, 1, 4, 0, 3]
    top1 = generate(model, torch.tensor([[2, 1]]), 3, block_size=4, top_k=1, generator=torch.Generator().manual_seed(0))
    assert top1[0].tolist() == [2, 1, 4, 0, 3]
    table[2] = torch.tensor([0.0, 0.0, -1e9, -1e9, -1e9])  # after 2: 0 or 1, evenly
    drawn = generate(model, torch.full((4000, 1), 2), 1, block_size=4, generator=torch.Generator().manual_seed(0))[:, 1]
    assert set(drawn.tolist()) == {0, 1} and abs(drawn.float().mean().item() - 0.5) < 0.03


def test_a_gpt_built_a_tensor_at_a_time_is_the_whole_gpt():
    """Every parameter drawn alone (a shard of the server builds only its own: init_tensors) equals the
    whole model of the same seed, bit for bit; and the draws follow GPT-2's scheme, checked by hand:
    N(0, 0.02), the residual projections' std 0.02 / sqrt(2 n_layer), zero biases, unit LN scales."""
    from lte.core import params_on_meta
    from lte.runtime.model import init_tensors

    args = dict(n_layer=3, n_head=2, n_embd=64, block_size=32, bias=True)
    torch.manual_seed(5)
    whole = create_model("gpt", {"vocab_size": 97}, **args)
    with params_on_meta():
        meta = create_model("gpt", {"vocab_size": 97}, **args)
    keys = list(whole.state_dict())
    alone = init_tensors(meta, list(reversed(keys)), 5, torch.device("cpu"))  # any order
    assert alone.keys() == set(keys)
    for k, v in whole.state_dict().items():
        assert torch.equal(alone[k], v), k
    assert not torch.equal(alone["blocks.0.attn.qkv.weight"], init_tensors(meta, ["blocks.0.attn.qkv.weight"], 6,
                                                                          torch.device("cpu"))["blocks.0.attn.qkv.weight"])
    stds = {k: v.std().item() for k, v in alone.items() if v.dim() > 1 or k == "pos_emb"}
    for k, s in stds.items():
        expect = 0.02 / math.sqrt(6) if k.endswith(("attn.proj.weight", "mlp.proj.weight")) else 0.02
        assert s == pytest.approx(expect, rel=0.1), k
    assert all(torch.all(v == 0) for k, v in alone.items() if k.endswith("bias"))
    assert all(torch.all(v == 1) for k, v in alone.items() if ".ln_" in k and k.endswith("weight"))
    # a model without a per-tensor init has none: the server's shard 0 builds it whole instead
    with params_on_meta():
        mlp = nn.Sequential(nn.Linear(4, 4))
    assert init_tensors(mlp, ["0.weight"], 5, torch.device("cpu")) is None
