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
from tinytale.tokenizer import Tokenizer, TokenizerError, tokenizer_from_dict

# The request a published model shows as its example (MLflow's input example).
EXAMPLE_PROMPT = "once upon a time"


def build_model(config: Config, vocab_size: int) -> GPT:
    """The one place a GPT is built from an experiment: every model.* key is a GPTConfig field."""
    return GPT(GPTConfig(vocab_size=vocab_size, **dataclasses.asdict(config.model)))


def load_model(checkpoint: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """Rebuild model and tokenizer from a checkpoint file (no pickled code is executed)."""
    state = load_checkpoint(checkpoint)
    model, tokenizer = model_from_state(state, f"checkpoint '{checkpoint}'", device)
    return model, tokenizer, state


def model_from_state(state: dict[str, Any], source: str,
                     device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """Model (in eval mode) and tokenizer from a checkpoint's loaded state; `source` names it
    in errors."""
    config = Config.from_checkpoint(state["config"], source)
    tokenizer = tokenizer_from_dict(state["tokenizer"])
    model = build_model(config, tokenizer.vocab_size)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, tokenizer


def example_prompt(tokenizer: Tokenizer) -> str:
    """The lesson's opening where `tokenizer` can encode it (a word model of another corpus
    may not know these words), else the empty prompt, which starts a new story with any."""
    try:
        tokenizer.encode(EXAMPLE_PROMPT)
    except TokenizerError:
        return ""
    return EXAMPLE_PROMPT


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


def sample_texts(state: dict[str, Any], source: str, n: int, seed: int = 0) -> list[str]:
    """`n` stories of up to 300 tokens from the model of a checkpoint's loaded state."""
    if n <= 0:
        return []
    model, tokenizer = model_from_state(state, source)
    return complete(model, tokenizer, num_samples=n, seed=seed, max_new_tokens=300)


@dataclass(frozen=True)
class SamplePrompt:
    """One fixed way to sample at an epoch end: the same prompt and seed every time, so the
    rows of different epochs differ only by what the model has learned."""

    prompt: str
    temperature: float
    seed: int


# A greedy continuation (what the model thinks most likely: "the princess . the princess"
# early on, the lesson's grammar later) and one sample at temperature 1 (its whole
# distribution), both from the start of a story, which every tokenizer can encode.
EPOCH_PROMPTS = (SamplePrompt("", 0.0, 0), SamplePrompt("", 1.0, 1))
# Short: two sentences of the lesson, enough to show grammar and a character kept from one
# sentence to the next, at a cost within 3% of the lesson's training (bench/sampling_cost.py).
EPOCH_SAMPLE_TOKENS = 24


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
        """One row per prompt: sample number, text, prompt, temperature and seed."""
        start = time.perf_counter()
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                texts = self._generate(model, device)
        finally:
            model.train(was_training)
        self.seconds += time.perf_counter() - start
        # The text first: a table viewer shows the left columns without scrolling.
        return [{"sample": i, "text": text, "prompt": p.prompt, "temperature": p.temperature,
                 "seed": p.seed} for i, (p, text) in enumerate(zip(self.prompts, texts,
                                                                    strict=True))]

    @torch.inference_mode()  # a quarter faster than no_grad for the lesson's model
    def _generate(self, model: GPT, device: torch.device) -> list[str]:
        """Every prompt in one batch, one forward pass per new token: at this size a pass
        costs its fixed overhead, whatever the batch. Rows stop at the end-of-story token."""
        tok = self.tokenizer
        prompts = [[tok.eos_id] + (tok.encode(p.prompt) if p.prompt else [])
                   for p in self.prompts]
        width = max(len(ids) for ids in prompts)
        # Left-pad with end-of-story tokens, which is what precedes a story in training.
        idx = torch.tensor([[tok.eos_id] * (width - len(ids)) + ids for ids in prompts],
                           dtype=torch.long, device=device)
        generators = [torch.Generator(device=device).manual_seed(p.seed) for p in self.prompts]
        new: list[list[int]] = [[] for _ in self.prompts]
        done = [False] * len(self.prompts)
        for _ in range(self.max_new_tokens):
            logits = model(idx[:, -model.cfg.block_size:])[0][:, -1, :]  # (B, vocab)
            next_ids = logits.argmax(dim=-1)
            for row, p in enumerate(self.prompts):
                if p.temperature > 0:
                    probs = torch.softmax(logits[row] / p.temperature, dim=-1)
                    next_ids[row] = torch.multinomial(probs, 1, generator=generators[row])[0]
            idx = torch.cat([idx, next_ids[:, None]], dim=1)
            for row, token in enumerate(next_ids.tolist()):
                done[row] = done[row] or token == tok.eos_id
                if not done[row]:
                    new[row].append(token)
            if all(done):
                break
        texts = []
        for p, ids in zip(self.prompts, new, strict=True):
            sep = " " if p.prompt and tok.kind == "word" and ids else ""
            texts.append((p.prompt + sep + tok.decode(ids)).strip())
        return texts
