"""Generate text with a trained language model:

    python -m lte.sample --run OUT_DIR [--prompt TEXT] [--tokens N] [--temperature 0.8] [--top-k 200]

rebuilds the run's model and its data's tokenizer from OUT_DIR/config.json, loads OUT_DIR/final.pt
(a plain state_dict of the model, whatever mode trained it) and continues the prompt by N tokens,
each drawn from the model's next-token distribution (softmax of logits / temperature, restricted
to the top k; temperature 0 takes the most likely token).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .errors import ConfigError, UserError
from .models import stated_sizes
from .runtime import tasks


@torch.no_grad()
def generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, *, block_size: int,
             temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue the token ids `ids` (B x T) by `new_tokens`, seeing at most block_size tokens at a time."""
    for _ in range(new_tokens):
        logits = tasks.logits(model(ids[:, -block_size:]))[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, nxt.to(ids.dtype)], dim=1)
    return ids


def load_run(run_dir: Path, device: torch.device, weights: str = "final.pt"):
    """(model with the run's trained weights, in eval mode, and its data's tokenizer)."""
    from .runtime.results import load_run as load_model

    model, cfg, data = load_model(run_dir, device, weights)
    if data.task != "language_model" or data.tokenizer is None:
        raise UserError(f"the run in {run_dir} did not train a language model with a tokenizer "
                        f"(data.name={cfg.data.name}, task {data.task})")
    return model, data.tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lte.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="the out_dir of a finished lte-train run")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--tokens", type=int, default=500, help="tokens to generate (default 500)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default="final.pt", help="state_dict file in the run folder")
    args = parser.parse_args(argv)
    try:
        if args.tokens < 0 or args.temperature < 0 or args.top_k < 1:
            raise ConfigError("--tokens and --temperature must be >= 0 and --top-k >= 1")
        device = torch.device(args.device)
        model, tokenizer = load_run(args.run, device, args.weights)
        try:
            prompt = tokenizer.encode(args.prompt)
        except ValueError as exc:
            raise UserError(f"--prompt: {exc}") from None
        if not prompt:
            raise UserError("--prompt must hold at least one token")
        block = stated_sizes(model)[1] or len(prompt) + args.tokens
        ids = generate(model, torch.tensor([prompt], device=device), args.tokens, block_size=block,
                       temperature=args.temperature, top_k=args.top_k,
                       generator=torch.Generator(device).manual_seed(args.seed))
    except UserError as exc:
        print(f"lte.sample: error: {exc}", file=sys.stderr)
        return 2
    print(args.prompt + tokenizer.decode(ids[0, len(prompt):].tolist()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
