"""Worker base formats: quantized storage, the layer that computes from it, and the protocol that
ships it, checked against bitsandbytes called directly and against dense reference math."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lte
from lte import core
from lte.distributed.protocol import Protocol
from lte.distributed.worker import master_shapes
from lte.memory import check_runs_on, get_format

torch.manual_seed(0)


def nf4_by_hand(packed, absmax, shape):
    """Decode nf4 from its definition: two 4-bit codes per byte (high nibble first), each an index
    into the NF4 table, times the absmax of its block of 64."""
    import bitsandbytes.functional as bnbf

    table = bnbf.get_4bit_type("nf4", device="cpu")
    flat = packed.flatten()
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).flatten().long()[: shape[0] * shape[1]]
    blocks = torch.arange(codes.numel()) // 64
    return (table[codes] * absmax[blocks]).reshape(shape)


def test_nf4_payload_decodes_to_the_nf4_definition():
    fmt = get_format("nf4")
    w = torch.randn(24, 40)
    payload = fmt.encode(w)
    by_hand = nf4_by_hand(payload[""], payload["absmax"], (24, 40))
    torch.testing.assert_close(fmt.decode(payload, (24, 40), torch.float32), by_hand)
    assert (by_hand - w).abs().max() < 0.25 * w.abs().max()  # 4 bits: coarse but close


def test_int8_payload_is_rowwise_absmax():
    fmt = get_format("int8")
    w = torch.randn(6, 10)
    payload = fmt.encode(w)
    scale = w.abs().amax(dim=1)
    torch.testing.assert_close(payload["scale"], scale, rtol=1e-3, atol=1e-3)  # computed in fp16
    torch.testing.assert_close(payload[""].float(), torch.round(w.half().float() / scale[:, None] * 127),
                               atol=1, rtol=0)
    assert (fmt.decode(payload, (6, 10), torch.float32) - w).abs().max() < 0.01 * scale.max()


@pytest.mark.parametrize("name", ["fp32", "bf16", "nf4", "fp4", "int8"])
def test_linear_from_payload_matches_dense_math(name):
    fmt = get_format(name)
    w, b = torch.randn(12, 20), torch.randn(12)
    payload = fmt.encode(w)
    dense = fmt.decode(payload, (12, 20), torch.float32)
    x = torch.randn(5, 20, requires_grad=True)
    y = fmt.linear(x, payload, (12, 20), b)
    g = torch.randn_like(y)
    y.backward(g)
    tol = dict(rtol=1e-2, atol=1e-2) if name == "bf16" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, x.detach() @ dense.T + b, **tol)
    torch.testing.assert_close(x.grad, g @ dense, **tol)


def test_quantized_layer_keeps_no_dense_weight_for_backward():
    fmt = get_format("nf4")
    w = torch.randn(256, 512)
    payload = fmt.encode(w)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fmt.linear(torch.randn(4, 512, requires_grad=True), payload, (256, 512), None)
    assert saved, "nothing saved for backward"
    assert all(t.numel() < w.numel() // 2 + 1 or t.dtype == torch.uint8 for t in saved)
    assert not any(t.shape == w.shape and t.is_floating_point() for t in saved)


def test_a_format_the_device_cannot_run_is_a_clear_error():
    with pytest.raises(lte.ConfigError, match="worker.base_dtype=nf4 cannot run on meta"):
        check_runs_on(get_format("nf4"), torch.device("meta"))
    check_runs_on(get_format("nf4"), torch.device("cpu"))  # the CPU path works


def tiny():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))


@pytest.mark.parametrize("name", ["nf4", "int8", "fp32"])
def test_worker_base_after_a_round_is_quantize_of_master_bit_for_bit(name):
    """The server's download, unpacked by a worker, leaves exactly quantize(master) in its layers."""
    import bitsandbytes.functional as bnbf

    cfg = lte.LTEConfig(heads=2, rank=2, alpha=4)
    worker = core.prepare(tiny(), dataclasses.replace(cfg, base=name))
    master_model = tiny()
    spec, _ = core.plan(master_model, cfg)
    master = {k: v for k, v in master_model.state_dict().items() if k in spec.master_keys()}
    with torch.no_grad():  # a merge happened: the master moved
        for v in master.values():
            v.add_(0.05 * torch.randn_like(v))
    proto = Protocol(spec, master_shapes(worker), local_heads=2, rank=2, fmt=get_format(name), workers=1,
                     activations=cfg.activation_option)
    wire = proto.encode_base(master, torch.ones(1, dtype=torch.int64)).clone()
    views = proto.download.unpack(wire)
    core.load_merged(worker, {p: proto.layer_payload(views, p) for p in spec.layers},
                     {n: views[n] for n in spec.replicas})
    for path in ("0", "2"):
        layer, w = worker.get_submodule(path), master[f"{path}.weight"]
        if name == "nf4":
            packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
            expected = {"": packed, "absmax": state.absmax}
        elif name == "int8":
            q, stats, _ = bnbf.int8_vectorwise_quant(w.half().contiguous())
            expected = {"": q, "scale": stats}
        else:
            expected = {"": w}
        for part, tensor in layer.payload().items():
            assert torch.equal(tensor, expected[part].reshape(tensor.shape)), (path, part)
    assert torch.equal(worker.state_dict()["1.weight"], master["1.weight"])  # replica merged value
    assert proto.base_digest(proto.worker_base(worker)) == proto.base_digest(views)


def test_worker_model_with_quantized_base_cannot_merge_locally():
    model = core.prepare(tiny(), lte.LTEConfig(heads=2, rank=2, alpha=4, base="nf4"))
    with pytest.raises(lte.ModelError, match="parameter server"):
        lte.merge(model)
    exported = lte.export(model)  # export decodes the base
    assert exported["0.weight"].dtype == torch.float32 and exported["0.weight"].shape == (32, 16)
    model.eval()
    x = torch.randn(3, 16)
    ref = tiny()
    ref.load_state_dict(exported)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert F.cosine_similarity(exported["0.weight"].flatten(), tiny()[0].weight.flatten(), dim=0) > 0.95


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_4bit_encode_in_pieces_gives_bitsandbytes_codes_of_the_whole_tensor(quant_type):
    """Large tensors are encoded ENCODE_PIECE values at a time (bounded temporaries on a server);
    the codes and scales must be those of one bitsandbytes call, an odd last piece included."""
    import bitsandbytes.functional as bnbf

    from lte.memory.base_formats import ENCODE_PIECE, FORMATS

    w = torch.randn(ENCODE_PIECE * 2 + 2 * 64 + 5, generator=torch.Generator().manual_seed(0)).view(-1, 1)
    got = FORMATS[quant_type]().encode(w)
    packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=64, quant_type=quant_type)
    assert torch.equal(got[""].view(-1), packed.view(-1)) and torch.equal(got["absmax"], state.absmax.float())
