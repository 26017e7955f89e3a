"""Text generation from a trained GPT: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import torch

from tinytale.model import GPT


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask all but the `top_k` largest logits and the smallest set reaching mass `top_p`."""
    if top_k > 0:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (always keeps the first).
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    return logits


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
) -> torch.Tensor:
    """Extend idx (B, T) by up to `max_new_tokens`; greedy when temperature == 0.

    Stops early once every row has produced `stop_token` (the end-of-story token).
    """
    was_training = model.training
    model.eval()
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        context = idx[:, -model.cfg.block_size :]
        logits, _ = model(context)
        logits = logits[:, -1, :]  # (B, vocab)
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            # Shift the best logit to 0 first: a tiny temperature then gives -inf, never NaN.
            logits = logits - logits.max(dim=-1, keepdim=True).values
            logits = filter_logits(logits / temperature, top_k, top_p)
            probs = torch.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat([idx, next_id], dim=1)
        if stop_token is not None:
            done |= next_id.squeeze(1) == stop_token
            if bool(done.all()):
                break
    model.train(was_training)
    return idx
