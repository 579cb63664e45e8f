"""Optimisation helpers that keep heads independent.

AdamW is elementwise, so one AdamW over the stacked head tensors is N independent AdamWs.
Gradient clipping is not: a global norm would let one head's large gradient shrink every other
head's step. Clipping here is per head, over that head's slice of every trainable tensor.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch.optim.adamw import adamw


@torch.no_grad()
def head_grad_norms(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each head's gradient, over all tensors stacked on dim 0 (shape: heads)."""
    total = None
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).flatten(1).sum(1)
        total = sq if total is None else total + sq.to(total.device)
    if total is None:
        raise ValueError("no gradients to clip")
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_per_head_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each head's gradient so its norm is at most max_norm; returns the norms before."""
    params = [p for p in params if p.grad is not None]
    norms = head_grad_norms(params)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.device, p.grad.dtype).view(-1, *([1] * (p.dim() - 1))))
    return norms


def cosine_with_warmup(step: int, *, warmup: int, total: int, min_ratio: float = 0.0, **_) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine decay to min_ratio at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


DECAY_SHAPES = {"linear": lambda p: 1.0 - p, "1-sqrt": lambda p: 1.0 - math.sqrt(p)}


def warmup_stable_decay(step: int, *, warmup: int, total: int, min_ratio: float = 0.0, decay_fraction: float = 0.2,
                        decay_shape: str = "linear") -> float:
    """LR multiplier: linear warmup over `warmup` steps, constant, then a decay to min_ratio over the
    last decay_fraction of the steps, linear or 1-sqrt (1 - sqrt(progress)); a run can be extended
    or compared at any step before its decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay = max(1, round(decay_fraction * total))
    start = max(warmup, total - decay)
    if step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, total - start))
    return min_ratio + (1.0 - min_ratio) * DECAY_SHAPES[decay_shape](progress)


SCHEDULES = {"cosine": cosine_with_warmup, "wsd": warmup_stable_decay}  # train.schedule


NORM_CHUNK = 1024  # values a chunk of a row's norm; HeadOptimizer's rows are whole chunks


def head_norms(grads: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row of a heads x D buffer (D a multiple of NORM_CHUNK): the norms of its
    chunks, then theirs. In chunks, so that every head's norm is summed in the same order whatever
    the number of rows and threads: a simulated run's head and the same head on a worker get the
    same bits (a reduction over a whole row is split between threads differently)."""
    chunks = torch.linalg.vector_norm(grads.view(grads.shape[0], -1, NORM_CHUNK), dim=2)
    return torch.linalg.vector_norm(chunks, dim=1)


class HeadOptimizer:
    """AdamW over per-head tensors (heads on dim 0) laid out in one heads x D buffer.

    Every tensor becomes a view of `values` (row h holds head h's slice of every tensor); before a
    clip or a step its gradient (as autograd left it) is gathered into `grads` by one concatenation
    and becomes a view of it, so that per-head clipping is a norm over the rows of one tensor and
    the optimizer one fused step over one contiguous tensor: a handful of kernels a step instead of
    a few per tensor (a ViT-S has 202).
    The tensors keep their identity (the model's Parameters, their keys and shapes), and `state`
    shows each one's optimizer state as views, as torch.optim.AdamW would hold it, so code that
    reads, writes or clears one tensor's moments (a merge with reset=ab, restarted heads, a
    worker's checkpoint) works unchanged. AdamW is elementwise, so this is the same AdamW.
    """

    def __init__(self, params: list[torch.Tensor], *, lr: float, weight_decay: float = 0.0):
        heads, device = params[0].shape[0], params[0].device
        if any(p.shape[0] != heads or p.dtype != torch.float32 or p.device != device for p in params):
            raise ValueError("HeadOptimizer takes fp32 tensors of one device with the same number of heads on dim 0")
        widths = [p[0].numel() for p in params]
        pad = -sum(widths) % NORM_CHUNK  # zeros after the tensors, so that a row is whole chunks
        self.values = torch.zeros(heads, sum(widths) + pad, device=device)
        self.padding = torch.zeros(heads, pad, device=device)  # what the padding's gradient is
        self.grads = torch.zeros_like(self.values)
        self.values.grad = self.grads
        self.params, self.views, self.grad_views = list(params), {}, []
        start = 0
        with torch.no_grad():
            for p, width in zip(params, widths):
                view = self.values[:, start:start + width].view(p.shape)
                view.copy_(p)
                p.data = view  # the Parameter stays the model's; its storage is now the buffer's
                self.views[p] = (start, width)
                self.grad_views.append(self.grads[:, start:start + width].view(p.shape))
                start += width
        self.optimizer = torch.optim.AdamW([self.values], lr=lr, weight_decay=weight_decay, fused=True)
        self.compiled = None  # compile(): the clip and step as one compiled function

    @torch.no_grad()
    def gather(self) -> None:
        """Every tensor's gradient into `grads` (a tensor autograd gave none counts zero), each
        tensor's .grad then a view of it."""
        if all(p.grad is g for p, g in zip(self.params, self.grad_views)):
            return
        heads = self.grads.shape[0]
        parts = [(p.grad if p.grad is not None else torch.zeros_like(g)).reshape(heads, -1)
                 for p, g in zip(self.params, self.grad_views)]
        torch.cat(parts + [self.padding], dim=1, out=self.grads)
        for p, g in zip(self.params, self.grad_views):
            p.grad = g

    @torch.no_grad()
    def compute_copies(self, dtype: torch.dtype) -> dict[torch.Tensor, torch.Tensor]:
        """Every tensor's values in dtype, by tensor, from one cast of `values`: one op a step
        instead of one per tensor (linear.precast hands them to the LTE layers)."""
        copy = self.values.to(dtype)
        return {p: copy[:, start:start + width].view(p.shape) for p, (start, width) in self.views.items()}

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @property
    def state(self) -> HeadState:
        return HeadState(self)

    @torch.no_grad()
    def clip_(self, max_norm: float) -> torch.Tensor:
        """Scale each head's gradient so its norm is at most max_norm (clip_grad_norm_per_head_ over
        every tensor at once); returns the norms before."""
        self.gather()
        norms = head_norms(self.grads)
        self.grads.mul_((max_norm / (norms + 1e-6)).clamp_(max=1.0).unsqueeze(1))
        return norms

    def step(self) -> None:
        self.gather()
        self.optimizer.step()

    @torch.no_grad()
    def update(self, lr: float, max_norm: float) -> None:
        """A step at learning rate lr after the per-head clip at max_norm (0: none), then zeroed gradients."""
        if self.compiled is None:
            if max_norm > 0:
                self.clip_(max_norm)
            for group in self.param_groups:
                group["lr"] = lr
            self.step()
        else:
            self.gather()
            state = HeadState(self)._flat(create=True)
            self.lr.fill_(lr)  # a tensor, so that a new learning rate is not a new graph
            group = self.param_groups[0]
            self.compiled(self.values, self.grads, state["exp_avg"], state["exp_avg_sq"], state["step"], self.lr,
                          max_norm, betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])
        self.zero_grad()

    def compile(self, mode: str = "default") -> None:
        """Run update's clip and step as one compiled graph in torch.compile's `mode` (torch's
        functional AdamW, which compiles with a tensor learning rate; its fused kernel does not)."""
        self.lr = torch.tensor(self.param_groups[0]["lr"], device=self.values.device)
        self.compiled = torch.compile(_clip_and_step, fullgraph=True, mode=mode)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No gradient until the next backward (which leaves its own: the next gather overwrites
        `grads`); set_to_none=False zeroes the gathered ones instead."""
        if set_to_none:
            for p in self.params:
                p.grad = None
        else:
            self.gather()
            self.grads.zero_()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def _clip_and_step(values, grads, exp_avg, exp_avg_sq, step, lr, max_norm: float, *, betas=(0.9, 0.999),
                   eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    if max_norm > 0:
        norms = head_norms(grads)
        grads = grads * (max_norm / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)
    adamw([values], [grads], [exp_avg], [exp_avg_sq], [], [step], foreach=False, capturable=False,
                            differentiable=False, fused=None, grad_scale=None, found_inf=None, has_complex=False,
                            amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps,
                            maximize=False)


class HeadState:
    """One tensor's view of a HeadOptimizer's AdamW state: optimizer.state[p], as torch's would be."""

    def __init__(self, owner: HeadOptimizer):
        self.owner = owner

    def _flat(self, create: bool) -> dict:
        state = self.owner.optimizer.state
        values = self.owner.values
        if not state.get(values) and create:  # before the first step: what AdamW would start from
            state[values] = {"step": torch.zeros((), dtype=torch.float32, device=values.device),
                             "exp_avg": torch.zeros_like(values), "exp_avg_sq": torch.zeros_like(values)}
        return state.get(values, {})

    def get(self, p: torch.Tensor, default=None) -> dict | None:
        if p not in self.owner.views:
            return default
        flat = self._flat(create=False)
        if not flat:
            return default if default is not None else {}
        start, width = self.owner.views[p]
        return {k: v if v.dim() == 0 else v[:, start:start + width].view(p.shape) for k, v in flat.items()}

    def __getitem__(self, p: torch.Tensor) -> dict:
        out = self.get(p)
        if out is None:
            raise KeyError(p)
        return out

    def __contains__(self, p) -> bool:
        return p in self.owner.views and bool(self._flat(create=False))

    @torch.no_grad()
    def __setitem__(self, p: torch.Tensor, value: dict) -> None:
        """Write one tensor's state into the buffer's (the step count is the buffer's, shared by all)."""
        flat = self._flat(create=True)
        start, width = self.owner.views[p]
        for k, v in value.items():
            if flat[k].dim() == 0:
                flat[k].copy_(v)
            else:
                flat[k][:, start:start + width].view(p.shape).copy_(v)


# A gradient that is a view of HeadOptimizer's buffer has its parameter's strides; autograd warns
# about such a layout (for a strided, non-dense parameter), which costs nothing here.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
