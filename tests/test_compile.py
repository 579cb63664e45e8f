"""A prepared model compiles as one graph (torch.compile fullgraph=True), forward and backward,
gives the eager model's outputs and gradients, and is not recompiled by a merge."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import lte
from helpers import DIGITS, small
from lte.models import create_model
from lte.runtime.config import load_config
from lte.single.trainer import train


def tiny(name):
    torch.manual_seed(0)
    if name == "gpt":
        return create_model("gpt", vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)
    if name == "vit":
        return create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, num_classes=5,
                            embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=16, num_blocks=2)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each case compiles new model instances of the same classes: without a reset, dynamo's
    per-code-object cache (recompile_limit, 8) fills up after eight cases and fullgraph fails."""
    torch._dynamo.reset()
    yield


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("name,reset,other,base,activations", [
    ("vit", "b", "replica", "fp32", "full"),
    ("vit", "ab", "replica", "fp32", "full"),
    ("vit", "none", "replica", "fp32", "full"),
    ("vit", "b", "frozen", "fp32", "full"),
    ("vit", "b", "replica", "nf4", "full"),
    ("mixer", "b", "replica", "fp32", "full"),
    ("mixer", "ab", "replica", "fp32", "full"),
    ("mixer", "none", "replica", "fp32", "full"),
    ("vit", "ab", "replica", "nf4", "velora"),
    ("mixer", "b", "replica", "bf16", "lora_fa"),  # a bf16 base with fp32 inputs takes the decoded path
    ("gpt", "b", "replica", "fp32", "full"),
    ("gpt", "none", "replica", "nf4", "full"),
    ("gpt", "ab", "replica", "fp32", "velora"),
    ("gpt", "b", "replica", "fp32", "lora_fa"),
])
def test_prepared_model_compiles_as_one_graph_and_matches_eager(name, reset, other, base, activations):
    cfg = lte.LTEConfig(heads=4, rank=2, alpha=4, reset=reset, other_params=other, base=base,
                        activations=activations, velora_subtoken=4)
    compiled_model, eager = (lte.prepare(tiny(name), cfg) for _ in range(2))
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(compiled_model, fullgraph=True, backend=counter)  # raises on any graph break
    opts = [torch.optim.AdamW(trainable(m), lr=1e-2) for m in (compiled_model, eager)]
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        x = torch.randint(0, 13, (8, 8), generator=g) if name == "gpt" else torch.randn(8, 1, 8, 8, generator=g)
        y, y_ref = step(x), eager(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        y.square().mean().backward()
        y_ref.square().mean().backward()
        for (key, p), (_, q) in zip(compiled_model.named_parameters(), eager.named_parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=key)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        if i % 2 == 1:  # a merge changes buffers in place and resets heads: no new graph
            if base == "fp32":
                lte.merge(compiled_model, opts[0])
                lte.merge(eager, opts[1])
            else:  # a quantized base receives its merge; re-install the same base in place
                for m in (compiled_model, eager):
                    lte.core.finish_merge(m)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"


def test_bf16_autocast_training_on_cpu(tmp_path):
    """train.precision=bf16 runs on the CPU (autocast) and learns like fp32 does."""
    common = small("train.steps=200", "lte.merge_every=10", "train.log_every=200")
    cfgs = {p: load_config(DIGITS, [*common, f"train.precision={p}", f"out_dir={tmp_path / p}"])
            for p in ("fp32", "bf16")}
    results = {p: train(cfg)["eval"] for p, cfg in cfgs.items()}
    assert results["bf16"]["loss"] < 2.0  # started at ln(10) = 2.30
    assert abs(results["bf16"]["loss"] - results["fp32"]["loss"]) < 0.1, results
