"""Training speed of tinytale's loop against a straightforward eager PyTorch loop, side by side.

The baseline is what a first tutorial writes: random windows sliced from one token tensor,
no DataLoader, plain AdamW, one `.item()` per step. tinytale's `fit()` does more (a
DataLoader over story-split windows, validation every epoch, checkpoints, grad-norm
clipping with a NaN guard, a tracker), and must still be at least as fast.

Both run in this process on the same model shape, batch and token count, alternating
A B B A so drift of a shared machine hits both. Prints a table and one JSON line.

    python bench/cpu_speed.py --setting baby-gpt --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

import tinytale.data as data_mod
import tinytale.train as train_mod
from tinytale.config import load_config
from tinytale.model import param_groups
from tinytale.run import build_model, prepare_data
from tinytale.tracking import NullTracker
from tinytale.train import fit

SETTINGS = {
    # The small CPU setting of minimal GPT trainers: 4 layers, 4 heads, 128 wide, block 64.
    "baby-gpt": ["data.corpus=fairy", "data.tokenizer=char", "model.n_layer=4",
                 "model.n_head=4", "model.n_embd=128", "model.block_size=64",
                 "model.dropout=0.0", "train.batch_size=12", "train.lr=1e-3",
                 "train.warmup_steps=10", "data.n_stories=120"],
    "lesson": [],
}


def baseline_tokens_per_sec(cfg, tokens: torch.Tensor, vocab_size: int, steps: int) -> float:
    """The eager loop: random windows, no DataLoader, one .item() per step."""
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    B, T = cfg.train.batch_size, cfg.model.block_size
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        ix = torch.randint(len(tokens) - T - 1, (B,))
        x = torch.stack([tokens[i : i + T] for i in ix])
        y = torch.stack([tokens[i + 1 : i + T + 1] for i in ix])
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
    return steps * B * T / (time.perf_counter() - start)


def tinytale_tokens_per_sec(cfg, data) -> tuple[float, float]:
    """fit() for one epoch: (training tokens/s, tokens/s counting validation and checkpoints)."""
    torch.manual_seed(0)
    model = build_model(cfg, data.tokenizer.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = fit(model, data, cfg.train, NullTracker(), Path(tmp), torch.device("cpu"),
                     checkpoint_extra={"config": cfg.to_dict(),
                                       "tokenizer": data.tokenizer.to_dict()})
        wall = time.perf_counter() - start
    epoch = result.state.history[-1]
    tokens = result.state.step * cfg.train.batch_size * cfg.model.block_size
    return epoch["tokens_per_sec"], tokens / wall


@contextlib.contextmanager
def without(change: str):
    """Undo one of fit()'s speed choices for the duration (benchmark-only monkeypatching)."""
    if change == "fused-adamw":
        original = train_mod.make_optimizer

        def foreach_adamw(model, cfg, device):
            return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), foreach=True)

        train_mod.make_optimizer = foreach_adamw
        try:
            yield
        finally:
            train_mod.make_optimizer = original
    elif change == "batched-windows":
        # Per-window __getitem__ and default_collate: what a plain Dataset does.
        getitems, collate = data_mod.TokenWindows.__getitems__, data_mod._whole_batch
        data_mod.TokenWindows.__getitems__ = None
        data_mod._whole_batch = default_collate
        try:
            yield
        finally:
            data_mod.TokenWindows.__getitems__, data_mod._whole_batch = getitems, collate
    else:
        raise ValueError(change)


def ablate(setting: str, repeats: int) -> dict:
    """What each choice buys: fit() as shipped vs fit() with that one choice undone."""
    cfg = load_config(None, [*SETTINGS[setting], "train.epochs=1", "train.device=cpu"])
    data = prepare_data(cfg)
    tinytale_tokens_per_sec(cfg, data)  # warm-up
    out = {}
    for change in ("fused-adamw", "batched-windows"):
        ratios = []
        for i in range(repeats):
            # A B, then B A: whichever runs second in a pair may find the machine warmer.
            if i % 2 == 0:
                shipped = tinytale_tokens_per_sec(cfg, data)[0]
            with without(change):
                undone = tinytale_tokens_per_sec(cfg, data)[0]
            if i % 2 == 1:
                shipped = tinytale_tokens_per_sec(cfg, data)[0]
            ratios.append(shipped / undone)
        out[change] = statistics.median(ratios)
    return out


def measure(setting: str, repeats: int = 3) -> dict:
    cfg = load_config(None, [*SETTINGS[setting], "train.epochs=1", "train.device=cpu"])
    data = prepare_data(cfg)
    steps = len(data.train) // cfg.train.batch_size
    base, ours, ours_all = [], [], []
    fit_rounds = [tinytale_tokens_per_sec(cfg, data)]  # warm-up, not counted
    del fit_rounds
    baseline_tokens_per_sec(cfg, data.train.tokens, data.tokenizer.vocab_size, 5)
    for i in range(repeats):
        # A B, then B A, so neither side is always the one that runs second.
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for side in order:
            if side == 0:
                base.append(baseline_tokens_per_sec(cfg, data.train.tokens,
                                                    data.tokenizer.vocab_size, steps))
            else:
                train_tps, all_tps = tinytale_tokens_per_sec(cfg, data)
                ours.append(train_tps)
                ours_all.append(all_tps)
    return {
        "setting": setting,
        "steps_per_round": steps,
        "threads": torch.get_num_threads(),
        "baseline_tokens_per_sec": statistics.median(base),
        "tinytale_tokens_per_sec": statistics.median(ours),
        "tinytale_tokens_per_sec_with_validation": statistics.median(ours_all),
        "ratio": statistics.median(o / b for o, b in zip(ours, base, strict=True)),
        "ratio_with_validation": statistics.median(
            o / b for o, b in zip(ours_all, base, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="baby-gpt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--ablate", action="store_true",
                        help="also measure what fused AdamW and batched windows each buy")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.setting, args.repeats)
    if args.ablate:
        r["speedup_from"] = ablate(args.setting, args.repeats)
    print(f"setting {r['setting']}: {r['steps_per_round']} steps/round, "
          f"{r['threads']} threads, median of {args.repeats}")
    print(f"  eager baseline        {r['baseline_tokens_per_sec']:>10.0f} tok/s")
    print(f"  tinytale fit()        {r['tinytale_tokens_per_sec']:>10.0f} tok/s  "
          f"ratio {r['ratio']:.3f}")
    print(f"  fit() incl. val+ckpt  {r['tinytale_tokens_per_sec_with_validation']:>10.0f} tok/s  "
          f"ratio {r['ratio_with_validation']:.3f}")
    for change, ratio in r.get("speedup_from", {}).items():
        print(f"  {change:<21} buys x{ratio:.3f} (shipped / with it undone)")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
