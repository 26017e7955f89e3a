"""bf16 autocast and torch.compile on the CPU, against the plain eager fp32 loop, side by side.

For each model width (the 128-wide baby GPT, a 384-wide char model) the variants take turns
in a rotating order, one epoch of fit() each, after a warm-up round that is not counted:

  eager-fp32      the plain loop of bench/cpu_speed.py (random windows, AdamW, .item())
  fit-fp32        fit(), train.precision=fp32
  fit-bf16        fit(), train.precision=bf16 (autocast)
  fit-auto        fit() as shipped: train.precision=auto picks per CPU and width
  fit-compiled    fit() with train.compile=true in auto precision: its compile time (the first
                  epoch's extra seconds in the warm-up round, inductor's disk cache empty) is
                  reported apart from its tokens/s after compiling

Ratios are medians of per-round ratios to the eager loop of the same round. Then the loss
curves: the lesson (64 wide) and the char model (fairy_char.yaml, shortened) trained in
fp32 and in bf16, the largest per-epoch relative gap in validation loss reported.

    python bench/precision.py --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from cpu_speed import baseline_tokens_per_sec  # noqa: E402

from tinytale.config import load_config  # noqa: E402
from tinytale.device import choose_precision, cpu_native_bf16  # noqa: E402
from tinytale.run import build_model, prepare_data  # noqa: E402
from tinytale.tracking import NullTracker  # noqa: E402
from tinytale.train import fit  # noqa: E402

CHAR = ["data.corpus=fairy", "data.tokenizer=char", "model.block_size=64", "model.dropout=0.0",
        "train.batch_size=12", "train.lr=1e-3", "train.warmup_steps=10", "train.device=cpu",
        "tracking.samples=0"]
WIDTHS = {
    "baby-gpt-128": [*CHAR, "model.n_layer=4", "model.n_head=4", "model.n_embd=128",
                     "data.n_stories=120"],
    "char-384": [*CHAR, "model.n_layer=6", "model.n_head=6", "model.n_embd=384",
                 "data.n_stories=16"],
}
VARIANTS = ("eager-fp32", "fit-fp32", "fit-bf16", "fit-auto", "fit-compiled")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def fit_epochs(cfg, data, epochs: int = 1) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(cfg, data.tokenizer.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(model, data, cfg.train, NullTracker(), Path(tmp), torch.device("cpu"))
    return result.state.history


def speed(setting: str, repeats: int) -> dict:
    base = load_config(None, [*WIDTHS[setting], "train.epochs=1"])
    data = prepare_data(base)
    steps = len(data.train) // base.train.batch_size
    configs = {
        "fit-fp32": load_config(None, [*WIDTHS[setting], "train.epochs=1",
                                       "train.precision=fp32"]),
        "fit-bf16": load_config(None, [*WIDTHS[setting], "train.epochs=1",
                                       "train.precision=bf16"]),
        "fit-auto": base,
        # Two epochs: the first compiles, the second is the speed after compiling.
        "fit-compiled": load_config(None, [*WIDTHS[setting], "train.epochs=2",
                                           "train.compile=true"]),
    }
    tps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    compile_s: list[float] = []
    for i in range(repeats + 1):  # round 0: warm-up, not counted
        order = VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]
        for v in order:
            if v == "eager-fp32":
                t = baseline_tokens_per_sec(base, data.train.tokens, data.tokenizer.vocab_size,
                                            steps)
            else:
                history = fit_epochs(configs[v], data)
                t = history[-1]["tokens_per_sec"]
                if v == "fit-compiled":
                    compile_s.append(history[0]["epoch_time_s"] - history[-1]["epoch_time_s"])
            if i > 0:
                tps[v].append(t)
    out = {"setting": setting, "n_embd": base.model.n_embd, "steps_per_round": steps,
           "auto_picks": choose_precision("auto", "cpu", base.model.n_embd),
           "eager_fp32_tokens_per_sec": round(statistics.median(tps["eager-fp32"]))}
    for v in VARIANTS[1:]:
        out[f"{v}_ratio"] = round(statistics.median(
            a / b for a, b in zip(tps[v], tps["eager-fp32"], strict=True)), 3)
    # The warm-up round compiles from nothing; later rounds find torch's in-process caches
    # (a new `tinytale train` process compiles from nothing, as the first round does).
    out["compile_s"] = round(compile_s[0], 1)
    return out


def loss_gap(name: str, overrides: list[str]) -> dict:
    """fp32 vs bf16 validation-loss curves of one experiment, same seed and data."""
    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(None, [*overrides, f"train.precision={precision}"])
        data = prepare_data(cfg)
        curves[precision] = [h["val_loss"] for h in fit_epochs(cfg, data)]
    gaps = [abs(b / a - 1) for a, b in zip(curves["fp32"], curves["bf16"], strict=True)]
    return {"experiment": name, "epochs": len(gaps),
            "final_val_loss_fp32": round(curves["fp32"][-1], 4),
            "final_val_loss_bf16": round(curves["bf16"][-1], 4),
            "max_relative_gap": round(max(gaps), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady on a shared machine; 0: torch's default)")
    parser.add_argument("--skip-curves", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    # The compile time a user's first compiled run pays: inductor's on-disk cache (kept across
    # processes in /tmp) starts empty here. Measured 2026-12-06 with a script compiling the
    # 128-wide model's step in a new process: 37.6 s with an empty cache, 14.1 s with a warm one.
    inductor_cache = tempfile.TemporaryDirectory(prefix="tinytale-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache.name
    result = {"cpu": cpu_model(), "native_bf16": cpu_native_bf16(),
              "threads": torch.get_num_threads(), "repeats": args.repeats,
              "speed": [speed(s, args.repeats) for s in WIDTHS]}
    if not args.skip_curves:
        result["loss_curves"] = [
            loss_gap("lesson", ["train.device=cpu", "tracking.samples=0"]),
            loss_gap("fairy_char (2 epochs, 100 stories)",
                     [*WIDTHS["baby-gpt-128"], "data.n_stories=100", "train.epochs=2",
                      "train.warmup_steps=100"]),
        ]
    result["seconds"] = round(time.perf_counter() - started)
    print(f"CPU {result['cpu']} (native bf16: {result['native_bf16']}), "
          f"{result['threads']} torch threads, {args.repeats} rounds; ratios to the eager "
          "fp32 loop, medians of per-round ratios")
    for s in result["speed"]:
        print(f"  {s['setting']:<14} eager {s['eager_fp32_tokens_per_sec']:>7} tok/s  " +
              "  ".join(f"{v[4:]} x{s[f'{v}_ratio']:.2f}" for v in VARIANTS[1:]) +
              f"  (auto = {s['auto_picks']}; compile {s['compile_s']} s)")
    for c in result.get("loss_curves", []):
        print(f"  {c['experiment']}: val loss fp32 {c['final_val_loss_fp32']} bf16 "
              f"{c['final_val_loss_bf16']}, largest per-epoch gap {c['max_relative_gap']:.2%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
