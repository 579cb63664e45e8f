"""What only a CUDA device can check: the same prepared models, bases, compiled steps and runs on the
GPU as on the CPU. Skipped where there is no CUDA device (CI); run them first on a machine with one:
    python -m pytest -q tests/test_cuda.py
"""
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import lte
from lte.memory import get_format
from lte.runtime.config import load_config
from lte.single.trainer import train
from helpers import DIGITS, summary
from test_compile import tiny, trainable
from test_dist import ps_against_simulated

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """Full fp32 matmuls and convolutions, so the GPU is compared with the CPU and not with TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.reset()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def batch(name, generator):
    if name == "gpt":
        return torch.randint(0, 13, (8, 8), generator=generator)
    return torch.randn(8, 1, 8, 8, generator=generator)


@pytest.mark.parametrize("name", ["vit", "mixer", "gpt"])
@pytest.mark.parametrize("reset", ["b", "ab"])
def test_a_round_on_the_gpu_equals_the_same_round_on_the_cpu(name, reset):
    """Forward, backward, an optimizer step and a merge, from the same weights and batches.

    SGD, not Adam: Adam divides each gradient element by its own size, so an element whose true
    gradient is zero (a ViT's key bias, which the softmax ignores) turns each device's rounding
    noise (~1e-13 on the CPU) into a step of its own, and the devices part ways for no fault of theirs."""
    cpu = lte.prepare(tiny(name), lte.LTEConfig(heads=4, rank=2, alpha=4, reset=reset))
    gpu = copy.deepcopy(cpu).to(CUDA)
    opts = [torch.optim.SGD(trainable(m), lr=1e-1, momentum=0.9) for m in (cpu, gpu)]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = batch(name, g)
        y_cpu, y_gpu = cpu(x), gpu(x.to(CUDA))
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
        y_cpu.square().mean().backward()
        y_gpu.square().mean().backward()
        for (key, p), (_, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
            if p.requires_grad:
                torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-6, msg=named(key))
        for opt in opts:
            opt.step()
            opt.zero_grad()
    lte.merge(cpu, opts[0])
    lte.merge(gpu, opts[1])
    merged_cpu, merged_gpu = lte.export(cpu), lte.export(gpu)
    for key in merged_cpu:
        torch.testing.assert_close(merged_gpu[key].cpu(), merged_cpu[key], rtol=1e-4, atol=1e-6, msg=named(key))


def named(key):
    return lambda message: f"{key}: {message}"


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
def test_quantized_bases_encode_on_the_gpu_as_on_the_cpu(fmt):
    """bitsandbytes' CUDA kernels against its CPU code: the decoded weights agree and the GPU's
    linear is x @ decode(payload).T."""
    base = get_format(fmt)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    cpu_payload = base.encode(w)
    on_cpu = base.decode(cpu_payload, tuple(w.shape), torch.float32)
    payload = base.encode(w.to(CUDA))
    on_gpu = base.decode(payload, tuple(w.shape), torch.float32).cpu()
    if fmt == "int8":
        # The CUDA kernel rounds x * 127 / absmax in its own order: a value within rounding of a
        # half-way point can land one code away. Same scales, codes at most one apart, and rarely.
        torch.testing.assert_close(payload["scale"].cpu(), cpu_payload["scale"])
        codes = (payload[""].cpu().int() - cpu_payload[""].int()).abs()
        assert int(codes.max()) <= 1 and float((codes > 0).float().mean()) < 0.01, (int(codes.max()), codes.sum())
    else:
        step = float((on_cpu - w).abs().max())  # the format's own rounding error
        assert float((on_gpu - on_cpu).abs().max()) <= 1e-3 * step + 1e-6
    x = torch.randn(5, 256, device=CUDA)
    torch.testing.assert_close(base.linear(x, payload, tuple(w.shape), None).float().cpu(),
                               x.cpu() @ on_gpu.T, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_compiled_step_on_the_gpu_is_one_graph_and_matches_eager(base):
    """Inductor on the GPU (the CPU test uses aot_eager): one frame across merges, eager's numbers."""
    cfg = lte.LTEConfig(heads=4, rank=2, alpha=4, base=base)
    compiled_model, eager = (lte.prepare(tiny("vit"), cfg).to(CUDA) for _ in range(2))
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(compiled_model, fullgraph=True, backend=counter)
    opts = [torch.optim.AdamW(trainable(m), lr=1e-2) for m in (compiled_model, eager)]
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        x = batch("vit", g).to(CUDA)
        y, y_ref = step(x), eager(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-4)
        y.square().mean().backward()
        y_ref.square().mean().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        if i % 2 == 1:  # as in test_compile: a merge, or a quantized base's heads reset after its merge
            if base == "fp32":
                lte.merge(compiled_model, opts[0])
                lte.merge(eager, opts[1])
            else:
                for m in (compiled_model, eager):
                    lte.core.finish_merge(m)
    assert counter.frame_count == 1


@pytest.mark.parametrize("mode", ["lte", "full"])
def test_trainer_learns_on_the_gpu_in_bf16_compiled(tmp_path, mode):
    s = train(load_config(DIGITS, [f"out_dir={tmp_path}", f"mode={mode}", "train.device=cuda",
                                   "train.precision=bf16", "train.compile=true", "train.steps=600",
                                   "train.log_every=200"]))
    assert s["device"].startswith("cuda") and s["peak_memory_kind"] == "cuda_max_allocated"
    # 10 classes, chance 0.1; on the CPU (bf16 autocast) 600 steps reached 0.89 in mode lte
    assert s["eval"]["accuracy"] > 0.7, s["eval"]


def test_parameter_server_with_gpu_workers_equals_simulated_heads_on_the_gpu(tmp_path):
    """The server on the CPU over Gloo, two workers sharing the GPU (the one-GPU placement), against
    4 simulated heads on the GPU."""
    difference = ps_against_simulated(tmp_path, ["train.device=cuda", "dist.backend=gloo"], nproc=3)
    # the CPU test holds this to 1e-5; GPU kernels may pick other reduction orders for 2 and 4 heads
    assert difference < 1e-3
    assert summary(tmp_path / "ps")["merges"] == 3
