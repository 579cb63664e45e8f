"""The step's fast path against plain computations: the LTE layer's one autograd function against the
layer's formula in plain torch, timm's LayerNorm on the per-head LayerNorm function, the per-head
clip and AdamW over one buffer against clip_grad_norm_per_head_ and torch's AdamW per tensor."""
import contextlib

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lte
from lte import core
from lte.errors import ConfigError, ModelError
from lte.core import replica
from lte.memory.activations import VELORA_KEY, compress, rebuild
from lte.runtime.engine import TrainStep
from lte.runtime.tasks import TrainingLoss

HEADS, RANK, D_IN, D_OUT, ROWS = 3, 4, 16, 12, 5


def layer(activations="full", bias=True, reset="b", product="auto"):
    torch.manual_seed(0)
    cfg = lte.LTEConfig(heads=HEADS, rank=RANK, alpha=8, activations=activations, reset=reset, velora_subtoken=4,
                        product=product)
    lin = core.prepare(nn.Linear(D_IN, D_OUT, bias=bias), cfg)
    with torch.no_grad():
        lin.lora_B.normal_()
        if lin.bias_heads is not None:
            lin.bias_heads.normal_()
        if reset == "none":
            lin.lora_A0.normal_()
            lin.lora_B0.normal_()
    assert lin.lora_A0 is None or not lin.lora_A0.requires_grad  # a snapshot: no gradient reaches A through it
    return lin.train()


def formula(lin, x):
    """The layer's output as the formula says, in plain torch: x W^T (+ b_h) + s x A_h^T B_h^T per head."""
    A, B = lin.factors()
    x3 = x.view(HEADS, -1, D_IN)
    y = x3 @ lin.weight.t() + lin.scale * (x3 @ A.transpose(1, 2)) @ B.transpose(1, 2)
    if lin.bias_heads is not None:
        y = y + lin.bias_heads.unsqueeze(1)
    return y.reshape(-1, D_OUT)


@pytest.mark.parametrize("merged", [(False, False), (True, True), (True, False), (False, True)],
                         ids=["factored", "merged", "merged-forward", "merged-backward"])
@pytest.mark.parametrize("activations,bias,reset", [  # (LoRA-FA is refused with reset=none)
    (a, bias, reset) for a in ("full", "lora_fa", "velora")
    for bias, reset in ((True, "b"), (False, "b"), (True, "none")) if (a, reset) != ("lora_fa", "none")])
def test_the_fused_layer_gives_the_formula_and_its_gradients_in_fp32(activations, bias, reset, merged):
    lin = layer(activations, bias, reset)
    lin.merges = lambda rows: merged  # each direction's way fixed, whatever the rows
    x = torch.randn(HEADS * ROWS, D_IN, requires_grad=True)
    g = torch.randn(HEADS * ROWS, D_OUT)
    params = [p for p in (lin.lora_A, lin.lora_B, lin.bias_heads) if p is not None and p.requires_grad]
    y = lin(x)
    got = torch.autograd.grad(y, [x, *params], g)
    want_y = formula(lin, x)
    want = torch.autograd.grad(want_y, [x, *params], g)
    torch.testing.assert_close(y, want_y, rtol=1e-6, atol=1e-5)
    if activations == "velora":  # dA from the sub-token projections of x, by VeLoRA's formula
        v = getattr(lin, VELORA_KEY)
        x_hat = rebuild(compress(x.detach().view(HEADS, -1, D_IN), v), v)
        A, B = lin.factors()
        gxa = (g.view(HEADS, -1, D_OUT) @ B.detach()) * lin.scale
        want = (want[0], gxa[:, :, :RANK].transpose(1, 2) @ x_hat, *want[2:])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("product", ["factored", "merged"])
def test_the_fused_layer_in_bf16_rounds_as_the_formula_does(product):
    lin = layer("full", True, product=product)
    x = torch.randn(HEADS * ROWS, D_IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    want = formula(lin, x.detach())
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=5e-2)  # bf16 carries 8 bits of mantissa
    assert lin.lora_A.grad.dtype == torch.float32 and lin.lora_A.grad.is_contiguous()
    assert lin.lora_B.grad.is_contiguous() and x.grad.dtype == torch.float32
    # backward through the kept bf16 cast of the fp32 base: dx = g W + s g B A per head
    A, B = lin.factors()
    g3 = torch.ones(HEADS, ROWS, D_OUT)
    want_dx = g3 @ lin.weight + lin.scale * (g3 @ B) @ A
    torch.testing.assert_close(x.grad, want_dx.reshape(-1, D_IN).detach(), rtol=2e-2, atol=5e-2)
    want_dB = lin.scale * g3.transpose(1, 2) @ (x.detach().view(HEADS, ROWS, D_IN) @ A.detach().transpose(1, 2))
    torch.testing.assert_close(lin.lora_B.grad, want_dB, rtol=2e-2, atol=5e-2)


class Writes(TorchDispatchMode):
    """The ops run inside it (views aside) and the bytes their outputs hold."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            outs = out if isinstance(out, (tuple, list)) else [out]
            shapes = [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)]
            self.ops.append((func.overloadpacket.__name__, shapes))
            self.bytes += sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
        return out


def test_auto_runs_each_direction_on_the_heads_own_weights_where_that_writes_fewer_bytes():
    """product="auto" against what each way writes, counted, forward and backward apart: the heads' own
    weights W + s B_h A_h (N out in values, built in the direction that uses them) against the
    factored way's second pass over its output (N rows out forward, dx's N rows in backward). At 16 -> 12
    forward merges past 16 rows a head, backward past 12: 10 rows neither, 14 backward only, 20 both."""
    built_weights = ("baddbmm", [(HEADS, D_OUT, D_IN)])
    for rows, expected in ((10, (False, False)), (14, (False, True)), (20, (True, True))):
        written, grads = {}, {}
        for product in ("factored", "merged", "auto"):
            lin = layer(product=product)
            x = torch.randn(HEADS * rows, D_IN, generator=torch.Generator().manual_seed(rows), requires_grad=True)
            forward, backward = Writes(), Writes()
            with forward:
                y = lin(x)
            with backward:
                y.backward(torch.ones_like(y))
            torch.testing.assert_close(y, formula(lin, x), rtol=1e-6, atol=1e-5)
            written[product] = (forward.bytes, backward.bytes)
            grads[product] = [x.grad, lin.lora_A.grad, lin.lora_B.grad, lin.bias_heads.grad]
            if product == "auto":
                assert [built_weights in w.ops for w in (forward, backward)] == list(expected)
        for d, merges in enumerate(expected):
            cheaper, dearer = ("merged", "factored") if merges else ("factored", "merged")
            assert written[cheaper][d] < written[dearer][d]
            assert written["auto"][d] == written[cheaper][d]
        for got, want in zip(grads["auto"], grads["factored"]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_an_unknown_product_is_refused_in_one_line_where_it_is_set():
    choices = r"must be one of \('auto', 'factored', 'merged'\), got 'fused'"
    with pytest.raises(ConfigError, match=r"^LTEConfig.product " + choices + "$"):
        lte.LTEConfig(heads=HEADS, product="fused")
    lin = layer()
    with pytest.raises(ModelError, match=r"^an LTE layer's product " + choices + "$"):
        lin.product = "fused"
    assert lin.product == "auto"


class Casts(TorchDispatchMode):
    """The shapes of the fp32 tensors cast to bf16 inside it."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 \
                and (kwargs or {}).get("dtype") == torch.bfloat16:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_a_forward_with_the_head_tensors_precast_casts_no_factor_and_gives_the_same_bits():
    """core.precast: every head tensor cast by one op of the optimizer's buffer; the layers then cast
    none of their factors, and the step's loss and every gradient are those of the layers' own casts."""
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    runs = []
    for precast in (False, True):
        model = vit()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = core.HeadOptimizer(params, lr=1e-3)
        with torch.no_grad():
            for _, lin in core.lte_layers(model):
                lin.lora_B.normal_()  # B = 0 would hide a wrong B
        factors = {tuple(lin.lora_A.shape) for _, lin in core.lte_layers(model)}
        factors |= {tuple(lin.lora_B.shape) for _, lin in core.lte_layers(model)}
        casts = Casts()
        with torch.autocast("cpu", dtype=torch.bfloat16), casts:
            with core.precast(opt.compute_copies(torch.bfloat16)) if precast else contextlib.nullcontext():
                loss = F.cross_entropy(model(x), y)
        loss.backward()
        factor_casts = [s for s in casts.shapes if s in factors]
        assert len(factor_casts) == (0 if precast else 2 * len(core.lte_layers(model))), precast
        runs.append((loss.detach(), [p.grad.clone() for p in params]))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_a_bf16_step_keeps_the_bases_cast_between_merges_and_casts_them_again_after_one():
    """core.BaseCopies under TrainStep.precast: the fp32 bases are frozen between merges, so the
    second step casts none of them; a merge writes them, and the next forward casts each again and
    computes with the new base (the same bits as casting it there)."""
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    model = vit()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = core.HeadOptimizer(params, lr=1e-3)
    step = TrainStep(model, TrainingLoss("classification"), params, opt, heads=4, grad_clip=1.0,
                     device=torch.device("cpu"), precision="bf16")
    layers = [lin for _, lin in core.lte_layers(model)]
    bases = {tuple(lin.weight.shape) for lin in layers}

    def base_casts_of(fn):
        casts = Casts()
        with casts:
            out = fn()
        return out, [s for s in casts.shapes if s in bases]

    step(x, y, 1e-3)
    _, casts = base_casts_of(lambda: step(x, y, 1e-3))
    assert casts == []
    lte.merge(model, opt)
    kept, casts = base_casts_of(lambda: step.loss_of(x, y).detach())
    assert len(casts) == len(layers)
    with torch.autocast("cpu", dtype=torch.bfloat16), core.precast(opt.compute_copies(torch.bfloat16)):
        fresh = F.cross_entropy(model(x), y)  # every base cast in this forward
    assert torch.equal(kept, fresh.detach())


def test_the_output_layer_the_chunked_loss_runs_takes_the_precast_copies_too():
    """A language model's output layer runs inside the loss (chunks of positions), after the model's
    forward, and again in backward (each chunk's logits recomputed): the step's precast covers the
    loss and backward too, so the layer's factors and base are cast in neither."""
    from lte.models import create_model

    torch.manual_seed(0)
    model = core.prepare(create_model("gpt", vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=32),
                         lte.LTEConfig(heads=2, rank=4, alpha=8)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = core.HeadOptimizer(params, lr=1e-3)
    loss = TrainingLoss.of("language_model", model, 4 * 96 * 4 * 4 / 2**20)  # 4 positions a chunk
    step = TrainStep(model, loss, params, opt, heads=2, grad_clip=1.0, device=torch.device("cpu"),
                     precision="bf16")
    x, y = torch.randint(0, 96, (4, 16)), torch.randint(0, 96, (4, 16))
    step(x, y, 1e-3)
    head = model.lm_head
    shapes = {tuple(head.lora_A.shape), tuple(head.lora_B.shape), tuple(head.weight.shape)}
    casts = Casts()
    with casts:
        step.forward_backward(x, y)
    assert [s for s in casts.shapes if s in shapes] == []


def test_timm_layer_norms_take_the_per_head_function_and_match_layer_norm_per_head():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2)
    core.prepare(model, lte.LTEConfig(heads=2, rank=4, alpha=8))
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and type(norms[0]) is not nn.LayerNorm  # timm's own subclass
    assert all(m.forward.__func__ is replica._headwise_layer_norm for m in norms)
    ln = norms[0].train()
    with torch.no_grad():
        ln.weight_heads.normal_()
        ln.bias_heads.normal_()
    x = torch.randn(4, 7, ln.normalized_shape[0], requires_grad=True)
    y = ln(x)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, ln.weight_heads, ln.bias_heads], g)
    want_y = torch.cat([F.layer_norm(x[2 * h:2 * h + 2], ln.normalized_shape, ln.weight_heads[h], ln.bias_heads[h],
                                     ln.eps) for h in range(2)])
    want = torch.autograd.grad(want_y, [x, ln.weight_heads, ln.bias_heads], g)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiling", [False, True])
def test_per_head_layer_norm_gradients_hold_fp32_precision_on_an_offset_input(compiling, monkeypatch):
    """The per-head weight's gradient, op by op (rstd-weighted sums of g x and g) and as the compiled
    graph takes it (the normalisation again, fused), against float64 per-head layer norms: on many rows
    and an input whose mean is 50 of its standard deviations, where x - mean cancels."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    torch.manual_seed(0)
    model = lte.prepare(nn.Sequential(nn.Linear(4, 64), nn.LayerNorm(64)), lte.LTEConfig(heads=2, rank=2))
    norm = model[1].train()
    with torch.no_grad():
        norm.weight_heads.normal_()
        norm.bias_heads.normal_()
    x = (torch.randn(2 * 40, 25, 64) * 2 + 100).requires_grad_(True)
    y = norm(x)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, norm.weight_heads, norm.bias_heads], g)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, norm.weight_heads, norm.bias_heads))
    want_y = torch.cat([F.layer_norm(x64[40 * h:40 * h + 40], (64,), w64[h], b64[h], norm.eps) for h in range(2)])
    want = torch.autograd.grad(want_y, [x64, w64, b64], g.double())
    for a, b in zip(got, want):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 1e-4  # fp32 sums over 1,000 rows


class NotALayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2


def test_a_layer_norm_subclass_that_computes_something_else_keeps_vmap():
    model = nn.Sequential(nn.Linear(6, 8), NotALayerNorm(8))
    core.prepare(model, lte.LTEConfig(heads=2, rank=2, alpha=4))
    assert model[1].forward.__func__ is not replica._headwise_layer_norm


def vit(heads=4):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2)
    return core.prepare(model, lte.LTEConfig(heads=heads, rank=4, alpha=8)).train()


def test_clipping_over_one_buffer_equals_clip_grad_norm_per_head():
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    plain, flat = vit(), vit()
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    flat_params = [p for p in flat.parameters() if p.requires_grad]
    opt = core.HeadOptimizer(flat_params, lr=1e-3)
    for model in (plain, flat):
        (F.cross_entropy(model(x), y) * 4).backward()
    norms = core.clip_grad_norm_per_head_(plain_params, 0.5)
    torch.testing.assert_close(opt.clip_(0.5), norms, rtol=1e-5, atol=0)  # fp32 sums in another order
    for a, b in zip(plain_params, flat_params):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-9)


def test_adamw_over_one_buffer_is_torch_adamw_per_tensor_and_shows_each_tensors_state():
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    plain, flat = vit(), vit()
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    flat_params = [p for p in flat.parameters() if p.requires_grad]
    reference = torch.optim.AdamW(plain_params, lr=1e-2, weight_decay=0.1)
    opt = core.HeadOptimizer(flat_params, lr=1e-2, weight_decay=0.1)
    for model, o in ((plain, reference), (flat, opt)):
        (F.cross_entropy(model(x), y) * 4).backward()
        o.step()
        o.zero_grad()
    for a, b in zip(plain_params, flat_params):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-7)  # the same AdamW, up to the last bit
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[b][key], reference.state[a][key], rtol=1e-6, atol=1e-12)
    assert all(p.grad is None for p in flat_params)  # until the next backward leaves its own
    core.clear_optimizer_state(opt, [flat_params[0]], heads=[1])
    assert float(opt.state[flat_params[0]]["exp_avg"][1].abs().max()) == 0
    assert float(opt.state[flat_params[0]]["exp_avg"][0].abs().max()) > 0


def test_a_train_step_with_the_buffer_equals_one_with_torch_per_tensor():
    """The engine's step through HeadOptimizer and through per-tensor clipping and AdamW: one step to
    the last bits of the clip's norms; over three, Adam's steps on near-zero gradients amplify those
    bits, so the losses are compared there."""
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    runs = []
    for buffered in (False, True):
        model = vit()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = core.HeadOptimizer(params, lr=1e-3) if buffered else torch.optim.AdamW(params, lr=1e-3, fused=True)
        step = TrainStep(model, TrainingLoss("classification"), params, opt, heads=4, grad_clip=1.0,
                         device=torch.device("cpu"), precision="fp32")
        losses = [float(step(x, y, 1e-3))]
        after_one = [p.detach().clone() for p in params]
        losses += [float(step(x, y, 1e-3)) for _ in range(2)]
        runs.append((losses, after_one))
    (loss_a, params_a), (loss_b, params_b) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_the_compiled_step_has_no_graph_break_and_no_new_graph_across_merges_and_learning_rates():
    """train.compile: the forward and backward one graph, the clip and AdamW over the buffer another;
    a merge (weights written in place) and a new learning rate make no new graph, and the compiled
    step follows the eager one."""
    from torch._dynamo.utils import counters

    def build(compile):
        torch.manual_seed(0)
        model = core.prepare(nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 10)),
                             lte.LTEConfig(heads=4, rank=4, alpha=8)).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = core.HeadOptimizer(params, lr=1e-3, weight_decay=0.01)
        return model, params, opt, TrainStep(model, TrainingLoss("classification"), params, opt, heads=4, grad_clip=0.5,
                                             device=torch.device("cpu"), precision="fp32", compile=compile)

    torch._dynamo.reset()
    counters.clear()
    x, y = torch.randn(16, 16), torch.randint(0, 10, (16,))
    runs = []
    for compile in (False, True):
        model, params, opt, step = build(compile)
        losses = [float(step(x, y, 1e-3)), float(step(x, y, 2e-3))]
        lte.merge(model, opt)
        losses += [float(step(x, y, 3e-3)), float(step(x, y, 1e-3))]
        runs.append((losses, [p.detach().clone() for p in params]))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2
    (eager, p_eager), (compiled, p_compiled) = runs
    assert compiled == pytest.approx(eager, rel=1e-4)
    for a, b in zip(p_eager, p_compiled):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def test_the_compile_mode_reaches_both_compiled_graphs(monkeypatch):
    """train.compile_mode: the model's forward and the heads' clip + AdamW compiled in that mode."""
    modes = []

    def compile(fn, **kw):
        modes.append(kw.get("mode"))
        return fn

    monkeypatch.setattr(torch, "compile", compile)
    model = vit()
    params = [p for p in model.parameters() if p.requires_grad]
    TrainStep(model, TrainingLoss("classification"), params, core.HeadOptimizer(params, lr=1e-3), heads=4,
              grad_clip=1.0, device=torch.device("cpu"), precision="fp32", compile=True, compile_mode="max-autotune")
    assert modes == ["max-autotune", "max-autotune"]
