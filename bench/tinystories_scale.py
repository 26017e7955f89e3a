"""A TinyStories-sized corpus end to end: first run, second run, training speed, BPE training.

A ~1 GB TinyStories-shaped text file is generated (the fairy grammar's tales, cut into
paragraphs, stories separated by `<|endoftext|>` lines), then each phase runs in a fresh
process, so its peak memory (ru_maxrss) is its own:

* first run: `prepare_data` on a cold cache, as `tinytale train` does it: content hash, BPE
  training (streamed) and tokenizing into memory-mapped token files; wall time of each part
  and the process's peak memory.
* second run: `prepare_data` again in a new process (the cache answers): the start-up cost
  of every later run, and the whole process's time from exec to data ready.
* training speed: the same model trains on the 1 GB corpus's windows and on a small corpus's
  (same tokenizer, through data.tokenizer_file), in interleaved rounds; tokens/s and the
  paired ratio (it must not fall with corpus size).

The file and the cache live in a temporary folder under --dir (default /tmp), removed at
the end. Takes 15-30 minutes on 2 cores for 1 GB.

    python bench/tinystories_scale.py --size-mb 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MODEL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=128",
         "train.batch_size=12", "train.device=cpu", "data.tokenizer=bpe", "data.stream=true"]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def write_tinystories(path: Path, megabytes: float, first_seed: int = 0) -> int:
    """Stories of 3-sentence paragraphs, one `<|endoftext|>` line after each, as in
    TinyStories-train.txt."""
    from tinytale.corpus import fairy

    target, seed = int(megabytes * 2**20), first_seed
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < target:
            for tale in fairy.generate(500, seed=seed):
                sentences = tale.split(". ")
                paragraphs = [". ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3)]
                f.write("\n".join(paragraphs) + "\n<|endoftext|>\n")
            seed += 1
        return f.tell()


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def phase_first_run(corpus: Path, vocab: int) -> dict:
    """Cold cache: time the hash and the BPE training inside prepare_data by wrapping them
    (the bench's instrumentation; the code that runs is tinytale's own)."""
    from tinytale import tokencache
    from tinytale.config import load_config
    from tinytale.run import prepare_data

    parts: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    tokencache.train_tokenizer = timed("bpe_train_s", tokencache.train_tokenizer)
    import tinytale.run as run

    run.content_hash = timed("hash_s", run.content_hash)
    cfg = load_config(None, [*MODEL, f"data.corpus={corpus}", f"data.bpe_vocab_size={vocab}"])
    start = time.perf_counter()
    data = prepare_data(cfg)
    total = time.perf_counter() - start
    return {"first_run_s": round(total, 1), "hash_s": round(parts["hash_s"], 1),
            "bpe_train_s": round(parts["bpe_train_s"], 1),
            "tokenize_s": round(total - parts["hash_s"] - parts["bpe_train_s"], 1),
            "train_tokens": len(data.train.tokens), "val_tokens": len(data.val.tokens),
            "stories": data.n_train_stories + data.n_val_stories,
            "vocab_size": data.tokenizer.vocab_size, "first_run_peak_rss_mb": peak_rss_mb()}


def phase_second_run(corpus: Path, vocab: int, exec_time: float) -> dict:
    from tinytale.config import load_config
    from tinytale.run import prepare_data

    cfg = load_config(None, [*MODEL, f"data.corpus={corpus}", f"data.bpe_vocab_size={vocab}"])
    start = time.perf_counter()
    data = prepare_data(cfg)
    prepare_s = time.perf_counter() - start
    return {"second_run_prepare_s": round(prepare_s, 3),
            "second_run_exec_to_data_s": round(time.time() - exec_time, 2),
            "second_run_train_tokens": len(data.train.tokens),
            "second_run_peak_rss_mb": peak_rss_mb()}


def phase_train_speed(corpus: Path, small: Path, tokenizer: Path, vocab: int, steps: int,
                      repeats: int) -> dict:
    sys.path.insert(0, str(BENCH))
    from data_scale import Trainer  # the same timed optimizer steps as bench/data_scale.py

    from tinytale.config import load_config
    from tinytale.run import prepare_data

    trainers = []
    for path in (small, corpus):
        cfg = load_config(None, [*MODEL, f"data.corpus={path}", f"data.bpe_vocab_size={vocab}",
                                 f"data.tokenizer_file={tokenizer}"])
        trainers.append(Trainer(prepare_data(cfg), cfg))
    for trainer in trainers:
        trainer.round(steps)  # warm-up: page cache, allocator
    rates: list[list[float]] = [[], []]
    for rep in range(repeats):
        for i in (0, 1) if rep % 2 == 0 else (1, 0):  # side by side, alternating order
            rates[i].append(trainers[i].round(steps))
    tokens = trainers[0].cfg.train.batch_size * trainers[0].cfg.model.block_size
    return {"small_corpus_train_tokens": len(trainers[0].data.train.tokens),
            "small_tokens_per_s": round(statistics.median(rates[0]) * tokens),
            "large_tokens_per_s": round(statistics.median(rates[1]) * tokens),
            "large_vs_small_paired": round(statistics.median(
                big / little for big, little in zip(rates[1], rates[0], strict=True)), 3)}


def child(args: list[str], env: dict[str, str]) -> dict:
    """One phase in a fresh process; its result plus the CPU seconds it used (user + sys:
    on a shared machine the wall time also counts the other tenants' load)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"phase {args[:2]} failed:\n{done.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {**json.loads(done.stdout.strip().splitlines()[-1]),
            f"{args[1]}_phase_cpu_s": round(cpu_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024)
    parser.add_argument("--small-mb", type=float, default=2)
    parser.add_argument("--bpe-vocab-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--phase", choices=["first", "second", "speed"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--small", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--exec-time", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "first":
        print(json.dumps(phase_first_run(args.corpus, args.bpe_vocab_size)))
        return
    if args.phase == "second":
        print(json.dumps(phase_second_run(args.corpus, args.bpe_vocab_size, args.exec_time)))
        return
    if args.phase == "speed":
        print(json.dumps(phase_train_speed(args.corpus, args.small, args.tokenizer,
                                           args.bpe_vocab_size, args.steps, args.repeats)))
        return

    root = Path(tempfile.mkdtemp(prefix="tinytale-tinystories-", dir=args.dir))
    env = {**os.environ, "TINYTALE_CACHE": str(root / "cache")}
    try:
        corpus, small = root / "TinyStories-shaped.txt", root / "small.txt"
        start = time.perf_counter()
        nbytes = write_tinystories(corpus, args.size_mb)
        result = {"cpu": cpu_model(), "cores": os.cpu_count(),
                  "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
                  "corpus_mb": round(nbytes / 2**20, 1),
                  "generate_s": round(time.perf_counter() - start, 1)}
        # Other seeds than the large file's first ones: a corpus of its own.
        write_tinystories(small, args.small_mb, first_seed=10**6)
        common = ["--corpus", str(corpus), "--bpe-vocab-size", str(args.bpe_vocab_size)]
        result.update(child(["--phase", "first", *common], env))
        result.update(child(["--phase", "second", *common, "--exec-time", str(time.time())],
                            env))
        tokenizer = next((root / "cache" / "tokenizers").glob("*.json"))
        result.update(child(["--phase", "speed", *common, "--small", str(small), "--tokenizer",
                             str(tokenizer), "--steps", str(args.steps),
                             "--repeats", str(args.repeats)], env))
        result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"CPU: {result['cpu']} ({result['cores']} cores; load average "
          f"{result['load_avg_1m_at_start']} at start, {result['load_avg_1m_at_end']} at end)")
    print(f"corpus: {result['corpus_mb']} MB, {result['stories']:,} stories, BPE vocab "
          f"{result['vocab_size']}, {result['train_tokens']:,} training tokens")
    print(f"first run:  {result['first_run_s']} s (hash {result['hash_s']} s, BPE training "
          f"{result['bpe_train_s']} s, tokenizing {result['tokenize_s']} s; "
          f"{result['first_phase_cpu_s']} CPU s), peak memory "
          f"{result['first_run_peak_rss_mb']} MB")
    print(f"second run: data ready in {result['second_run_prepare_s']} s "
          f"({result['second_run_exec_to_data_s']} s from exec, imports included), peak "
          f"memory {result['second_run_peak_rss_mb']} MB")
    print(f"training:   {result['large_tokens_per_s']:,} tokens/s on the large corpus vs "
          f"{result['small_tokens_per_s']:,} on {args.small_mb:g} MB: paired ratio "
          f"{result['large_vs_small_paired']} (median of {args.repeats} side-by-side rounds)")
    print(json.dumps({"tinystories_scale": result}))


if __name__ == "__main__":
    main()
