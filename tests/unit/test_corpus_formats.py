"""Real dataset shapes: TinyStories-style text, JSON Lines and Parquet, plain and compressed.

The same stories written in every format must give the same stories, split and token ids,
in memory and through the streamed token cache; a broken file is one sentence naming the
file and the line or row, and leaves nothing in the cache.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tinytale.config import load_config
from tinytale.corpus import CorpusError, StoryFormat, fairy, load_corpus
from tinytale.run import prepare_data
from tinytale.tokenizer import train_tokenizer

zstandard = pytest.importorskip("zstandard")


def tinystories_shaped(n: int = 40) -> list[str]:
    """The project's own tales, each cut into paragraphs as TinyStories' stories are."""
    stories = []
    for tale in fairy.generate(n, seed=11):
        sentences = tale.split(". ")
        paragraphs = [". ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3)]
        stories.append("\n".join(paragraphs))
    return stories


def write_txt(path, stories):
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")


def write_jsonl(path, stories, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, story in enumerate(stories):
            f.write(json.dumps({"id": i, "text": story}) + "\n")


def write_parquet(path, stories):
    table = pa.table({"id": list(range(len(stories))), "text": stories})
    pq.write_table(table, path, row_group_size=7)  # several row groups, read one by one


def write_zst(path, text):
    path.write_bytes(zstandard.ZstdCompressor().compress(text.encode("utf-8")))


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    stories = tinystories_shaped()
    write_txt(root / "tales.txt", stories)
    write_jsonl(root / "tales.jsonl", stories)
    write_parquet(root / "tales.parquet", stories)
    write_jsonl(root / "tales.jsonl.gz", stories, opener=gzip.open)
    write_zst(root / "tales.txt.zst", (root / "tales.txt").read_text(encoding="utf-8"))
    return root, stories


def folded(stories):
    return [" ".join(s.split()) for s in stories]


def test_every_format_reads_the_same_stories(formats):
    root, stories = formats
    for name in ("tales.txt", "tales.jsonl", "tales.parquet", "tales.jsonl.gz",
                 "tales.txt.zst"):
        assert load_corpus(str(root / name)) == folded(stories), name


def test_blank_line_separator_cuts_tinystories_at_paragraphs_instead(tmp_path):
    stories = [s.replace("\n", "\n\n") for s in tinystories_shaped(5)]
    write_txt(tmp_path / "tales.txt", stories)
    whole = load_corpus(str(tmp_path / "tales.txt"))  # auto: <|endoftext|> lines
    assert whole == folded(stories)
    paragraphs = load_corpus(str(tmp_path / "tales.txt"), fmt=StoryFormat("blank_line"))
    assert len(paragraphs) > len(stories)
    assert " ".join(paragraphs).replace(" <|endoftext|>", "") == " ".join(whole)


def test_auto_finds_an_endoftext_marker_glued_to_the_text(tmp_path):
    (tmp_path / "t.txt").write_text("A fox ran.\n\nHome.<|endoftext|>A hen\nsat.<|endoftext|>\n",
                                    encoding="utf-8")
    assert load_corpus(str(tmp_path / "t.txt")) == ["A fox ran. Home.", "A hen sat."]


def test_custom_marker_and_text_field(tmp_path):
    (tmp_path / "t.txt").write_text("one\ntale\n=====\ntwo tale=====three\n", encoding="utf-8")
    assert load_corpus(str(tmp_path / "t.txt"), fmt=StoryFormat("=====")) == [
        "one tale", "two tale", "three"]
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"title": "The  Fox", "text": "A fox ran."}) + "\n\n"
        + json.dumps({"title": "The Hen", "text": "A hen sat."}) + "\n", encoding="utf-8")
    assert load_corpus(str(tmp_path / "t.jsonl"), fmt=StoryFormat(text_field="title")) == [
        "The Fox", "The Hen"]


def test_folder_mixes_formats_in_sorted_order(tmp_path):
    stories = tinystories_shaped(12)
    write_parquet(tmp_path / "a.parquet", stories[:4])
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "b" / "c.jsonl.gz", stories[4:8], opener=gzip.open)
    write_txt(tmp_path / "b" / "d.txt", stories[8:])
    (tmp_path / "README.md").write_text("# not a story file\n", encoding="utf-8")
    assert load_corpus(str(tmp_path)) == folded(stories)


@pytest.mark.parametrize("stream", [False, True])
def test_three_formats_give_the_same_split_and_token_ids(formats, tmp_path, monkeypatch,
                                                         stream):
    monkeypatch.setenv("TINYTALE_CACHE", str(tmp_path / "cache"))
    root, stories = formats
    bundles = {}
    for name in ("tales.txt", "tales.jsonl", "tales.parquet"):
        config = load_config(None, [f"data.corpus={root / name}", "data.tokenizer=bpe",
                                    "data.bpe_vocab_size=300", f"data.stream={str(stream)}",
                                    "model.block_size=16", "data.val_fraction=0.2"])
        bundles[name] = prepare_data(config)
    first = bundles["tales.txt"]
    assert first.n_train_stories + first.n_val_stories == len(stories)
    for name, data in bundles.items():
        assert data.describe() == first.describe(), name
        assert torch.equal(data.train.tokens, first.train.tokens), name
        assert torch.equal(data.val.tokens, first.val.tokens), name
        assert data.tokenizer.to_dict() == first.tokenizer.to_dict(), name


def _bad_files(tmp_path):
    """(file, what the one-sentence error must name) for each kind of broken input."""
    good = json.dumps({"text": "A fox ran home."})
    cases = []

    def add(name, content, *expected):
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        cases.append((path, expected))

    add("broken.jsonl", f"{good}\n{good}\n{{\"text\": \"cut off\n", "line 3", "not valid JSON")
    add("missing.jsonl", f"{good}\n{json.dumps({'story': 'x'})}\n", "line 2",
        "no 'text' field", "data.text_field")
    add("number.jsonl", f"{good}\n{json.dumps({'text': 7})}\n", "line 2", "holds int")
    add("list.jsonl", "[1, 2]\n", "line 1", "not an object")
    add("empty.txt", "\n\n  \n", "holds no stories")
    add("latin1.txt", "A fox ran.\n\nLa for\xeat.\n".encode("latin-1"), "line 3", "UTF-8")
    add("notgzip.txt.gz", "plain text, not gzip\n", "gzip")
    add("cut.jsonl.zst", zstandard.ZstdCompressor().compress(((good + "\n") * 50).encode())[:-9],
        "ends early")
    table = pa.table({"text": ["A fox ran.", None, "A hen sat."]})
    pq.write_table(table, tmp_path / "null.parquet")
    cases.append((tmp_path / "null.parquet", ("row 1", "null")))
    pq.write_table(pa.table({"story": ["A fox ran."]}), tmp_path / "col.parquet")
    cases.append((tmp_path / "col.parquet", ("no 'text' column", "data.text_field")))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    cases.append((tmp_path / "ints.parquet", ("int64", "not strings")))
    add("junk.parquet", "this is not parquet at all\n", "not a readable Parquet file")
    return cases


def test_broken_files_are_one_sentence_naming_file_and_place(tmp_path):
    for path, expected in _bad_files(tmp_path):
        with pytest.raises(CorpusError) as caught:
            load_corpus(str(path))
        message = str(caught.value)
        assert str(path) in message, message
        for part in expected:
            assert part in message, (part, message)
        assert message.count(". ") == 0 and message.endswith("."), message


def test_bad_record_deep_in_a_streamed_corpus_exits_2_and_caches_nothing(tmp_path):
    """Through the real CLI: the tokenizer comes from a file, so the first pass over the
    corpus is the one writing token files, and it has written some when it meets the bad
    line; those must go, and the next (fixed) run must tokenize from scratch."""
    stories = folded(tinystories_shaped(60)) * 90  # > 4096 stories: several written chunks
    corpus = tmp_path / "tales.jsonl"
    lines = [json.dumps({"text": s}) for s in stories]
    corpus.write_text("\n".join([*lines, '{"text": 3}']) + "\n", encoding="utf-8")
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps(train_tokenizer("char", stories).to_dict()),
                         encoding="utf-8")
    cache = tmp_path / "cache"
    env = {**os.environ, "TINYTALE_CACHE": str(cache)}
    args = [str(Path(sys.executable).with_name("tinytale")), "train", "--no-tracking",
            "--out", str(tmp_path / "runs"), "--set", f"data.corpus={corpus}",
            "--set", "data.tokenizer=char", "--set", f"data.tokenizer_file={tokenizer}",
            "--set", "data.stream=true", "--set", "train.epochs=1"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: data.corpus file '{corpus}' line {len(lines) + 1}: field 'text' holds int, "
        "not a string; give the story as a JSON string or choose another data.text_field."]
    assert not list((cache / "tokens").iterdir())
    assert not (tmp_path / "runs").exists()


def test_zst_without_zstandard_says_what_to_install(formats, monkeypatch):
    root, _ = formats
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed: import fails
    with pytest.raises(CorpusError, match=r"needs the zstandard package; run pip install "
                                          r"'tinytale\[zst\]'"):
        load_corpus(str(root / "tales.txt.zst"))
