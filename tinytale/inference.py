"""Inference: rebuild a trained model from a checkpoint and continue text with it.

What `tinytale generate`, the end-of-run samples and the served MLflow model share; it knows
nothing of training or tracking.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tinytale.checkpoint import load_checkpoint
from tinytale.config import Config
from tinytale.model import GPT, GPTConfig
from tinytale.sample import generate
from tinytale.tokenizer import Tokenizer, tokenizer_from_dict


def build_model(config: Config, vocab_size: int) -> GPT:
    """The one place a GPT is built from an experiment: every model.* key is a GPTConfig field."""
    return GPT(GPTConfig(vocab_size=vocab_size, **dataclasses.asdict(config.model)))


def load_model(checkpoint: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """Rebuild model and tokenizer from a checkpoint file (no pickled code is executed)."""
    state = load_checkpoint(checkpoint)
    config = Config.from_dict(state["config"], f"checkpoint '{checkpoint}'")
    tokenizer = tokenizer_from_dict(state["tokenizer"])
    model = build_model(config, tokenizer.vocab_size)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, tokenizer, state


def complete(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    num_samples: int = 1,
    stop_at_eos: bool = True,
) -> list[str]:
    """Continue `prompt` (or start a new story) `num_samples` times; returns prompt + text."""
    device = next(model.parameters()).device
    ids = [tokenizer.eos_id] + (tokenizer.encode(prompt) if prompt else [])
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, max_new_tokens, temperature, top_k, top_p, generator,
                   stop_token=tokenizer.eos_id if stop_at_eos else None)
    texts = []
    for row in out.tolist():
        new = row[len(ids):]
        if stop_at_eos and tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        continuation = tokenizer.decode(new)
        sep = " " if prompt and tokenizer.kind == "word" and continuation else ""
        texts.append((prompt + sep + continuation).strip())
    return texts


def sample_texts(checkpoint: Path, n: int, seed: int = 0) -> list[str]:
    if n <= 0:
        return []
    model, tokenizer, _ = load_model(checkpoint)
    return complete(model, tokenizer, num_samples=n, seed=seed, max_new_tokens=300)
