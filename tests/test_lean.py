"""Lean workers: the language-model loss over the vocabulary in chunks of positions, the token
embedding as an LTE layer, and a worker built without ever holding its fp32 model."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lte
from lte.models import create_model
from lte.runtime.engine import autocast
from lte.runtime.tasks import ChunkedLMLoss, TrainingLoss

VOCAB, T, B = 96, 24, 4


def tiny_gpt():
    torch.manual_seed(0)
    return create_model("gpt", vocab_size=VOCAB, block_size=T, n_layer=2, n_head=2, n_embd=16)


def step(model, loss_fn, x, y, precision):
    """The loss and every trainable parameter's gradient; also the shapes autograd kept outside
    any checkpointed region."""
    kept = []

    def pack(t):
        kept.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(torch.device("cpu"), precision):
            with loss_fn.forward_mode():
                outputs = model(x)
            loss = loss_fn(outputs, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, kept


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("heads,base", [(None, None), (4, "fp32"), (4, "nf4")])
def test_chunked_cross_entropy_equals_the_plain_one(precision, heads, base):
    """Plain: the model's B x T x V logits and one cross-entropy over them. Chunked: 5 positions
    (a budget of 5 x B x V fp32 values) at a time, each chunk's logits recomputed in backward."""
    model = tiny_gpt()
    if heads:
        model = lte.prepare(model, lte.LTEConfig(heads=heads, rank=4, alpha=8, base=base))
    model.train()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, VOCAB, (B, T), generator=g)
    plain = TrainingLoss("language_model")
    chunked = TrainingLoss.of("language_model", twin, chunk_mb=5 * B * VOCAB * 4 / 2**20)
    assert isinstance(chunked, ChunkedLMLoss) and chunked.head is twin.lm_head
    loss, grads, kept = step(model, plain, x, y, precision)
    loss_c, grads_c, kept_c = step(twin, chunked, x, y, precision)
    # against the definition, not the code: mean over all B x T tokens of -log softmax(logits)[target]
    with torch.no_grad(), autocast(torch.device("cpu"), precision):
        logits = twin(x).float()
    by_hand = -F.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).mean()
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss_c, by_hand, **tol)
    torch.testing.assert_close(loss_c, loss, **tol)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
    full = [s for s in kept if s[-1:] == (VOCAB,) and s[:-1] in ((B, T), (B * T,))]
    assert full and not [s for s in kept_c if s[-1:] == (VOCAB,) and s[:-1] in ((B, T), (B * T,))]


@pytest.mark.parametrize("heads,chunks", [(None, [4] * 6), (4, [9, 9, 6])])
def test_a_chunk_holds_at_least_the_output_layers_trainable_values(heads, chunks):
    """Every chunk's backward writes the output layer's gradient, so a chunk's fp32 logits are never
    fewer than its trainable values. Asked for one byte a chunk, a position being B x 96 = 384 logits:
    full-rank's 16 x 96 weight (1,536 values) makes 4 positions a chunk; 4 heads of rank 8 hold
    4 x (8 x 16 + 96 x 8) = 3,584 values, 3,584 // 384 = 9 positions a chunk (T = 24: 9, 9, 6)."""
    model = tiny_gpt()
    if heads:
        model = lte.prepare(model, lte.LTEConfig(heads=heads, rank=8, alpha=8))
    chunked = TrainingLoss.of("language_model", model.train(), chunk_mb=1 / 2**20)
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    x = torch.randint(0, VOCAB, (B, T))
    with chunked.forward_mode():
        outputs = model(x)  # the held-back layer runs as the identity here
    seen.clear()
    chunked(outputs, x)
    assert seen == [(B, n, 16) for n in chunks]


def test_lte_embedding_merges_and_exports_as_the_hand_computation():
    """Row i of head h's table is W[i] + s (B_h A_h)^T[i]; a merge adds the heads' mean; export
    loads strictly into a fresh model with the prepared model's eval outputs."""
    plain = tiny_gpt()
    model = lte.prepare(copy.deepcopy(plain), lte.LTEConfig(heads=4, rank=2, alpha=8, embeddings="lte"))
    emb = model.tok_emb
    assert isinstance(emb, lte.core.LTELinear) and emb.lora_A.shape == (4, 2, VOCAB) and emb.lora_B.shape == (4, 16, 2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randint(0, VOCAB, (8, 10), generator=g)
    W, A, B = plain.tok_emb.weight.detach(), emb.lora_A.detach().clone(), emb.lora_B.detach().clone()
    rows = emb.train()(x)  # head h holds samples 2h, 2h+1
    for h in range(4):
        table = W + 4.0 * (B[h] @ A[h]).T  # s = alpha / rank = 4
        torch.testing.assert_close(rows[2 * h:2 * h + 2], table[x[2 * h:2 * h + 2]])
    lte.merge(model)
    expected = W + sum((4.0 / 4) * (B[h] @ A[h]).T for h in range(4))
    exported = lte.export(model)
    torch.testing.assert_close(exported["tok_emb.weight"], expected)
    fresh = tiny_gpt()
    fresh.load_state_dict(exported, strict=True)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_lte_embedding_through_the_parameter_server_equals_simulated_heads(tmp_path):
    from test_dist import GPT, ps_against_simulated

    assert ps_against_simulated(tmp_path, [*GPT, "lte.embeddings=lte"], nproc=3) < 1e-5


BUILD = """
import sys, torch, lte
from lte.core import lean
from lte.models import create_model

def kib(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])

# everything imported and warmed up (bitsandbytes, the allocator) on a tiny model first
lte.prepare(create_model("gpt", vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=64),
            lte.LTEConfig(heads=1, rank=8, base="nf4"))
open("/proc/self/clear_refs", "w").write("5")  # the peak resident size starts again from here
before = kib("VmRSS:")
shape = dict(vocab_size=1024, block_size=64, n_layer=8, n_head=8, n_embd=768)
if sys.argv[1] == "lean":
    with lean.params_on_meta():
        model = create_model("gpt", **shape)
    lte.prepare(model, lte.LTEConfig(heads=1, rank=8, base="nf4"))
    lean.materialize(model, torch.device("cpu"))
else:
    model = lte.prepare(create_model("gpt", **shape), lte.LTEConfig(heads=1, rank=8, base="nf4"))
peak = (kib("VmHWM:") - before) * 1024
with lean.params_on_meta():
    fp32 = sum(4 * t.numel() for t in create_model("gpt", **shape).parameters())
print(peak, fp32)
"""


def test_building_a_lean_worker_never_allocates_its_fp32_model():
    """The peak resident memory a build adds, in a fresh process: building the fp32 model first
    (then preparing it) costs at least its fp32 bytes; the lean build less than a quarter of them
    (an nf4 base is an eighth, with its scales a little more; measured here: 0.19)."""
    import subprocess
    import sys

    from helpers import child_env

    def peak(how):
        out = subprocess.run([sys.executable, "-c", BUILD, how], capture_output=True, text=True, env=child_env(),
                             check=True).stdout.split()
        return int(out[-2]), int(out[-1])

    (lean_peak, fp32), (full_peak, _) = peak("lean"), peak("full")
    assert full_peak >= fp32, (full_peak, fp32)
    assert lean_peak < fp32 / 4, (lean_peak, fp32)


@pytest.mark.parametrize("bias", [True, False])
def test_replicated_layer_norm_keeps_what_a_plain_one_keeps_and_matches_it(bias):
    """Each head's slice through its own LayerNorm, against torch's LayerNorm with that head's weight
    and bias (outputs, and the gradients of the input, weights and biases); and what autograd keeps:
    the input and two per-row statistics, no normalised copy."""
    torch.manual_seed(0)
    ln = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8, bias=bias))
    model = lte.prepare(copy.deepcopy(ln), lte.LTEConfig(heads=2, rank=2))
    norm = model[1]
    with torch.no_grad():
        norm.weight_heads.copy_(torch.randn(2, 8))
        if bias:
            norm.bias_heads.copy_(torch.randn(2, 8))
    x = torch.randn(6, 5, 8, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
        y = norm.train()(x)
    g = torch.randn_like(y)
    y.backward(g)
    for h in range(2):
        ref = torch.nn.LayerNorm(8, bias=bias)
        with torch.no_grad():
            ref.weight.copy_(norm.weight_heads[h])
            if bias:
                ref.bias.copy_(norm.bias_heads[h])
        xh = x.detach()[3 * h:3 * h + 3].clone().requires_grad_(True)
        yh = ref(xh)
        yh.backward(g[3 * h:3 * h + 3])
        torch.testing.assert_close(y[3 * h:3 * h + 3], yh)
        torch.testing.assert_close(x.grad[3 * h:3 * h + 3], xh.grad)
        torch.testing.assert_close(norm.weight_heads.grad[h], ref.weight.grad)
        if bias:
            torch.testing.assert_close(norm.bias_heads.grad[h], ref.bias.grad)
    assert sum(math.prod(s) == x.numel() for s in kept) == 1, kept  # the input, once
