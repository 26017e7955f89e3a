"""The `tinytale` command line: parse options, build the pieces, call the library. No training logic.

Mistakes a user can fix (`UserError`) print one sentence on stderr and exit with code 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from tinytale.errors import UserError

app = typer.Typer(
    name="tinytale",
    help="Train a small GPT on fairy tales, with every run tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_USAGE = 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE",
                 help="Override one config value, e.g. --set train.lr=3e-4 (repeatable)."),
]
TrackingUriOption = Annotated[
    str | None,
    typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                 help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else a SQLite store "
                      "./mlflow.db with artifacts in ./mlartifacts)."),
]


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn `UserError` into one line on stderr and exit code 2; let bugs raise."""
    try:
        yield
    except UserError as exc:
        raise fail(str(exc)) from None


@contextlib.contextmanager
def graceful_stop(stop: Any) -> Iterator[None]:
    """First SIGINT/SIGTERM asks the loop to checkpoint and stop; a second SIGINT aborts."""
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        stop.request(name)
        typer.echo(f"\n{name} received: finishing the current step and saving a checkpoint",
                   err=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def build_tracker(config: Any, tracking_uri: str | None, no_tracking: bool,
                  quiet: bool = False) -> Any:
    from tinytale.tracking import ConsoleTracker, FanoutTracker, NullTracker

    trackers = [NullTracker() if quiet else ConsoleTracker()]
    if not no_tracking:
        from tinytale.mlflow_tracker import MlflowTracker

        trackers.append(MlflowTracker(config, tracking_uri))
    return FanoutTracker(trackers)


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(
        help="Experiment YAML (default: the built-in lesson experiment).")] = None,
    set_: SetOption = None,
    device: Annotated[str | None, typer.Option(
        help="auto | cpu | cuda | mps (overrides train.device).")] = None,
    out: Annotated[Path, typer.Option(
        envvar="TINYTALE_OUT",
        help="Folder for checkpoints; each run writes OUT/<run name>/<timestamp>/.")] = Path("runs"),
    resume: Annotated[str | None, typer.Option(
        help="Continue a run: 'auto' (newest unfinished checkpoint under --out, else start "
             "fresh), a checkpoint file, or an MLflow run id.")] = None,
    experiment: Annotated[str | None, typer.Option(
        help="MLflow experiment (overrides tracking.experiment).")] = None,
    run_name: Annotated[str | None, typer.Option(
        help="MLflow run name (overrides tracking.run_name).")] = None,
    tracking_uri: TrackingUriOption = None,
    no_tracking: Annotated[bool, typer.Option(
        "--no-tracking", help="Do not log to MLflow (console only).")] = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print one JSON summary object as the last line of stdout.")] = False,
) -> None:
    """Train a GPT on fairy tales: per-epoch table on stderr, best checkpoint kept and registered."""
    from tinytale.config import load_config
    from tinytale.run import train_run
    from tinytale.train import StopRequest

    overrides = list(set_ or [])
    if device:
        overrides.append(f"train.device={device}")
    if experiment:
        overrides.append(f"tracking.experiment={experiment}")
    if run_name:
        overrides.append(f"tracking.run_name={run_name}")
    stop = StopRequest()
    with user_errors():
        cfg = load_config(config, overrides)
        tracker = build_tracker(cfg, tracking_uri, no_tracking)
        with graceful_stop(stop):
            outcome = train_run(cfg, out, tracker, resume=resume, stop=stop,
                                parent_run_id=os.environ.get("TINYTALE_PARENT_RUN_ID"))
    summary = outcome.summary
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(_human_summary(summary))
    if outcome.fit.status == "KILLED":
        raise typer.Exit(EXIT_SIGNAL.get(stop.reason or "", 1))
    if outcome.fit.status != "FINISHED":
        typer.echo(f"error: run failed: {outcome.fit.reason}", err=True)
        raise typer.Exit(1)


def _human_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"best val loss {summary['best_val_loss']:.4f} at epoch {summary['best_epoch']}"
        if summary.get("best_val_loss") is not None else "no epoch finished",
        f"checkpoint: {summary.get('checkpoint')}",
    ]
    if summary.get("run_id"):
        lines.append(f"mlflow run: {summary['run_id']}")
    if summary.get("registered_version"):
        lines.append(f"registered: models:/{summary['registered_model']}/"
                     f"{summary['registered_version']}")
    return "\n".join(lines)


@app.command()
def generate(
    source: Annotated[str, typer.Argument(
        help="A checkpoint file (best.pt), models:/NAME@ALIAS, models:/NAME/VERSION, "
             "or an MLflow run id.")],
    prompt: Annotated[str, typer.Option(
        help="Text to continue; empty starts a new story.")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to add.")] = 200,
    temperature: Annotated[float, typer.Option(
        min=0.0, help="Softmax temperature; 0 means greedy (always the likeliest token).")] = 0.8,
    top_k: Annotated[int, typer.Option(
        min=0, help="Sample only among the K likeliest tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Nucleus sampling: smallest set of tokens with this total "
                                "probability (1 = all).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible samples.")] = None,
    num_samples: Annotated[int, typer.Option(min=1, help="How many samples.")] = 1,
    tracking_uri: TrackingUriOption = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | mps | auto.")] = "cpu",
) -> None:
    """Sample text from a trained model (greedy, temperature, top-k, top-p)."""
    from tinytale.run import complete, load_model
    from tinytale.train import resolve_device

    with user_errors():
        checkpoint = resolve_model_source(source, tracking_uri)
        model, tokenizer, _ = load_model(checkpoint, str(resolve_device(device)))
        texts = complete(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p,
                         seed, num_samples)
    for i, text in enumerate(texts):
        if i:
            typer.echo("---")
        typer.echo(text)


def resolve_model_source(source: str, tracking_uri: str | None) -> Path:
    """A local checkpoint path as is; MLflow model URIs and run ids are fetched first."""
    path = Path(source)
    if path.exists() or source.endswith(".pt"):
        return path
    from tinytale.mlflow_tracker import download_checkpoint

    return download_checkpoint(source, tracking_uri)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
