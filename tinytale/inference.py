"""Inference: rebuild a trained model from a checkpoint and continue text with it.

What `tinytale generate`, the end-of-run samples and the served MLflow model share; it knows
nothing of training or tracking.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class SamplePrompt:
    """One fixed way to sample at an epoch end: the same prompt and seed every time, so the
    rows of different epochs differ only by what the model has learned."""

    prompt: str
    temperature: float
    seed: int


# A greedy continuation (what the model thinks most likely: "the the the" early on, the
# lesson's grammar later) and one sample at temperature 1 (its whole distribution), both
# from the start of a story, which every tokenizer can encode.
EPOCH_PROMPTS = (SamplePrompt("", 0.0, 0), SamplePrompt("", 1.0, 1))
EPOCH_SAMPLE_TOKENS = 40  # short: a sentence or two of the lesson, cheap to generate


@dataclass
class EpochSampler:
    """Generates the per-epoch samples from the model being trained, leaving no trace on the
    training: eval mode and no gradients while it runs, train mode and every RNG state (the
    CPU's and the accelerator's) as they were afterwards. `seconds` adds up its cost."""

    tokenizer: Tokenizer
    every_epochs: int
    prompts: tuple[SamplePrompt, ...] = EPOCH_PROMPTS
    max_new_tokens: int = EPOCH_SAMPLE_TOKENS
    seconds: float = 0.0

    def due(self, epoch: int) -> bool:
        """Epoch 1 (the first stage: token frequencies) and every `every_epochs` epochs."""
        return self.every_epochs > 0 and (epoch == 1 or epoch % self.every_epochs == 0)

    def __call__(self, model: GPT) -> list[dict[str, Any]]:
        """One row per prompt: sample number, prompt, temperature, seed and text."""
        start = time.perf_counter()
        device = next(model.parameters()).device
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            rows = [
                # The text first: a table viewer shows the left columns without scrolling.
                {"sample": i,
                 "text": complete(model, self.tokenizer, p.prompt, self.max_new_tokens,
                                  p.temperature, seed=p.seed)[0],
                 "prompt": p.prompt, "temperature": p.temperature, "seed": p.seed}
                for i, p in enumerate(self.prompts)
            ]
        self.seconds += time.perf_counter() - start
        return rows
