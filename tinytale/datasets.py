"""What a run trains and validates on, described for trackers: name, digest, source, profile.

Plain dicts (no MLflow here): the MLflow tracker logs them as dataset inputs, so the runs
table's Dataset column names the corpus and runs can be filtered by it. The digest is the
corpus content hash: the one the token cache keys its files by (tokencache.content_hash) for
a file corpus, and a hash of the same form over the generated stories for a built-in one.
Both splits carry the corpus digest; they differ by name (`<corpus>.train`, `<corpus>.val`),
while the split itself (seed, fractions) is in the source.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tinytale.config import DataConfig
from tinytale.corpus import corpus_files, load_corpus
from tinytale.data import DataBundle
from tinytale.tokencache import content_hash

CONTEXTS = {"train": "training", "val": "validation"}  # MLflow's mlflow.data.context values


def stories_digest(stories: list[str]) -> str:
    """blake2b-128 over each story's length and bytes, like content_hash over files."""
    h = hashlib.blake2b(digest_size=16)
    for story in stories:
        data = story.encode("utf-8")
        h.update(str(len(data)).encode())
        h.update(data)
    return h.hexdigest()


def corpus_digest(d: DataConfig) -> str:
    files = corpus_files(d.corpus)
    if files is None:  # built-in: generated from (n_stories, seed), cheap to make again
        return stories_digest(load_corpus(d.corpus, d.n_stories, d.seed))
    return content_hash(files)


def corpus_datasets(d: DataConfig, data: DataBundle) -> list[dict[str, Any]]:
    """One description per split, in the order training, validation."""
    files = corpus_files(d.corpus)
    name = d.corpus if files is None else Path(d.corpus).expanduser().name
    digest = corpus_digest(d)
    origin: dict[str, Any] = ({"corpus": d.corpus, "seed": d.seed} if files is None else
                              {"uri": str(Path(d.corpus).expanduser().resolve())})
    if d.n_stories is not None:
        origin["n_stories"] = d.n_stories
    split = {"val_fraction": d.val_fraction, "train_fraction": d.train_fraction,
             "split_seed": d.seed}
    sizes = {"train": (data.n_train_stories, len(data.train.tokens)),
             "val": (data.n_val_stories, len(data.val.tokens))}
    out = []
    for part, context in CONTEXTS.items():
        stories, tokens = sizes[part]
        out.append({
            "name": f"{name}.{part}", "digest": digest, "context": context,
            "source_type": "tinytale" if files is None else "local",
            "source": json.dumps({**origin, "split": part, **split}),
            "profile": json.dumps({"stories": stories, "tokens": tokens,
                                   "vocabulary": data.tokenizer.vocab_size,
                                   "tokenizer": d.tokenizer}),
        })
    return out
