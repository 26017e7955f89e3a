"""data.tokenizer_file: reuse a tokenizer (tinytale JSON, a Hugging Face tokenizer.json, an
earlier run's checkpoint) instead of training one on the corpus."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tinytale.cli import app
from tinytale.config import load_config
from tinytale.corpus import fairy, load_corpus
from tinytale.run import prepare_data
from tinytale.tokenizer import TokenizerError, load_tokenizer_file, train_tokenizer


def test_a_given_bpe_tokenizer_is_used_not_retrained(tmp_path):
    # Trained on other stories than the corpus: retraining would give other merges.
    other = train_tokenizer("bpe", fairy.generate(30, seed=99), bpe_vocab_size=300)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(other.to_dict()), encoding="utf-8")
    retrained = prepare_data(load_config(None, ["data.corpus=fairy", "data.n_stories=60",
                                                "data.tokenizer=bpe",
                                                "data.bpe_vocab_size=300"]))
    assert retrained.tokenizer.to_dict() != other.to_dict()
    data = prepare_data(load_config(None, ["data.corpus=fairy", "data.n_stories=60",
                                           "data.tokenizer=bpe", "data.bpe_vocab_size=300",
                                           f"data.tokenizer_file={path}"]))
    assert data.tokenizer.to_dict() == other.to_dict()
    story = load_corpus("fairy", 1)[0]
    assert data.tokenizer.encode(story) == other.encode(story)


def test_an_earlier_runs_checkpoint_lends_its_tokenizer(tmp_path):
    result = CliRunner().invoke(app, ["train", "--no-tracking", "--json", "--out",
                                      str(tmp_path), "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    checkpoint = json.loads(result.stdout.strip().splitlines()[-1])["checkpoint"]
    tokenizer = load_tokenizer_file(checkpoint, "word")
    assert tokenizer.symbols == train_tokenizer("word", load_corpus("lesson")).symbols


def test_wrong_kind_or_file_is_one_sentence(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(train_tokenizer("char", ["a cat"]).to_dict()), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"holds a char tokenizer but data.tokenizer is "
                                             r"'word'; set data.tokenizer=char\."):
        load_tokenizer_file(path, "word")
    with pytest.raises(TokenizerError, match="is not a file"):
        load_tokenizer_file(tmp_path / "nope.json", "word")
    path.write_text('{"model": {"type": "Unigram"}}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="neither a tinytale tokenizer nor"):
        load_tokenizer_file(path, "bpe")
    path.write_text('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}',
                    encoding="utf-8")
    with pytest.raises(TokenizerError, match="has no <eos> token"):
        load_tokenizer_file(path, "bpe")
    result = CliRunner().invoke(app, ["train", "--no-tracking", "--out", str(tmp_path),
                                      "--set", f"data.tokenizer_file={tmp_path / 'x.json'}"])
    assert result.exit_code == 2 and "data.tokenizer_file=" in result.output
