"""Streamed corpora: tokenized once into memory-mapped files, split by story, cached."""

from __future__ import annotations

import torch

from tinytale.config import load_config
from tinytale.corpus import fairy, stream_stories
from tinytale.run import prepare_data
from tinytale.tokencache import in_validation


def write_corpus(path, n=60):
    stories = fairy.generate(n, seed=5)
    path.write_text("\n\n".join(stories) + "\n", encoding="utf-8")
    return stories


def test_streamed_stories_equal_the_file_stories(tmp_path):
    stories = write_corpus(tmp_path / "tales.txt")
    assert list(stream_stories([tmp_path / "tales.txt"])) == stories


def test_stream_split_is_by_story_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYTALE_CACHE", str(tmp_path / "cache"))
    stories = write_corpus(tmp_path / "tales.txt")
    overrides = [f"data.corpus={tmp_path / 'tales.txt'}", "data.tokenizer=char",
                 "data.stream=true", "model.block_size=32", "data.val_fraction=0.2"]
    data = prepare_data(load_config(None, overrides))
    tok = data.tokenizer
    assert data.train.tokens.dtype == torch.uint16  # memory-mapped file, 2 bytes a token

    expected_val = [s for i, s in enumerate(stories) if in_validation(i, 0, 0.2)]
    assert data.n_val_stories == len(expected_val) > 0
    assert data.n_train_stories == len(stories) - len(expected_val)
    decoded_val = tok.decode(data.val.tokens.long().tolist()).split("\n\n")
    assert [s for s in decoded_val if s] == expected_val
    train_text = tok.decode(data.train.tokens.long().tolist())
    assert not any(s in train_text for s in expected_val)

    files = list((tmp_path / "cache").rglob("*.bin"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = prepare_data(load_config(None, overrides))
    assert torch.equal(again.train.tokens, data.train.tokens)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # reused, not rewritten
    x, y = data.train[0]
    assert x.dtype == torch.long and torch.equal(x[1:], y[:-1])


def test_changed_corpus_is_tokenized_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYTALE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "tales.txt"
    stories = write_corpus(corpus, n=30)
    overrides = [f"data.corpus={corpus}", "data.tokenizer=char", "data.stream=true",
                 "model.block_size=32", "data.val_fraction=0.2"]
    first = prepare_data(load_config(None, overrides))
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("\n" + "\n\n".join(stories[:5]) + "\n")
    second = prepare_data(load_config(None, overrides))
    assert (second.n_train_stories + second.n_val_stories
            == first.n_train_stories + first.n_val_stories + 5)
