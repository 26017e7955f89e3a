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
    assert "tracking_loop_s" not in trained  # an untracked run reports no tracking cost


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
    generate_help = runner.invoke(app, ["generate", "--help"]).stdout
    for option in ("--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                   "--seed", "--num-samples"):
        assert option in generate_help


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-p", "0"], "--top-p 0.0 keeps no token"),
        (["--device", "bogus"], "--device='bogus' is not a device"),
    ],
)
def test_generate_option_errors(trained, args, message):
    result = runner.invoke(app, ["generate", trained["checkpoint"], *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_out_that_is_a_file_fails_before_training(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["train", *FAST, "--out", str(blocker / "runs")])
    assert result.exit_code == 2, result.output
    assert "is a file, not a folder" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize(("top_k", "top_p"), [(3, 1.0), (0, 0.3), (2, 0.5)])
def test_top_k_and_top_p_sample_only_likely_words(trained, top_k, top_p):
    """Filtered sampling stays in the vocabulary; with top-k 1 it equals greedy decoding."""
    result = runner.invoke(app, ["generate", trained["checkpoint"], "--top-k", str(top_k),
                                 "--top-p", str(top_p), "--seed", "3", "--max-new-tokens", "30"])
    assert result.exit_code == 0, result.output
    assert set(result.stdout.split()) <= set(lesson.VOCAB)


def test_top_k_1_and_tiny_temperature_are_greedy(trained):
    base = ["generate", trained["checkpoint"], "--prompt", "once upon a", "--seed", "5",
            "--max-new-tokens", "30"]
    greedy = runner.invoke(app, [*base, "--temperature", "0"]).stdout
    assert runner.invoke(app, [*base, "--top-k", "1"]).stdout == greedy
    tiny = runner.invoke(app, [*base, "--temperature", "1e-45"])
    assert tiny.exit_code == 0, tiny.output
    assert tiny.stdout == greedy
