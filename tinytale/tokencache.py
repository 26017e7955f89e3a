"""Corpora larger than memory: tokenized once into memory-mapped token files, cached by content.

Stories stream from the files (never all in memory), each one goes to validation or training
by a hash of (seed, story number), and its tokens are appended to `train.bin` / `val.bin`
(uint16 when the vocabulary fits, else uint32). The folder is keyed by a hash of the
corpus bytes, the tokenizer and the split, so a second run maps the files in milliseconds.
Training then reads windows straight from the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinytale.tokenizer import Tokenizer, tokenizer_from_dict, train_tokenizer

CHUNK_STORIES = 4096  # stories encoded per batch (BPE encodes a batch in parallel)


def cache_root() -> Path:
    return Path(os.environ.get("TINYTALE_CACHE", Path.home() / ".cache" / "tinytale"))


def content_hash(files: Sequence[Path]) -> str:
    """Hash of the corpus bytes; remembered per (path, size, mtime) so a 1 GB corpus that has
    not changed is not read again just to find its cache."""
    signature = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns]
                            for f in files])
    memo = cache_root() / "hashes" / hashlib.blake2b(signature.encode(),
                                                     digest_size=16).hexdigest()
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.blake2b(digest_size=16)
    for file in files:
        h.update(str(file.stat().st_size).encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    digest = h.hexdigest()
    _write_atomic(memo, digest)
    return digest


def cached_tokenizer(corpus_key: str, kind: str, bpe_vocab_size: int,
                     stories: Callable[[], Iterable[str]]) -> Tokenizer:
    """The tokenizer trained on this corpus before, or a new one (a full pass over it)."""
    key = hashlib.blake2b(f"{corpus_key}:{kind}:{bpe_vocab_size}".encode(),
                          digest_size=16).hexdigest()
    path = cache_root() / "tokenizers" / f"{key}.json"
    if path.exists():
        return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")))
    tokenizer = train_tokenizer(kind, stories(), bpe_vocab_size)
    _write_atomic(path, json.dumps(tokenizer.to_dict()))
    return tokenizer


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: concurrent readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def in_validation(index: int, seed: int, val_fraction: float) -> bool:
    """A story's split depends only on its number and the seed, not on the others."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


@dataclass
class TokenFiles:
    folder: Path
    dtype: str
    n_train_stories: int
    n_val_stories: int

    def tokens(self, split: str) -> torch.Tensor:
        path = self.folder / f"{split}.bin"
        if path.stat().st_size == 0:
            return torch.empty(0, dtype=torch.long)
        # Copy-on-write mapping: a writable array for torch, the file itself never changes.
        return torch.from_numpy(np.memmap(path, dtype=self.dtype, mode="c"))


def _chunks(stories: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for story in stories:
        chunk.append(story)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_token_files(
    stories: Iterable[str], corpus_key: str, tokenizer: Tokenizer, val_fraction: float,
    seed: int,
) -> TokenFiles:
    """Tokenize a stream of stories into train/val token files, or reuse the cached ones."""
    tok_blob = json.dumps(tokenizer.to_dict(), sort_keys=True).encode()
    key = hashlib.blake2b(
        corpus_key.encode() + tok_blob + f"{val_fraction}:{seed}".encode(), digest_size=16
    ).hexdigest()
    folder = cache_root() / "tokens" / key
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return TokenFiles(folder, meta["dtype"], meta["n_train_stories"], meta["n_val_stories"])

    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {"train": 0, "val": 0}
    try:
        _write_splits(tmp, stories, tokenizer, dtype, val_fraction, seed, counts)
    except BaseException:
        # A bad record deep in the corpus (or Ctrl-C) leaves no half-written token files.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = {"dtype": dtype, "n_train_stories": counts["train"], "n_val_stories": counts["val"]}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, folder)  # another process may have finished the same work first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenFiles(folder, dtype, counts["train"], counts["val"])


def _write_splits(tmp: Path, stories: Iterable[str], tokenizer: Tokenizer, dtype: str,
                  val_fraction: float, seed: int, counts: dict[str, int]) -> None:
    index = 0
    with open(tmp / "train.bin", "wb") as train_f, open(tmp / "val.bin", "wb") as val_f:
        for chunk in _chunks(stories, CHUNK_STORIES):
            splits: dict[str, list[str]] = {"train": [], "val": []}
            for story in chunk:
                split = "val" if in_validation(index, seed, val_fraction) else "train"
                splits[split].append(story)
                index += 1
            for split, f in (("train", train_f), ("val", val_f)):
                if splits[split]:
                    f.write(tokenizer.encode_many(splits[split]).astype(dtype).tobytes())
                    counts[split] += len(splits[split])
