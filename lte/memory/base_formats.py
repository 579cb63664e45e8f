"""How a worker stores the frozen base weight of an LTE layer: fp32, bf16, or bitsandbytes nf4/fp4/int8.

A format turns the fp32 master weight into a *payload* (the tensors a worker keeps and the
parameter server sends: packed 4-bit bytes plus per-block scales, or int8 plus per-row scales),
and computes x W^T from the payload. Quantized formats never keep a dense copy for backward:
the weight is decoded again when the input gradient needs it (as QLoRA does), so a worker's
memory for the base is the payload's.
"""
from __future__ import annotations

import contextlib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from ..errors import ConfigError

BLOCKSIZE_4BIT = 64
ENCODE_PIECE = 1 << 22  # values a 4-bit encode takes at once (16 MiB of fp32): whole blocks


class BaseFormat(ABC):
    name: str = ""
    quantized: bool = False
    holds_master: bool = False  # stores an fp32 weight exactly, so a merge can update it in place

    @abstractmethod
    def layout(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Names ("" is the main tensor), shapes and dtypes of the payload of an out x in weight."""

    @abstractmethod
    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The payload of an fp32 weight; deterministic, so every process can check it bit for bit."""

    @abstractmethod
    def decode(self, payload: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The dense weight a payload stands for."""

    def linear(self, x: torch.Tensor, payload: dict[str, torch.Tensor], shape: tuple[int, int],
               bias: torch.Tensor | None) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if autocasting(x) else x.dtype
        with no_autocast(x):
            if x.requires_grad:
                y = _DecodedLinear.apply(x.to(dtype), self, shape, *[payload[k] for k in sorted(payload)])
            else:
                # Nothing to differentiate, so nothing to keep for backward. (Also: torch.compile
                # 2.14 fails on an autograd.Function none of whose inputs requires grad.)
                y = F.linear(x.to(dtype), self.decode(payload, shape, dtype))
            return y if bias is None else y + bias.to(y.dtype)


class Dense(BaseFormat):
    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype
        self.holds_master = dtype == torch.float32

    def layout(self, shape):
        return {"": (tuple(shape), self.dtype)}

    def encode(self, w):
        return {"": w.detach().to(self.dtype).clone()}

    def decode(self, payload, shape, dtype):
        return payload[""].to(dtype)

    def linear(self, x, payload, shape, bias):
        w = payload[""]
        if w.dtype == x.dtype and not autocasting(x):
            return F.linear(x, w, bias)  # autograd keeps w itself (the buffer), not x
        # A cast weight (bf16 base, fp32 input; or autocast) would be a dense copy that F.linear
        # keeps for backward; the decoded path casts again in backward instead.
        return super().linear(x, payload, shape, bias)


class FourBit(BaseFormat):
    """bitsandbytes 4-bit (nf4 or fp4), blockwise absmax scales, no double quantization."""

    quantized = True

    def __init__(self, quant_type: str):
        bnbf = _bitsandbytes(quant_type)
        self.name = self.quant_type = quant_type
        # The 16-entry code table, built once; a plain attribute (not a per-device cache that a
        # first call fills in) so a compiled step does not recompile after its first call.
        self._table = bnbf.get_4bit_type(quant_type, device="cpu")

    def _code(self, device: torch.device) -> torch.Tensor:
        return self._table.to(device)

    def layout(self, shape):
        n = math.prod(shape)
        return {"": (((n + 1) // 2, 1), torch.uint8), "absmax": ((-(-n // BLOCKSIZE_4BIT),), torch.float32)}

    def encode(self, w):
        import bitsandbytes.functional as bnbf

        if w.is_meta:  # shape-only models (memory accounting) hold shape-only payloads
            return {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in self.layout(tuple(w.shape)).items()}
        flat = w.detach().float().contiguous().view(-1)
        # in pieces of whole blocks (and whole bytes of two codes): the same codes and scales as one
        # call, while bitsandbytes' temporaries (about 3x the input on a CPU) stay a piece's size
        parts = [bnbf.quantize_4bit(piece, blocksize=BLOCKSIZE_4BIT, quant_type=self.quant_type)
                 for piece in flat.split(ENCODE_PIECE)]
        return {"": torch.cat([packed.view(-1, 1) for packed, _ in parts]),
                "absmax": torch.cat([state.absmax.float() for _, state in parts])}

    def decode(self, payload, shape, dtype):
        import bitsandbytes.functional as bnbf

        if payload[""].is_meta:
            return torch.empty(shape, dtype=dtype, device="meta")
        state = bnbf.QuantState(absmax=payload["absmax"], shape=torch.Size(shape), code=self._code(payload[""].device),
                                blocksize=BLOCKSIZE_4BIT, quant_type=self.quant_type, dtype=torch.float32)
        return bnbf.dequantize_4bit(payload[""], state).to(dtype)


class Int8(BaseFormat):
    """bitsandbytes LLM.int8 vector-wise quantization: int8 weights with one absmax scale per row."""

    name, quantized = "int8", True

    def __init__(self):
        _bitsandbytes(self.name)

    def layout(self, shape):
        return {"": (tuple(shape), torch.int8), "scale": ((shape[0],), torch.float32)}

    def encode(self, w):
        import bitsandbytes.functional as bnbf

        if w.is_meta:
            return {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in self.layout(tuple(w.shape)).items()}
        q, row_absmax, _ = bnbf.int8_vectorwise_quant(w.detach().to(torch.float16).contiguous())
        return {"": q, "scale": row_absmax.float()}

    def decode(self, payload, shape, dtype):
        return (payload[""].float() * (payload["scale"] / 127.0).unsqueeze(1)).to(dtype)


class _DecodedLinear(torch.autograd.Function):
    """x W^T with W decoded from its payload in forward and again in backward (never saved dense)."""

    @staticmethod
    def forward(x, fmt, shape, *payload_tensors):
        return F.linear(x, _decode(fmt, shape, payload_tensors, x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        # Separate from forward so torch.compile can trace the function into the step's graph.
        _, fmt, shape, *payload_tensors = inputs
        ctx.fmt, ctx.weight_shape = fmt, shape
        ctx.save_for_backward(*payload_tensors)

    @staticmethod
    def backward(ctx, grad):
        payload = ctx.saved_tensors  # read once: under activation checkpointing a second read fails
        w = _decode(ctx.fmt, ctx.weight_shape, payload, grad.dtype)
        return (grad @ w, None, None, *([None] * len(payload)))


def _decode(fmt, shape, tensors, dtype):
    names = sorted(fmt.layout(shape))
    return fmt.decode(dict(zip(names, tensors)), shape, dtype)


def autocasting(x: torch.Tensor) -> bool:
    # the meta device (shape-only memory accounting) has no autocast
    return x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)


def no_autocast(x: torch.Tensor):
    return contextlib.nullcontext() if x.device.type == "meta" else torch.autocast(x.device.type, enabled=False)


def _bitsandbytes(name: str):
    """bitsandbytes.functional, or a one-line refusal of format `name` without it."""
    # On CPU bitsandbytes warns that an optional fused 4-bit GEMM kernel is missing; we never call
    # it (the weight is decoded, then multiplied), so the warning is noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:
        raise ConfigError(f"base format {name} needs bitsandbytes, which did not import ({exc})") from None
    return bnbf


# The registry: a new format is a class and a line here (a format with settings declares them as a
# `settings` attribute of its factory, as activation options do, and takes them as keywords).
FORMATS: dict[str, Callable[..., BaseFormat]] = {
    "fp32": lambda: Dense("fp32", torch.float32),
    "bf16": lambda: Dense("bf16", torch.bfloat16),
    "nf4": lambda: FourBit("nf4"),
    "fp4": lambda: FourBit("fp4"),
    "int8": Int8,
}


def get_format(name: str, settings: Mapping | None = None, *, key: str = "base format") -> BaseFormat:
    """The format called `name`, with its settings (if it declares any) from `settings`."""
    make = FORMATS.get(name) if isinstance(name, str) else None
    if make is None:
        raise ConfigError(f"{key} must be one of {tuple(FORMATS)}, got {name!r}")
    values = settings or {}
    return make(**{s.key: values.get(s.key, s.default) for s in getattr(make, "settings", ())})


def check_runs_on(fmt: BaseFormat, device: torch.device) -> None:
    """Quantize, decode and multiply a small weight on `device`, or say clearly that it cannot."""
    try:
        w = torch.randn(8, 128, device=device)
        payload = fmt.encode(w)
        x = torch.randn(2, 128, device=device, requires_grad=True)
        fmt.linear(x, payload, (8, 128), None).sum().backward()
        error = float((fmt.decode(payload, (8, 128), torch.float32) - w).abs().max())  # real values, not shapes
        if not error <= 0.5 * float(w.abs().max()):
            raise RuntimeError(f"the decoded weight is off by {error:g}")
    except Exception as exc:  # bitsandbytes raises many kinds of errors for unsupported devices
        raise ConfigError(f"worker.base_dtype={fmt.name} cannot run on {device}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
