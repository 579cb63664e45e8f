"""Local-chunk training (Local LoRA, Key et al. 2023) as a way of running an LTE round.

The model's blocks f_1..f_L (found in its structure: the largest nn.ModuleList / nn.Sequential of
blocks of one class, e.g. a timm ViT's or Mixer's `blocks`, a GPT's list of blocks) are split into
C contiguous chunks; the first chunk also holds the stem e (every module registered before the
blocks, and parameters of the modules that contain them, such as a ViT's pos_embed), the last
the output head d (every module registered after them). A round's T batches are the data chunk:

    chunk 1:  d o f_L o (f_b1 .. f_1) o e     on the round's batches; f_b1's outputs are cached
    chunk i:  d o f_L o (f_bi .. f_b(i-1)+1)   on chunk i-1's cached outputs
    chunk C:  d o (f_L .. f_b(C-1)+1)          on chunk C-1's cached outputs: the model's own loss

each for T optimizer steps of that chunk's heads only, the proxy d o f_L (the paper's choice)
frozen. The cache lives in host memory. Then the round's factors go to the merge as usual.

The model's own forward runs every time: blocks outside the chunk and its proxy become
identities, the chunk's first block reads the cached input, and in chunks after the first the
stem's modules return zeros of their recorded output shapes (their values are never used), so
the stem need not be resident. On a GPU every part that the current chunk does not run (its
parameters, buffers and optimizer moments) waits in host memory; on a CPU nothing moves.
A block must map its input to an output of the same shape (a residual block), which the
models named above do.
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ConfigError, ModelError


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every move a chunked round makes between host and device goes through here (a test watches it).
    Asynchronous to the device only: a copy to pageable host memory may not be complete when it returns."""
    return t.to(device, non_blocking=device.type == "cuda")


def find_blocks(model: nn.Module, key: str = "worker.chunks > 1") -> tuple[str, list[nn.Module]]:
    """The model's list of blocks: the largest nn.ModuleList/nn.Sequential of >= 2 modules of one
    class (`key`: what needs them, for the error if there is none)."""
    best = None
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        size = sum(t.numel() for t in list(module.parameters()) + list(module.buffers()))
        if best is None or size > best[0]:
            best = (size, path, children)
    if best is None:
        raise ModelError(f"{key} needs a model with a list of blocks (an nn.ModuleList or "
                         f"nn.Sequential of blocks of one class, like a ViT's `blocks`); "
                         f"{type(model).__name__} has none")
    return best[1], best[2]


def split(blocks: int, chunks: int) -> list[range]:
    """Contiguous, as even as possible, earlier chunks one block larger."""
    base, extra = divmod(blocks, chunks)
    out, start = [], 0
    for i in range(chunks):
        stop = start + base + (1 if i < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


class LocalChunks:
    def __init__(self, model: nn.Module, chunks: int, params: list[torch.Tensor], optimizer, device: torch.device):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.path, self.blocks = find_blocks(model)
        if chunks > len(self.blocks):
            raise ConfigError(f"worker.chunks={chunks} is more than the {len(self.blocks)} blocks of "
                              f"'{self.path}'; at most one chunk per block")
        self.ranges = split(len(self.blocks), chunks)
        self.stem, self.head, self.shared = self._stem_and_head(model)
        trainable = {id(p) for p in params}
        own = lambda modules: [p for m in modules for p in m.parameters(recurse=False) if id(p) in trainable]  # noqa: E731
        self.trained = []  # per chunk: the parameters it trains
        for i, r in enumerate(self.ranges):
            ps = [p for j in r for p in self.blocks[j].parameters() if id(p) in trainable]
            if i == 0:
                ps += own(self.stem) + own(self.shared)
            if i == len(self.ranges) - 1:
                ps += own(self.head)
            self.trained.append(ps)
        self.params = params
        # stem modules that hold tensors: after chunk 1 they return zeros of the shapes recorded in chunk 1
        self._stateful_stem = [m for m in self.stem if any(True for _ in m.parameters(recurse=False))
                               or any(b is not None for b in m._buffers.values())]
        self._shapes: dict[int, list] = {}
        self._tap: list[torch.Tensor] | None = None
        self._input: torch.Tensor | None = None
        self._step = None  # the engine's TrainStep, during a round (its micro-batches)
        self.offload = device.type == "cuda"
        self.chunk_losses: list[float] = []

    @property
    def count(self) -> int:
        return len(self.ranges)

    def _stem_and_head(self, model):
        names = [p for p, _ in model.named_modules()]
        modules = dict(model.named_modules())
        at = names.index(self.path)
        inside = lambda p: p == self.path or p.startswith(self.path + ".")  # noqa: E731
        above = lambda p: p == "" or self.path.startswith(p + ".")  # noqa: E731
        stem = [modules[p] for p in names[:at] if not above(p)]
        head = [modules[p] for p in names[at:] if not inside(p)]
        shared = [modules[p] for p in names[:at] if above(p)]  # their own parameters count as stem
        return stem, head, shared

    # placement --------------------------------------------------------------------------
    def resident_modules(self, chunk: int) -> list[nn.Module]:
        """The modules chunk `chunk` runs: its blocks, the output head, the proxy's f_L (before the
        last chunk) and the stem (in the first)."""
        last = self.count - 1
        resident = [self.blocks[j] for j in self.ranges[chunk]] + self.head
        if chunk < last:
            resident.append(self.blocks[-1])  # the proxy's f_L
        if chunk == 0:
            resident += self.stem
        return resident

    def place(self, chunk: int | None) -> None:
        """Move what chunk `chunk` runs to the device and the rest to host memory (None: everything
        to the device). A no-op on a CPU."""
        if not self.offload:
            return
        everything = self.stem + self.blocks + self.head
        resident = {id(m) for m in (everything if chunk is None else self.resident_modules(chunk))}
        trained = {id(p) for p in (self.params if chunk is None else self.trained[chunk])}
        host = torch.device("cpu")
        for module in everything:
            for sub in module.modules():
                self._move(sub, self.device if id(module) in resident else host, trained)

    def _move(self, module: nn.Module, device: torch.device, trained: set[int]) -> None:
        host = torch.device("cpu")
        for p in module._parameters.values():
            if p is None:
                continue
            if p.device != device:
                p.data = to_device(p.data, device)
            # the optimizer moments of a frozen proxy are not needed on the device
            state = self.optimizer.state.get(p, {})
            target = device if id(p) in trained else host
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != target:
                    state[key] = to_device(value, target)
        for name, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[name] = to_device(b, device)

    # running one chunk ------------------------------------------------------------------
    @contextlib.contextmanager
    def arranged(self, chunk: int, feed: torch.Tensor | None = None, tap: list[torch.Tensor] | None = None):
        """The model's forward, for the length of the block, runs chunk `chunk` and its proxy.

        feed: the input of the chunk's first block (the previous chunk's cached output; chunks
        after the first). tap: a list the chunk's output is appended to, detached (in host memory
        on a GPU), for the next chunk (chunks before the last)."""
        self._input, self._tap = feed, tap
        last = self.count - 1
        r = self.ranges[chunk]
        patched = []

        def patch(module, forward):
            patched.append((module, module.__dict__.get("forward")))
            module.forward = types.MethodType(forward, module)

        for j, block in enumerate(self.blocks):
            inner = block.__dict__.get("forward") or types.MethodType(type(block).forward, block)
            runs = j in r or (j == len(self.blocks) - 1 and chunk < last)
            if not runs:
                patch(block, lambda self_, x, *a, **k: x)
                continue
            first, end = j == r.start and chunk > 0, j == r.stop - 1 and chunk < last
            if first or end:
                patch(block, self._wrap(inner, first, end))
        if chunk == 0:
            hooks = [m.register_forward_hook(self._record(m)) for m in self._stateful_stem]
            self._shapes = {}
        else:
            hooks = []
            calls = {id(m): iter(()) for m in self._stateful_stem}
            for m in self._stateful_stem:
                patch(m, self._placeholder(m, calls))
        wanted = {id(p) for p in self.trained[chunk]}
        for p in self.params:
            p.requires_grad_(id(p) in wanted)
        try:
            yield
        finally:
            self._input = self._tap = None
            for p in self.params:
                p.requires_grad_(True)
            for h in hooks:
                h.remove()
            for module, previous in reversed(patched):
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous

    def _wrap(self, inner, first: bool, end: bool):
        chunks = self

        def forward(self_, x, *args, **kwargs):
            out = inner(chunks.feed() if first else x, *args, **kwargs)
            if end and chunks._tap is not None:
                chunks._tap.append(out.detach().to("cpu") if chunks.offload else out.detach())
            return out
        return forward

    def feed(self) -> torch.Tensor:
        """The cached input of this chunk's first block: with micro-batches (train.grad_accum_steps),
        the current micro-batch's part of it."""
        step = self._step
        return self._input if step is None else step.micro(self._input, step.micro_index)

    def _record(self, module):
        def hook(mod, args, output):
            self._shapes.setdefault(id(mod), []).append((output.shape, output.dtype))
        return hook

    def _placeholder(self, module, calls):
        shapes = self._shapes.get(id(module), [])

        def forward(self_, *args, **kwargs):
            it = calls[id(module)]
            try:
                shape, dtype = next(it)
            except StopIteration:  # the next forward: start over
                calls[id(module)] = it = iter(shapes)
                shape, dtype = next(it)
            return torch.zeros(shape, dtype=dtype, device=self.device)
        return forward

    # a round ----------------------------------------------------------------------------
    def round(self, engine, steps: int) -> Iterator[torch.Tensor]:
        """Walk the chunks over the round's batches; yields the last chunk's loss step by step
        (every earlier chunk has finished its steps by then)."""
        start = engine.step
        batches, cache = [], None
        self.chunk_losses = []
        self._step = engine.step_function
        for chunk in range(self.count):
            self.place(chunk)
            outputs: list[torch.Tensor] = []
            losses = []
            last = chunk == self.count - 1
            for j in range(steps):
                if chunk == 0:  # the round's batches, kept for the later chunks (in host memory on a GPU)
                    x, y = engine.batches.get(start + j)
                    host = torch.device("cpu")
                    batches.append((to_device(x, host), to_device(y, host)) if self.offload else (x, y))
                else:
                    x, y = batches[j]
                feed = None if cache is None else cache[j].to(self.device, non_blocking=True)
                with self.arranged(chunk, feed=feed, tap=outputs):  # per step: the caller runs code between steps
                    loss = engine.step_on(x, y, start + j, advance=last)
                if not last:  # one output per step (a step of micro-batches tapped one per micro-batch)
                    outputs[j:] = [self._step.join(outputs[j:])]
                losses.append(loss)
                if last:
                    if j == steps - 1:  # read at the round's end; a .item() per step would sync the device
                        self.chunk_losses.append(torch.stack(losses).mean().item())
                    yield loss
            if not last:
                self.chunk_losses.append(torch.stack(losses).mean().item())
            cache = outputs
