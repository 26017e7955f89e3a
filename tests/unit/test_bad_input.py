"""Property-based: random configs and random bytes as corpora never crash with a traceback.

Every outcome is either a working config / corpus, or a `UserError` whose message is one
sentence; nothing else may escape (anything else would be a bug shown to the user).
"""

from __future__ import annotations

import string

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tinytale.config import Config, ConfigError, load_config
from tinytale.corpus import load_corpus
from tinytale.data import build_data
from tinytale.errors import UserError
from tinytale.tokenizer import train_tokenizer

KEYS = list(Config().flat())
values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, width=32),
    st.text(string.printable, max_size=8), st.lists(st.integers(), max_size=2),
)


def _one_sentence(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS + ["model.nope", "bogus.key"]), values,
                       max_size=4))
def test_random_overrides_give_config_or_clear_error(overrides):
    texts = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
             .removesuffix("\n...") for k, v in overrides.items()]
    try:
        cfg = load_config(None, texts)
    except ConfigError as exc:
        _one_sentence(str(exc))
        return
    assert cfg.model.n_embd % cfg.model.n_head == 0
    assert 0 <= cfg.model.dropout < 1


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=5)),
                    lambda inner: st.dictionaries(st.text(max_size=6), inner, max_size=3)
                    | st.lists(inner, max_size=3), max_leaves=8))
def test_random_yaml_documents(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("cfg") / "x.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        _one_sentence(str(exc))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_random_bytes_as_corpus(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("corpus") / "tales.txt"
    path.write_bytes(blob)
    try:
        stories = load_corpus(str(path))
        tokenizer = train_tokenizer("char", stories)
        data = build_data(stories, tokenizer, block_size=8, val_fraction=0.2, seed=0,
                          batch_size=2)
    except UserError as exc:
        _one_sentence(str(exc))
        return
    assert len(data.train) >= 2 and len(data.val) >= 1


# Keys whose random values change only the process (threads) or cost minutes (compile) stay out.
CLI_KEYS = [
    "model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.dropout",
    "data.tokenizer", "data.val_fraction", "data.train_fraction", "data.stride",
    "data.bpe_vocab_size", "data.n_stories", "train.epochs", "train.batch_size",
    "train.grad_accum_steps", "train.lr", "train.min_lr", "train.warmup_steps",
    "train.weight_decay", "train.grad_clip", "train.patience", "train.nonfinite",
    "train.eval_batch_size", "train.checkpoint_every_steps", "train.max_skipped_steps",
]
small_values = st.one_of(
    # Plausible values, twice as likely, so that some random configs train for real ...
    st.integers(1, 12), st.integers(1, 12), st.floats(0, 1, width=32),
    # ... and the rest: out of range, wrong type, non-finite, unknown choices.
    st.none(), st.booleans(), st.integers(-2, 40), st.sampled_from([0.0, 1e9, -1.0]),
    st.sampled_from([float("nan"), float("inf")]),
    st.sampled_from(["word", "char", "bpe", "skip", "fail", "x", ""]),
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(CLI_KEYS), small_values, max_size=2))
# Every time, not by chance, a run that diverges: AdamW's decay factor 1 - lr * 1e9 grows the
# weights over 1e5-fold a step, so the loss is NaN within epoch 1's 16 steps on any CPU.
@example({"train.weight_decay": 1e9})
@example({"train.weight_decay": 1e9, "train.grad_accum_steps": 5})  # finite weights, NaN val loss
def test_random_configs_through_the_cli(tmp_path_factory, overrides):
    """`tinytale train` with random overrides: trains, or fails in one sentence with exit 2
    and nothing on disk; a run that diverges is a failed run (exit 1), never a traceback."""
    from typer.testing import CliRunner

    from tinytale.cli import app

    out = tmp_path_factory.mktemp("cli") / "runs"
    args = ["train", "--no-tracking", "--out", str(out), "--set", "train.epochs=1",
            "--set", "data.n_stories=60", "--set", "model.n_embd=16", "--set", "model.n_head=2",
            "--set", "model.n_layer=1", "--set", "model.block_size=8"]
    for key, value in overrides.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
        args += ["--set", f"{key}={text}"]
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        args, result.exception)
    assert result.exit_code in (0, 1, 2), (args, result.exit_code, result.stderr)
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert not out.exists(), (args, "a refused config wrote to --out")
    elif result.exit_code == 1:
        assert "run failed: non-finite" in result.stderr, (args, result.stderr[-500:])
    else:
        assert list(out.rglob("best.pt")), args
