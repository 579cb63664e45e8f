"""Local-chunk training (lte.runtime.chunks): what a chunk runs, trains and caches, checked against the
model's pieces composed by hand; block discovery on timm's ViT and Mixer and a GPT-like list."""
import pytest
import torch
from torch import nn

import lte
from lte import core
from lte.runtime import chunks as chunks_module
from lte.runtime.chunks import LocalChunks, find_blocks, split
from test_activations import TinyGPT
from test_compile import tiny


def prepared(depth=4):
    torch.manual_seed(0)
    model = lte.prepare(TinyGPT(depth=depth), lte.LTEConfig(heads=2, rank=4, alpha=8))
    with torch.no_grad():  # heads that already moved, so the heads' branch matters
        for _, layer in core.lte_layers(model):
            layer.lora_B.normal_(std=0.05)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_blocks_are_found_in_the_models_structure():
    assert find_blocks(prepared())[0] == "blocks"                      # a GPT's nn.ModuleList
    assert find_blocks(tiny("vit"))[0] == "blocks"                     # timm ViT: nn.Sequential
    assert find_blocks(tiny("mixer"))[0] == "blocks"                   # timm Mixer
    with pytest.raises(lte.ModelError, match="list of blocks"):
        find_blocks(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)))
    assert [list(r) for r in split(5, 3)] == [[0, 1], [2, 3], [4]]


def test_each_chunk_runs_its_blocks_through_the_proxy_and_trains_only_them():
    model = prepared()
    params = trainable(model)
    chunks = LocalChunks(model, 3, params, torch.optim.SGD(params, lr=0.1), torch.device("cpu"))
    assert [list(r) for r in chunks.ranges] == [[0, 1], [2], [3]]
    idx = torch.randint(64, (4, 6))
    b = model.blocks
    d = lambda h: model.head(model.ln_f(h))  # noqa: E731  the output head

    def run(chunk, h_in=None):
        for p in params:
            p.grad = None
        tap = []
        with chunks.arranged(chunk, feed=h_in, tap=tap):
            out = model(idx)
        out.square().mean().backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None}
        return out, tap, got

    names = lambda *prefixes: {n for n, p in model.named_parameters() if n.startswith(prefixes)}  # noqa: E731
    with torch.no_grad():
        h1 = b[1](b[0](model.wte(idx)))
        h2 = b[2](h1)
    out, tap, got = run(0)
    torch.testing.assert_close(out, d(b[3](h1)))            # d o f_L o f_2 o f_1 o e
    torch.testing.assert_close(tap[0], h1)                  # the chunk's output, cached for chunk 2
    assert got == names("wte", "blocks.0.", "blocks.1.")    # the proxy f_L and d stay frozen
    out, tap, got = run(1, h1)
    torch.testing.assert_close(out, d(b[3](h2)))
    torch.testing.assert_close(tap[0], h2)
    assert got == names("blocks.2.")
    out, tap, got = run(2, h2)
    torch.testing.assert_close(out, d(b[3](h2)))            # the last chunk: the model's own output
    assert got == names("blocks.3.", "ln_f", "head")
    assert all(p.requires_grad for p in params)             # restored after each chunk
    model.train()
    torch.testing.assert_close(model(idx), d(b[3](b[2](h1))))  # and the model is whole again


def test_chunks_beyond_the_blocks_are_refused():
    model = prepared(depth=2)
    with pytest.raises(lte.ConfigError, match="more than the 2 blocks"):
        LocalChunks(model, 3, trainable(model), None, torch.device("cpu"))


def test_only_the_chunk_and_its_proxy_are_resident(monkeypatch):
    """The placement a GPU gets (no GPU here: the copies are recorded instead of made)."""
    model = prepared()
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-3)
    model(torch.randint(64, (4, 6))).square().mean().backward()
    opt.step()  # optimizer moments exist
    sent = set()
    monkeypatch.setattr(chunks_module, "to_device", lambda t, device: sent.add(t.data_ptr()) or t)
    chunks = LocalChunks(model, 3, params, opt, torch.device("cuda"))
    assert chunks.offload
    chunks.place(1)                                          # chunk 2 of 3: block 2, proxy f_L = block 3, d
    resident = [t for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if n.startswith(("blocks.2.", "blocks.3.", "ln_f", "head"))]
    moments = [v for p in chunks.trained[1] for v in opt.state[p].values() if v.dim() > 0]  # not the proxy's
    assert sent == {t.data_ptr() for t in resident + moments}
