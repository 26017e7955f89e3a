"""Training speed of tinytale's loop against a straightforward eager PyTorch loop, side by side.

The baseline is what a first tutorial writes: random windows sliced from one token tensor,
no DataLoader, plain AdamW, one `.item()` per step. tinytale's `fit()` does more (a
DataLoader over story-split windows, validation every epoch, checkpoints, grad-norm
clipping with a NaN guard, and tracking: the MLflow tracker, logging to a real local
`mlflow server` that this script starts), and must still be at least as fast. fit() runs
twice a round, with the null tracker and with the MLflow one, so tracking's share shows too.

All variants run in this process on the same model shape, batch and token count, taking
turns in a rotating order so drift of a shared machine hits each alike. Prints a table and
one JSON line.

    python bench/cpu_speed.py --setting baby-gpt --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
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
from tinytale.tracking import NullTracker, RunInfo
from tinytale.train import fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.server import LocalServer  # noqa: E402 (the tests' local server)

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
    return eager_tokens_per_sec(cfg, tokens, vocab_size, steps)[0]


def eager_tokens_per_sec(cfg, tokens: torch.Tensor, vocab_size: int, steps: int
                         ) -> tuple[float, float]:
    """The eager loop's (tokens per wall second, tokens per CPU second of this process)."""
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    B, T = cfg.train.batch_size, cfg.model.block_size
    model.train()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        ix = torch.randint(len(tokens) - T - 1, (B,))
        x = torch.stack([tokens[i : i + T] for i in ix])
        y = torch.stack([tokens[i + 1 : i + T + 1] for i in ix])
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
    n = steps * B * T
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def tinytale_tokens_per_sec(cfg, data, tracking_uri: str | None = None) -> tuple[float, float]:
    """fit() for one epoch: (training tokens/s, tokens/s counting validation and checkpoints).

    With `tracking_uri`, fit() reports to the MLflow tracker as `tinytale train` does; closing
    the run (the final flush) happens after the clock stops, as registration does in train.
    """
    torch.manual_seed(0)
    model = build_model(cfg, data.tokenizer.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        tracker = NullTracker()
        if tracking_uri:
            from tinytale.mlflow_tracker import MlflowTracker

            tracker = MlflowTracker(cfg, tracking_uri)
            tracker.start(RunInfo(experiment="bench-cpu-speed", run_name="fit",
                                  params=cfg.flat(), local_dir=Path(tmp)))
        start = time.perf_counter()
        fields = {"config": cfg.to_dict(), "tokenizer": data.tokenizer.to_dict()}
        result = fit(model, data, cfg.train, tracker, Path(tmp), torch.device("cpu"),
                     checkpoint_fields=lambda: fields)
        wall = time.perf_counter() - start
        tracker.finish(result.status)
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


def measure(setting: str, repeats: int = 3, tracking_uri: str | None = None) -> dict:
    """Rounds of the eager loop, fit() with the null tracker and (with a server) fit() tracked.

    The variants take turns in a rotating order, and each fit() ratio is the median of its
    per-round ratios to the eager loop of the same round.
    """
    cfg = load_config(None, [*SETTINGS[setting], "train.epochs=1", "train.device=cpu",
                             "tracking.samples=0"])
    data = prepare_data(cfg)
    steps = len(data.train) // cfg.train.batch_size
    variants = ["eager", "fit"] + (["fit+mlflow"] if tracking_uri else [])
    train_tps: dict[str, list[float]] = {v: [] for v in variants}
    all_tps: dict[str, list[float]] = {v: [] for v in variants}
    # Round 0 is a warm-up of every variant, not counted: the first rounds of a process run
    # measurably slower (allocator, caches), which would flatter whichever variant runs later.
    for i in range(repeats + 1):
        for v in variants[i % len(variants):] + variants[:i % len(variants)]:
            if v == "eager":
                t = a = baseline_tokens_per_sec(cfg, data.train.tokens,
                                                data.tokenizer.vocab_size, steps)
            else:
                t, a = tinytale_tokens_per_sec(cfg, data, tracking_uri if v == "fit+mlflow"
                                               else None)
            if i > 0:
                train_tps[v].append(t)
                all_tps[v].append(a)
    base = train_tps["eager"]
    out = {"setting": setting, "steps_per_round": steps, "threads": torch.get_num_threads(),
           "repeats": repeats, "baseline_tokens_per_sec": statistics.median(base)}
    for v in variants[1:]:
        key = v.replace("+", "_")
        out[f"{key}_tokens_per_sec"] = statistics.median(train_tps[v])
        out[f"{key}_ratio"] = statistics.median(
            o / b for o, b in zip(train_tps[v], base, strict=True))
        out[f"{key}_ratio_with_validation"] = statistics.median(
            o / b for o, b in zip(all_tps[v], base, strict=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="baby-gpt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-tracking", action="store_true",
                        help="leave out the fit() variant that tracks to a local MLflow server")
    parser.add_argument("--ablate", action="store_true",
                        help="also measure what fused AdamW and batched windows each buy")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        uri = None
        if not args.no_tracking:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            server = LocalServer(root).start()
            stack.callback(server.stop)
            uri = server.url
        r = measure(args.setting, args.repeats, uri)
    if args.ablate:
        r["speedup_from"] = ablate(args.setting, args.repeats)
    print(f"setting {r['setting']}: {r['steps_per_round']} steps a round, "
          f"{r['threads']} threads, {args.repeats} rounds (medians; ratios paired by round)")
    print(f"  {'eager baseline':<30} {r['baseline_tokens_per_sec']:>8.0f} tok/s")
    for key, label in (("fit", "fit(), null tracker"), ("fit_mlflow", "fit(), MLflow tracker")):
        if f"{key}_ratio" in r:
            print(f"  {label:<30} {r[f'{key}_tokens_per_sec']:>8.0f} tok/s  ratio "
                  f"{r[f'{key}_ratio']:.3f}; {r[f'{key}_ratio_with_validation']:.3f} counting "
                  "validation and checkpoints")
    for change, ratio in r.get("speedup_from", {}).items():
        print(f"  {change:<21} buys x{ratio:.3f} (shipped / with it undone)")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
