"""Built-in corpora, user files, tokenizers and the story split."""

import re

import pytest

from tinytale.corpus import CorpusError, lesson, load_corpus
from tinytale.data import DataError, build_data, split_stories
from tinytale.tokenizer import (
    TokenizerError,
    tokenizer_from_dict,
    train_tokenizer,
)


def test_lesson_vocabulary_is_exactly_24_tokens():
    tok = train_tokenizer("word", load_corpus("lesson"))
    assert tok.vocab_size == 24
    assert set(tok.symbols) == set(lesson.VOCAB)


def test_lesson_stories_are_distinct():
    stories = load_corpus("lesson")
    assert len(stories) == len(set(stories)) == 216


@pytest.mark.parametrize("name", ["lesson", "fairy"])
def test_builtin_corpora_are_deterministic_and_seedable(name):
    assert load_corpus(name, seed=3) == load_corpus(name, seed=3)
    assert load_corpus(name, seed=3) != load_corpus(name, seed=4)


def test_fairy_corpus_is_large_enough():
    assert len("\n\n".join(load_corpus("fairy"))) >= 200_000


# Roles that say who the hero is; the others (tailor, shepherd, ...) fit anyone.
SHE_ROLES = ("daughter", "girl", "princess")
HE_ROLES = ("son", "boy", "prince")
PRONOUN = re.compile(r"\b(she|her|hers|he|him|his)\b", re.IGNORECASE)
HERO = re.compile(r"there lived an? ([a-z' ]+) named (\w+) in ")


def test_fairy_pronouns_agree_with_the_hero_in_every_story():
    """Every he/she/his/her/him in a tale is the hero's (no other character gets one), so
    they must all agree, match a gendered role word, and a name keeps its pronoun in every
    tale of every seed."""
    pronoun_of_name: dict[str, str] = {}
    for seed in range(25):
        for story in load_corpus("fairy", seed=seed):
            role, name = HERO.search(story).groups()
            words = {w.lower() for w in PRONOUN.findall(story)}
            assert words, story
            she = words <= {"she", "her", "hers"}
            assert she or words <= {"he", "him", "his"}, (seed, words, story)
            if role.split()[-1] in SHE_ROLES:
                assert she, (seed, story)
            if role.split()[-1] in HE_ROLES:
                assert not she, (seed, story)
            assert pronoun_of_name.setdefault(name, "she" if she else "he") == (
                "she" if she else "he"), (seed, name, story)
    assert sorted(pronoun_of_name.values()).count("she") == 10  # both kinds of hero occur
    assert len(pronoun_of_name) == 20


def test_split_is_by_story_and_deterministic():
    stories = load_corpus("lesson")
    train, val = split_stories(stories, 0.1, seed=0)
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(stories)
    assert (train, val) == split_stories(stories, 0.1, seed=0)


def test_user_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("The fox ran.\n\nThe hen sat.\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("A cat slept.", encoding="utf-8")
    assert load_corpus(str(tmp_path / "a.txt")) == ["The fox ran.", "The hen sat."]
    assert load_corpus(str(tmp_path)) == ["The fox ran.", "The hen sat.", "A cat slept."]


def test_binary_and_missing_corpus_are_clear_errors(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(CorpusError, match="binary"):
        load_corpus(str(tmp_path / "bin.txt"))
    with pytest.raises(CorpusError, match="neither a built-in corpus"):
        load_corpus(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
def test_tokenizers_round_trip_and_serialize(kind):
    stories = load_corpus("fairy", n_stories=20) if kind != "word" else load_corpus("lesson")
    tok = train_tokenizer(kind, stories, bpe_vocab_size=300)
    text = stories[0]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    again = tokenizer_from_dict(tok.to_dict())
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size
    assert tok.decode([*ids, tok.eos_id]).startswith(text)


def test_out_of_vocabulary_is_a_clear_error():
    tok = train_tokenizer("word", load_corpus("lesson"))
    with pytest.raises(TokenizerError, match="'wolf'"):
        tok.encode("once upon a wolf")


def test_too_small_corpus_names_the_sizes():
    stories = load_corpus("lesson", n_stories=4)
    tok = train_tokenizer("word", stories)
    with pytest.raises(DataError, match="fewer than one optimizer step"):
        build_data(stories, tok, block_size=32, val_fraction=0.25, seed=0, batch_size=64)
    with pytest.raises(DataError, match="validation split"):
        build_data(stories, tok, block_size=60, val_fraction=0.25, seed=0, batch_size=1,
                   stride=1)
