"""Training throughput as the corpus grows (1 MB -> 1 GB of text): it must not fall.

For each size, a corpus of original tales is written (the fairy grammar with new seeds),
tokenized once into memory-mapped token files (timed separately: a one-off, cached), and
then the same char-level model trains for a fixed number of steps on batches drawn
from the whole corpus. Sizes run in one process, in interleaved rounds (side by side).

    python bench/data_scale.py --sizes-mb 1 10 100 1000 --steps 40 --repeats 9
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


class Trainer:
    """One model training on one corpus's windows, a round of `steps` steps at a time."""

    def __init__(self, data, cfg):
        torch.manual_seed(0)
        self.data, self.cfg = data, cfg
        self.model = build_model(cfg, data.tokenizer.vocab_size)
        self.optimizer = make_optimizer(self.model, cfg.train, torch.device("cpu"))
        self.rounds = 0

    def round(self, steps: int) -> float:
        """Optimizer steps per second over one round (a new epoch's batch order)."""
        self.rounds += 1
        loader = iter(train_loader(self.data.train, self.cfg.train.batch_size,
                                   self.cfg.train.seed, self.rounds))
        batch = next(loader)  # the epoch's shuffle (randperm over all windows) is set-up,
        start = time.perf_counter()  # paid once per epoch: time the steps themselves
        for _ in range(steps):
            x, y = batch
            batch = next(loader)
            _, loss = self.model(x, y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 10, 100])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    results, trainers = [], []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TINYTALE_CACHE", str(Path(tmp) / "cache"))
        # Tokenize every size first (the corpus text is not needed after: the token files
        # are memory-mapped), then time them in interleaved rounds, so drift of a shared
        # machine hits every size alike.
        for size in args.sizes_mb:
            corpus = Path(tmp) / f"tales-{size:g}MB.txt"
            nbytes = write_corpus(corpus, size)
            cfg = load_config(None, [*MODEL, f"data.corpus={corpus}"])
            start = time.perf_counter()
            data = prepare_data(cfg)
            tokenize_s = time.perf_counter() - start
            start = time.perf_counter()
            data = prepare_data(cfg)
            cached_s = time.perf_counter() - start
            results.append({"corpus_mb": round(nbytes / 2**20, 1),
                            "train_tokens": len(data.train.tokens),
                            "tokenize_once_s": round(tokenize_s, 2),
                            "cached_open_s": round(cached_s, 3)})
            trainers.append(Trainer(data, cfg))
            corpus.unlink()
        for trainer in trainers:
            trainer.round(args.steps)  # warm-up: page cache, allocator
        rates: list[list[float]] = [[] for _ in trainers]
        for rep in range(args.repeats):
            order = list(range(len(trainers)))
            order = order[rep % len(order):] + order[:rep % len(order)]
            for i in order:
                rates[i].append(trainers[i].round(args.steps))
        for result, trainer, rate in zip(results, trainers, rates, strict=True):
            tokens = trainer.cfg.train.batch_size * trainer.cfg.model.block_size
            result["tokens_per_sec"] = round(statistics.median(rate) * tokens)
            # Within a round the sizes run back to back, so a round's ratio cancels the drift
            # of a shared machine that a ratio of medians over the whole run keeps.
            result["vs_smallest_paired"] = round(statistics.median(
                r / r0 for r, r0 in zip(rate, rates[0], strict=True)), 3)
        del trainers  # close the memory maps before the folder goes
    print(f"{'corpus':>10} {'train tokens':>13} {'tokenize':>9} {'reopen':>8} {'tok/s':>8} "
          f"{'vs smallest':>11}")
    for r in results:
        print(f"{r['corpus_mb']:>8.1f}MB {r['train_tokens']:>13,} {r['tokenize_once_s']:>8.1f}s "
              f"{r['cached_open_s']:>7.3f}s {r['tokens_per_sec']:>8} "
              f"{r['vs_smallest_paired']:>11.3f}")
    print(f"({args.repeats} interleaved rounds of {args.steps} steps; vs smallest = median over "
          "rounds of this size's tokens/s over the smallest's in the same round)")
    print(json.dumps({"data_scale": results}))


if __name__ == "__main__":
    main()
