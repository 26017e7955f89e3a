"""The word tokenizer reads prompts as people type them, and corpora exactly as before."""

import json

import pytest
from typer.testing import CliRunner

from tinytale.cli import app
from tinytale.corpus import load_corpus
from tinytale.tokenizer import EOS, TokenizerError, WordTokenizer, tokenizer_from_dict

LESSON = WordTokenizer.train(load_corpus("lesson"))


def whitespace_ids(tok: WordTokenizer, stories: list[str]) -> list[int]:
    """What encoding a corpus meant before prompts were normalised: one id per space-split
    word, then the end-of-story id. Checkpoints and token caches were built from these."""
    index = {s: i for i, s in enumerate(tok.symbols)}
    return [i for story in stories for i in [*(index[w] for w in story.split()), tok.eos_id]]


def test_a_typed_prompt_reads_like_the_lesson_corpus():
    typed = LESSON.encode("Once upon a time, there was a dragon.")
    assert typed == LESSON.encode("once upon a time , there was a dragon .")
    assert LESSON.encode("ONCE upon a Time,there was") == \
        LESSON.encode("once upon a time , there was")


def test_unknown_words_are_one_sentence_naming_them():
    with pytest.raises(TokenizerError) as err:
        LESSON.encode("Once upon a time, there was a wizard!")
    message = str(err.value)
    assert "\n" not in message and message.endswith(".")
    assert "the words 'wizard', '!'" in message
    # the lesson's vocabulary is small enough to show what would work
    assert "(it has 23: , . a and brave castle dragon" in message
    with pytest.raises(TokenizerError, match=r"the word 'wolf';"):
        LESSON.encode("a wolf")


@pytest.mark.parametrize("corpus", ["lesson", "user"])
def test_corpus_ids_are_unchanged(corpus):
    # A user corpus keeps case and attached punctuation as words of their own ("Time," and
    # "time" are different tokens), so normalising it would change ids.
    stories = load_corpus("lesson") if corpus == "lesson" else [
        "Once upon a Time, the miller's daughter said: \"Go!\"",
        "the time was late . Time, said the owl, time .",
    ]
    tok = WordTokenizer.train(stories)
    assert tok.encode_many(stories).tolist() == whitespace_ids(tok, stories)


def test_the_corpus_spelling_wins_over_normalising():
    tok = WordTokenizer([EOS, ",", "Time,", "The", "don't", "the", "time"])
    ids = {s: i for i, s in enumerate(tok.symbols)}
    assert tok.encode("Time,") == [ids["Time,"]]  # a corpus word is taken as is
    assert tok.encode("time,") == [ids["Time,"]]  # case only: the word with its comma
    assert tok.encode("TIME ,") == [ids["time"], ids[","]]
    assert tok.encode("THE") == [ids["the"]]  # the lowercase spelling, not the first one
    assert tok.encode("Don\u2019t,") == [ids["don't"], ids[","]]  # a typographic apostrophe


def test_a_checkpoint_tokenizer_from_before_normalising_loads_and_normalises():
    # The dict every word checkpoint (and registered model) has held: no new keys needed.
    saved = json.loads(json.dumps({"kind": "word", "symbols": LESSON.symbols}))
    tok = tokenizer_from_dict(saved)
    assert tok.to_dict() == saved
    assert tok.encode("Once upon a time,") == LESSON.encode("once upon a time ,")


def test_generate_takes_a_typed_prompt(tmp_path):
    runner = CliRunner()
    trained = runner.invoke(app, ["train", "--set", "train.epochs=1", "--set",
                                  "data.n_stories=40", "--no-tracking", "--out", str(tmp_path)])
    assert trained.exit_code == 0, trained.output
    ok = runner.invoke(app, ["generate", str(tmp_path), "--prompt",
                             "Once upon a time, there was a dragon", "--max-new-tokens", "5"])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("Once upon a time, there was a dragon")
    bad = runner.invoke(app, ["generate", str(tmp_path), "--prompt", "Once there was a wizard."])
    assert bad.exit_code == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "'wizard'" in bad.stderr and "Traceback" not in bad.output
