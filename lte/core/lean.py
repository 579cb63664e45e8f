"""Workers that never hold their model in fp32.

A parameter-server worker trains heads against a base it receives from the server, so it never
needs the fp32 weights of its LTE layers, nor the initial values of its replicated parameters (the
server's first download brings both). It is built as

    with params_on_meta():           # parameters on the meta device; buffers (masks, rotary tables) as usual
        model = build_the_model()
    prepare(model, cfg)              # LTE layers hold shape-only payloads
    materialize(model, device)       # every tensor allocated on the device, the base in its storage format
                                     # (zero until the server's download, or seeded_base without a server)

so host and device memory only ever hold the worker's own state: the base in nf4 (say), the heads
and their optimizer state, and one layer's decoded weight at a time in forward and backward.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ModelError
from .init import init_lora_A, named_generator
from .inject import MERGES_KEY, lte_layers, reset_heads, state_of


@contextlib.contextmanager
def params_on_meta():
    """Modules built in the block register their parameters on the meta device (no memory, no
    initialisation); their buffers are created as usual, so values computed at construction
    (attention masks, rotary tables) stay real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def unfilled(model: nn.Module) -> list[str]:
    """The meta tensors of a prepared model that neither the server's download (LTE layers' bases,
    merged replicas) nor the worker itself (heads, option state) fills: a model with any cannot
    be built lean."""
    state = state_of(model)
    filled = set(state.spec.replicas) | set(state.spec.head_keys()) | {MERGES_KEY}
    for path, layer in lte_layers(model):
        prefix = f"{path}." if path else ""
        filled |= {prefix + name for name, _ in layer.named_buffers(recurse=False)}
    return [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta and k not in filled]


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate every meta tensor of a prepared model on `device` (zeros; the base in its storage
    format) and draw the heads' A as prepare does. The bases and replicas stay zero until the
    server's download, or seeded_base."""
    missing = unfilled(model)
    if missing:
        raise ModelError(f"cannot build this worker without its fp32 weights: {missing[0]!r} is neither an LTE "
                         "layer's base nor a replicated parameter, so nothing would fill it "
                         f"({len(missing)} such tensors)")
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None:
                    continue
                real = torch.zeros(t.shape, dtype=t.dtype, device=device) if t.is_meta else t.to(device)
                store[name] = nn.Parameter(real, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else real
    state = state_of(model)
    for path, layer in lte_layers(model):
        init_lora_A(layer.lora_A, path, state.cfg.seed, state.first_head)
        if layer.lora_A0 is not None:
            layer.lora_A0.copy_(layer.lora_A)


@torch.no_grad()
def seeded_base(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Without a server: give a materialized worker a base of its own, encoded layer by layer (at
    most one layer's fp32 weight exists at a time). Weights ~ N(0, std), each seeded by (seed, its
    name); 1-D replicated weights (norm scales) 1, biases 0; then the heads start from it."""
    for path, layer in lte_layers(model):
        w = torch.randn(layer.shape, generator=named_generator(seed, path), device="cpu").mul_(std)
        layer.load_payload(layer.base.encode(w.to(layer.lora_A.device)))
        del w
        if layer.bias is not None:
            layer.bias.zero_()
    sd = model.state_dict(keep_vars=True)
    for name in state_of(model).spec.replicas:
        t = sd[name]
        if name.endswith("bias"):
            t.zero_()
        elif t.dim() == 1:
            t.fill_(1.0)
        else:
            t.copy_(torch.randn(t.shape, generator=named_generator(seed, name)).mul_(std))
    reset_heads(model)
