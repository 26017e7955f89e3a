"""The corpus as dataset descriptions: digest, source and profile per split."""

import json

from tinytale.config import load_config
from tinytale.corpus import load_corpus
from tinytale.datasets import corpus_datasets, stories_digest
from tinytale.run import prepare_data
from tinytale.tokencache import content_hash


def test_builtin_corpus_digest_is_its_stories_hash():
    cfg = load_config(None, [])
    train, val = corpus_datasets(cfg.data, prepare_data(cfg))
    assert train["digest"] == val["digest"] == stories_digest(load_corpus("lesson", None, 0))
    assert (train["name"], train["context"]) == ("lesson.train", "training")
    assert (val["name"], val["context"]) == ("lesson.val", "validation")
    assert json.loads(train["source"])["corpus"] == "lesson"
    profile = json.loads(val["profile"])
    assert profile == {"stories": 22, "tokens": profile["tokens"], "vocabulary": 24,
                       "tokenizer": "word"} and profile["tokens"] > 0
    # Another seed generates other stories: another digest.
    other = load_config(None, ["data.seed=1"])
    assert corpus_datasets(other.data, prepare_data(other))[0]["digest"] != train["digest"]


def test_file_corpus_digest_is_the_token_cache_content_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYTALE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tales"
    folder.mkdir()
    story = "once upon a time there was a cat . the cat sat ."
    (folder / "a.txt").write_text("\n\n".join([story] * 30))
    (folder / "b.txt").write_text("\n\n".join([story.replace("cat", "dog")] * 30))
    cfg = load_config(None, [f"data.corpus={folder}", "model.block_size=8",
                             "train.batch_size=2"])
    train, val = corpus_datasets(cfg.data, prepare_data(cfg))
    assert train["digest"] == content_hash(sorted(folder.glob("*.txt")))
    assert train["name"] == "tales.train" and train["source_type"] == "local"
    assert json.loads(train["source"])["uri"] == str(folder.resolve())
