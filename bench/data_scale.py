"""Training throughput as the corpus grows (1 MB -> 1 GB of text): it must not fall.

For each size, a corpus of original tales is written (the fairy grammar with new seeds),
tokenized once into memory-mapped token files (timed separately: a one-off, cached), and
then the same char-level model trains for a fixed number of steps on batches drawn
from the whole corpus. Sizes run in one process, measured side by side.

    python bench/data_scale.py --sizes-mb 1 10 100 1000 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tinytale.config import load_config
from tinytale.corpus import fairy
from tinytale.data import train_loader
from tinytale.run import build_model, prepare_data
from tinytale.train import make_optimizer

MODEL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64",
         "train.batch_size=12", "data.tokenizer=char", "data.stream=true", "train.device=cpu"]


def write_corpus(path: Path, megabytes: float) -> int:
    target = int(megabytes * 2**20)
    written, seed = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            text = "\n\n".join(fairy.generate(500, seed=seed)) + "\n\n"
            f.write(text)
            written += len(text.encode())
            seed += 1
    return written


def steps_per_sec(data, cfg, steps: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = build_model(cfg, data.tokenizer.vocab_size)
    optimizer = make_optimizer(model, cfg.train, torch.device("cpu"))
    rates = []
    for r in range(repeats + 1):  # the first round warms up (page cache, allocator)
        loader = iter(train_loader(data.train, cfg.train.batch_size, cfg.train.seed, r + 1))
        batch = next(loader)  # the epoch's shuffle (randperm over all windows) is set-up,
        start = time.perf_counter()  # paid once per epoch: time the steps themselves
        for _ in range(steps):
            x, y = batch
            batch = next(loader)
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if r:
            rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 10, 100])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TINYTALE_CACHE", str(Path(tmp) / "cache"))
        for size in args.sizes_mb:
            corpus = Path(tmp) / f"tales-{size:g}MB.txt"
            nbytes = write_corpus(corpus, size)
            cfg = load_config(None, [*MODEL, f"data.corpus={corpus}"])
            start = time.perf_counter()
            data = prepare_data(cfg)
            tokenize_s = time.perf_counter() - start
            start = time.perf_counter()
            prepare_data(cfg)
            cached_s = time.perf_counter() - start
            rate = steps_per_sec(data, cfg, args.steps, args.repeats)
            tokens_per_sec = rate * cfg.train.batch_size * cfg.model.block_size
            results.append({"corpus_mb": round(nbytes / 2**20, 1),
                            "train_tokens": len(data.train.tokens),
                            "tokenize_once_s": round(tokenize_s, 2),
                            "cached_open_s": round(cached_s, 3),
                            "tokens_per_sec": round(tokens_per_sec)})
            corpus.unlink()
    base = results[0]["tokens_per_sec"]
    print(f"{'corpus':>10} {'train tokens':>13} {'tokenize':>9} {'reopen':>8} {'tok/s':>8} "
          f"{'vs smallest':>11}")
    for r in results:
        print(f"{r['corpus_mb']:>8.1f}MB {r['train_tokens']:>13,} {r['tokenize_once_s']:>8.1f}s "
              f"{r['cached_open_s']:>7.3f}s {r['tokens_per_sec']:>8} "
              f"{r['tokens_per_sec'] / base:>11.2f}")
    print(json.dumps({"data_scale": results}))


if __name__ == "__main__":
    main()
