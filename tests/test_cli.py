"""The Typer CLI through its test runner: train, generate, help, and clean exit-2 errors."""

import json

import pytest
from typer.testing import CliRunner

from tinytale.cli import app
from tinytale.corpus import lesson

runner = CliRunner()

FAST = ["--set", "train.epochs=2", "--set", "data.n_stories=80", "--no-tracking"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = runner.invoke(app, ["train", *FAST, "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_train_json_summary(trained):
    for key in ("run_id", "epochs", "best_epoch", "best_val_loss", "final_train_loss",
                "vocab_size", "tokens_per_sec", "train_time_s", "checkpoint"):
        assert key in trained
    assert trained["epochs"] == 2 and trained["vocab_size"] == 24
    assert trained["run_id"] is None


def test_generate_from_checkpoint(trained):
    result = runner.invoke(app, ["generate", trained["checkpoint"], "--seed", "1",
                                 "--num-samples", "2", "--max-new-tokens", "20"])
    assert result.exit_code == 0, result.output
    words = set(result.stdout.split()) - {"---"}
    assert words and words <= set(lesson.VOCAB)


def test_greedy_generation_is_deterministic(trained):
    args = ["generate", trained["checkpoint"], "--prompt", "once upon a", "--temperature", "0"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0 and first.stdout == second.stdout
    assert first.stdout.startswith("once upon a")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--set", "model.n_head=5", "--no-tracking"], "not divisible"),
        (["train", "missing.yaml", "--no-tracking"], "does not exist"),
        (["train", "--set", "data.corpus=nowhere.txt", "--no-tracking"], "neither a built-in"),
        (["generate", "missing.pt"], "does not exist"),
        (["generate", "tests"], "holds no best.pt"),
    ],
)
def test_user_errors_exit_2_without_traceback(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_prompt_out_of_vocabulary(trained):
    result = runner.invoke(app, ["generate", trained["checkpoint"], "--prompt", "a wolf"])
    assert result.exit_code == 2 and "'wolf'" in result.stderr


def test_help_explains_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "generate"):
        assert command in result.stdout
    train_help = runner.invoke(app, ["train", "--help"]).stdout
    for option in ("--set", "--out", "--resume", "--json", "--tracking-uri", "--no-tracking"):
        assert option in train_help
