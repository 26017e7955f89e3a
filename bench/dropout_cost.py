"""What dropout costs a CPU training step, with and without dropout on the attention weights.

For each model (the 128-wide baby GPT, a 384-wide 6-layer char model) three variants take
turns in a rotating order, after a warm-up round that is not counted:

  off           model.dropout 0, model.attn_dropout 0
  all-0.1       model.dropout 0.1, model.attn_dropout 0.1: what the model did before
                attn_dropout had a key of its own (scaled_dot_product_attention off its
                fused kernel, a mask drawn over every attention matrix)
  resid-0.1     model.dropout 0.1, model.attn_dropout 0 (the default): embeddings and the
                residual branches only, SDPA stays fused

Each measurement is the plain training step of bench/cpu_speed.py (random windows, forward,
backward, AdamW, one .item()) for a fixed number of steps, timed twice: wall clock (tokens/s)
and this process's CPU time (tokens per CPU-second). Ratios to `off` are medians of per-round
ratios, so drift of a shared machine hits the variants alike; on a busy machine the wall
clock also counts the seconds other jobs took the core, the CPU time does not (at 1 thread
the two agree on an idle machine), so its ratios are the steadier ones there.

    python bench/dropout_cost.py --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from cpu_speed import eager_tokens_per_sec  # noqa: E402
from precision import cpu_model  # noqa: E402

from tinytale.config import load_config  # noqa: E402
from tinytale.run import prepare_data  # noqa: E402

CHAR = ["data.corpus=fairy", "data.tokenizer=char", "train.batch_size=12", "train.lr=1e-3",
        "train.device=cpu", "tracking.samples=0"]
# (overrides, steps per measurement): a few seconds each at one thread.
MODELS = {
    "baby-gpt-128": ([*CHAR, "model.n_layer=4", "model.n_head=4", "model.n_embd=128",
                      "model.block_size=64", "data.n_stories=120"], 60),
    "char-384": ([*CHAR, "model.n_layer=6", "model.n_head=6", "model.n_embd=384",
                  "model.block_size=128", "data.n_stories=16"], 6),
}
VARIANTS = {
    "off": ["model.dropout=0.0", "model.attn_dropout=0.0"],
    "all-0.1": ["model.dropout=0.1", "model.attn_dropout=0.1"],
    "resid-0.1": ["model.dropout=0.1", "model.attn_dropout=0.0"],
}
DEFAULT_THREADS = torch.get_num_threads()  # before any set_num_threads below


def cost(name: str, repeats: int, threads: int) -> dict:
    overrides, steps = MODELS[name]
    torch.set_num_threads(threads or DEFAULT_THREADS)
    configs = {v: load_config(None, [*overrides, *extra]) for v, extra in VARIANTS.items()}
    data = prepare_data(configs["off"])
    tokens, vocab = data.train.tokens, data.tokenizer.vocab_size
    names = list(VARIANTS)
    tps: dict[str, list[float]] = {v: [] for v in names}
    tpc: dict[str, list[float]] = {v: [] for v in names}
    for i in range(repeats + 1):  # round 0: warm-up, not counted
        for v in names[i % len(names):] + names[:i % len(names)]:
            wall, cpu = eager_tokens_per_sec(configs[v], tokens, vocab, steps)
            if i > 0:
                tps[v].append(wall)
                tpc[v].append(cpu)
    out = {"model": name, "n_embd": configs["off"].model.n_embd,
           "block_size": configs["off"].model.block_size, "threads": torch.get_num_threads(),
           "steps_per_measurement": steps}
    for v in names:
        for unit, seen in (("sec", tps), ("cpu_sec", tpc)):
            out[f"{v}_tokens_per_{unit}"] = round(statistics.median(seen[v]))
            out[f"{v}_{unit}_ratio"] = round(statistics.median(
                a / b for a, b in zip(seen[v], seen["off"], strict=True)), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the 384-wide model (0: torch's default); "
                             "the 128-wide one always uses 1")
    args = parser.parse_args()
    started = time.perf_counter()
    result = {"cpu": cpu_model(), "repeats": args.repeats,
              "models": [cost("baby-gpt-128", args.repeats, 1),
                         cost("char-384", args.repeats, args.threads)]}
    result["seconds"] = round(time.perf_counter() - started)
    print(f"CPU {result['cpu']}, {args.repeats} rounds; medians of tokens per wall second "
          "(/s) and per CPU second (/cpu-s); ratios to dropout off are medians of per-round "
          "ratios")
    print(f"  {'model':<14} {'threads':>7} {'per':>6} " + " ".join(f"{v:>16}" for v in VARIANTS))
    for m in result["models"]:
        for unit, label in (("sec", "/s"), ("cpu_sec", "/cpu-s")):
            cells = " ".join(f"{m[f'{v}_tokens_per_{unit}']:>10} x{m[f'{v}_{unit}_ratio']:.2f}"
                             for v in VARIANTS)
            print(f"  {m['model']:<14} {m['threads']:>7} {label:>6} {cells}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
