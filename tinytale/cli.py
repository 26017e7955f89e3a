"""The `tinytale` command line: parse options, build the pieces, call the library; no training.

Mistakes a user can fix (`UserError`) print one sentence on stderr and exit with code 2.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tinytale.errors import UserError
from tinytale.paths import check_can_make_folder
from tinytale.signals import on_stop_signals

if TYPE_CHECKING:
    from tinytale.tracking import RunSummary

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


# Options several commands share but each explains in its own words: the flag is declared
# here, the help (what this command prints, overrides or keeps there) at the command.
def json_option(help: str) -> Any:
    """`--json`: print the result as JSON on stdout instead of text."""
    return typer.Option("--json", help=help)


def runs_folder_option(help: str) -> Any:
    """`--out` for the folder runs are trained into, also set by TINYTALE_OUT."""
    return typer.Option("--out", envvar="TINYTALE_OUT", help=help)


def experiment_option(help: str) -> Any:
    """`--experiment`: the MLflow experiment to write to or read from."""
    return typer.Option("--experiment", help=help)


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

    def handler(name: str) -> None:
        if stop and name == "SIGINT":
            signal.signal(signal.SIGINT, signal.default_int_handler)
        stop.request(name)
        typer.echo(f"\n{name} received: finishing the current step and saving a checkpoint",
                   err=True)

    with on_stop_signals(handler):
        yield


def build_tracker(config: Any, tracking_uri: str | None, no_tracking: bool,
                  quiet: bool = False) -> Any:
    from tinytale.tracking import ConsoleTracker, FanoutTracker, NullTracker

    trackers = [NullTracker() if quiet else ConsoleTracker()]
    if not no_tracking:
        # Embedded store: MLflow starts in a helper process while this one trains.
        from tinytale.mlflow_tracker.process import mlflow_tracker_for

        trackers.append(mlflow_tracker_for(config, tracking_uri))
    return FanoutTracker(trackers)


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(
        help="Experiment YAML (default: the built-in lesson experiment).")] = None,
    set_: SetOption = None,
    device: Annotated[str | None, typer.Option(
        help="auto | cpu | cuda | mps (overrides train.device).")] = None,
    out: Annotated[Path, runs_folder_option(
        "Folder for checkpoints; each run writes OUT/<run name>/<timestamp>/.")] = Path("runs"),
    resume: Annotated[str | None, typer.Option(
        help="Continue a run: 'auto' (newest unfinished checkpoint under --out, else start "
             "fresh), a checkpoint file, or an MLflow run id.")] = None,
    experiment: Annotated[str | None, experiment_option(
        "MLflow experiment (overrides tracking.experiment).")] = None,
    run_name: Annotated[str | None, typer.Option(
        help="MLflow run name (overrides tracking.run_name).")] = None,
    tracking_uri: TrackingUriOption = None,
    no_tracking: Annotated[bool, typer.Option(
        "--no-tracking", help="Do not log to MLflow (console only).")] = False,
    json_out: Annotated[bool, json_option(
        "Print one JSON summary object as the last line of stdout.")] = False,
) -> None:
    """Train a GPT on fairy tales: per-epoch table on stderr, best checkpoint kept, registered."""
    from tinytale.config import load_config

    overrides = list(set_ or [])
    if device:
        overrides.append(f"train.device={device}")
    if experiment:
        overrides.append(f"tracking.experiment={experiment}")
    if run_name:
        overrides.append(f"tracking.run_name={run_name}")
    with user_errors():
        cfg = load_config(config, overrides)
        check_out_dir(out)
        # Under torchrun only rank 0 talks to the console and to MLflow. RANK read here, as
        # distributed.from_env does: the tracker starts before torch is imported.
        rank = int(os.environ.get("RANK", "0"))
        tracker = build_tracker(cfg, tracking_uri, no_tracking or rank != 0, quiet=rank != 0)
        # torch only now: a mistake in the input above is reported without loading it.
        from tinytale.run import run_description, train_run
        from tinytale.train import StopRequest

        # The imports' objects (torch's, ~10^5) live until exit: kept out of every garbage
        # collection, during training and at exit, where collecting them took ~0.3 s.
        gc.freeze()
        stop = StopRequest()
        tags = {"mlflow.note.content": run_description(config, overrides),
                **(_env_run_tags() or {})}
        with graceful_stop(stop):
            outcome = train_run(cfg, out, tracker, resume=resume, stop=stop,
                                parent_run_id=os.environ.get("TINYTALE_PARENT_RUN_ID"),
                                extra_tags=tags)
    gc.freeze()  # and what the run created since: none of it needs collecting before exit
    summary = outcome.summary
    if rank != 0:
        pass  # under torchrun the summary is rank 0's: other ranks wrote no checkpoint
    elif json_out:
        typer.echo(json.dumps(summary.to_json()))
    else:
        typer.echo(_human_summary(summary))
    if outcome.fit.status == "KILLED":
        raise typer.Exit(EXIT_SIGNAL.get(stop.reason or "", 1))
    if outcome.fit.status != "FINISHED":
        typer.echo(f"error: run failed: {outcome.fit.reason}", err=True)
        raise typer.Exit(1)


def check_out_dir(out: Path) -> None:
    """Refuse an --out that cannot become a folder before anything is trained or logged."""
    check_can_make_folder(out, f"--out '{out}'", if_file="pass a folder path for checkpoints",
                          if_read_only="pass a folder you can write to")


def _human_summary(summary: RunSummary) -> str:
    lines = [
        f"best val loss {summary.best_val_loss:.4f} at epoch {summary.best_epoch}"
        if summary.best_val_loss is not None else "no epoch finished",
        f"checkpoint: {summary.checkpoint}",
    ]
    if summary.reference_losses:  # one line: when validation beat the no-training levels
        beat = [f"the {level} level ({summary.reference_losses[level]:.4f}) at epoch {epoch}"
                if epoch is not None else f"never the {level} level"
                f" ({summary.reference_losses[level]:.4f})"
                for level, epoch in (("unigram", summary.beat_unigram_epoch),
                                     ("bigram", summary.beat_bigram_epoch))]
        lines.insert(1, f"val loss beat {beat[0]}, {beat[1]}")
    if summary.run_url or summary.run_id:
        lines.append(f"mlflow run: {summary.run_url or summary.run_id}")
    registration = summary.registration
    if registration is not None and registration.version:
        lines.append(f"registered: models:/{registration.model}/{registration.version}")
    elif registration is not None and registration.pending_spool:
        lines.append(f"registration pending: the model waits in {registration.pending_spool}")
    return "\n".join(lines)


# A trained model to read: what `generate` samples from and `export` converts.
ModelSourceArgument = Annotated[str, typer.Argument(
    help="A checkpoint file (best.pt), models:/NAME@ALIAS, models:/NAME/VERSION, "
         "or an MLflow run id.")]


@app.command()
def generate(
    source: ModelSourceArgument,
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
    from tinytale.device import resolve_device
    from tinytale.inference import complete, load_model

    with user_errors():
        if top_p <= 0:
            raise UserError(f"--top-p {top_p} keeps no token to sample from; use a value in "
                            "(0, 1], e.g. 0.9 (1 keeps them all).")
        torch_device = resolve_device(device, field="--device")
        checkpoint = resolve_model_source(source, tracking_uri)
        model, tokenizer, _ = load_model(checkpoint, str(torch_device))
        texts = complete(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p,
                         seed, num_samples)
    for i, text in enumerate(texts):
        if i:
            typer.echo("---")
        typer.echo(text)


@app.command()
def export(
    source: ModelSourceArgument,
    out_dir: Annotated[Path, typer.Argument(
        help="New (or empty) folder to write; written whole or not at all.")],
    format_: Annotated[str, typer.Option(
        "--format", help="hf: a transformers GPT2LMHeadModel folder with its "
                         "tokenizer.")] = "hf",
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Write a trained model for other tools: --format hf loads with transformers'
    AutoModelForCausalLM and AutoTokenizer (needs pip install 'tinytale[hf]')."""
    with user_errors():
        if format_ != "hf":
            raise UserError(f"--format {format_} is unknown; use --format hf.")
        from tinytale.export_hf import export_hf, require_writer  # torch: only here

        require_writer()
        exported = export_hf(resolve_model_source(source, tracking_uri), out_dir)
    for warning in exported.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"wrote {exported.folder}: {', '.join(exported.files)}")


def resolve_model_source(source: str, tracking_uri: str | None) -> Path:
    """A checkpoint file as is; a folder -> its newest best.pt; MLflow URIs and run ids fetched."""
    path = Path(source)
    if path.is_dir():
        found = sorted(path.rglob("best.pt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"folder '{path}' holds no best.pt; train a run into it first.")
        return found[-1]
    if path.exists() or source.endswith(".pt"):
        return path
    from tinytale.mlflow_tracker import download_checkpoint

    return download_checkpoint(source, tracking_uri)


def _env_run_tags() -> dict[str, str] | None:
    """Extra run tags from TINYTALE_RUN_TAGS (a JSON object; `tinytale sweep` sets it)."""
    raw = os.environ.get("TINYTALE_RUN_TAGS")
    if not raw:
        return None
    try:
        tags = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError("TINYTALE_RUN_TAGS is not valid JSON; give an object such as "
                        '{"team": "tales"}.') from None
    if not isinstance(tags, dict):
        raise UserError("TINYTALE_RUN_TAGS must be a JSON object of tag names to values.")
    return {str(k): str(v) for k, v in tags.items()}


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(
        help="Sweep YAML: name, base experiment, grid and/or points, optional set and "
             "experiment (see experiments/sweep_regularization.yaml).")],
    parallel: Annotated[int, typer.Option(
        min=1, help="Points to run at once, each as its own process on this machine, or "
                    "container with --launch (CPU threads are shared out between them).")] = 1,
    launch: Annotated[bool, typer.Option(
        "--launch", help="Run each point in a trainer container of the compose stack, as "
                         "`tinytale launch` does (the stack's MLflow server is started; the "
                         "host reaches it on 127.0.0.1:$TINYTALE_MLFLOW_PORT, default "
                         "5000).")] = False,
    device: Annotated[str | None, typer.Option(
        help="With --launch: cpu | cuda | auto (cuda only when Docker has the NVIDIA "
             "runtime; the default).")] = None,
    rerun: Annotated[bool, typer.Option(
        "--rerun", help="Run every point again, even those already FINISHED in this "
                        "sweep.")] = False,
    out: Annotated[Path, runs_folder_option(
        "Folder for checkpoints and logs: OUT/<sweep>/<point>/... and "
        "OUT/<sweep>/logs/<point>.log (with --launch only the logs; checkpoints stay in the "
        "stack's checkpoints volume).")] = Path("runs"),
    experiment: Annotated[str | None, experiment_option(
        "MLflow experiment (overrides the sweep file and the base config).")] = None,
    tracking_uri: TrackingUriOption = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List the points and their run names; run nothing.")] = False,
    json_out: Annotated[bool, json_option(
        "Print the sweep result as one JSON object on stdout.")] = False,
) -> None:
    """Run a base experiment over a grid of overrides: one child MLflow run per point.

    Points nest under one parent run named after the sweep; finished points are skipped.

    A failed point is recorded as a FAILED run and the sweep goes on.

    With --launch each point runs in a trainer container of the compose stack instead.

    Exit code: number of failed points (at most 125); 2 bad sweep file or option, or a
    tracking server that cannot be reached; 130/143 interrupted.
    """
    from tinytale.sweep import (
        load_sweep,
        render_results,
        resolved_overrides,
        run_sweep,
        sweep_experiment,
    )

    with user_errors():
        if device is not None and not launch:
            raise UserError(f"--device {device} applies to containers only; add --launch, or "
                            "set train.device in the sweep file's set: for local points.")
        spec = load_sweep(sweep_file)
        if dry_run:
            exp = sweep_experiment(spec, experiment)
            typer.echo(f"sweep '{spec.name}': {len(spec.points)} points of {spec.base} in "
                       f"experiment '{exp}'")
            for i, point in enumerate(spec.points, 1):
                typer.echo(f"{i:>3}. {point.run_name}  "
                           f"{json.dumps(resolved_overrides(spec, point))}")
            return
        result = run_sweep(spec, tracking_uri, out, parallel, rerun, experiment,
                           launch=(device or "auto") if launch else None)
    typer.echo(json.dumps(result.to_json()) if json_out else render_results(result))
    raise typer.Exit(result.exit_code)


@app.command()
def compare(
    runs: Annotated[list[str] | None, typer.Argument(
        metavar="[RUN_ID|RUN_NAME]...",
        help="Runs by id or by name (a name means its newest run).")] = None,
    experiment: Annotated[str | None, experiment_option(
        "Compare the newest runs of this experiment (with runs or --sweep: look them up only "
        "there).")] = None,
    sweep_name: Annotated[str | None, typer.Option(
        "--sweep", help="Compare every point run of this sweep; the figure is also logged "
                        "to the sweep's parent run.")] = None,
    metric: Annotated[str, typer.Option(
        help="Validation metric (lower is better) that picks the best epoch and the "
             "onset; its train_ twin is drawn dashed.")] = "val_loss",
    patience: Annotated[int, typer.Option(
        min=1, help="Overfitting onset: the epoch of the metric's lowest value, shown once "
                    "the metric then stayed more than 2% above it this many epochs in a "
                    "row.")] = 3,
    out: Annotated[Path, typer.Option(
        help="Figure file; .png (default) or .svg.")] = Path("curves.png"),
    svg: Annotated[bool, typer.Option(
        "--svg", help="Also write an SVG next to the PNG.")] = False,
    limit: Annotated[int, typer.Option(
        min=1, help="With --experiment alone: how many of the newest runs.")] = 100,
    no_log_figure: Annotated[bool, typer.Option(
        "--no-log-figure", help="Do not upload the figure to the sweep's parent run.")] = False,
    tracking_uri: TrackingUriOption = None,
    json_out: Annotated[bool, json_option(
        "Print the table as a JSON list of objects, one per run.")] = False,
) -> None:
    """Draw train (dashed) and validation (solid) curves of several runs; table of overfitting.

    Table: run, overrides, best epoch, best val loss and perplexity, final gap, onset, tokens/s.

    Final gap = val - train loss at the last epoch. The table (or JSON) goes to stdout.
    """
    from tinytale.compare import render_json, render_table
    from tinytale.compare_runs import compare_runs

    with user_errors():
        rows = compare_runs(tracking_uri, runs or [], experiment=experiment, sweep=sweep_name,
                            metric=metric, patience=patience, out=out, svg=svg, limit=limit,
                            log_figure=not no_log_figure,
                            say=lambda line: typer.echo(line, err=True))
    typer.echo(render_json(rows) if json_out else render_table(rows))


@app.command()
def runs(
    experiment: Annotated[str, experiment_option(
        "MLflow experiment whose runs to list.")] = "tinytale",
    limit: Annotated[int, typer.Option(min=1, help="How many of the newest runs.")] = 50,
    tracking_uri: TrackingUriOption = None,
    json_out: Annotated[bool, json_option(
        "Print a JSON list of objects, one per run.")] = False,
) -> None:
    """Table of runs: name, status, epochs, best val loss, best epoch, registered version."""
    from tinytale.mlflow_tracker import list_runs

    with user_errors():
        rows = list_runs(experiment, tracking_uri, limit)
    if json_out:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo(f"no runs in experiment '{experiment}'")
        return
    from tinytale.table import format_table

    header = ("run id", "name", "status", "epochs", "best val", "best ep", "version")
    typer.echo(format_table(header, [(
        r["run_id"][:12], r["run_name"] or "", r["status"],
        "" if r["epochs"] is None else str(r["epochs"]),
        "" if r["best_val_loss"] is None else f"{r['best_val_loss']:.4f}",
        "" if r["best_epoch"] is None else str(r["best_epoch"]),
        f"{r['registered_model']}/{r['registered_version']}" if r["registered_version"] else "",
    ) for r in rows]))


@app.command()
def sync(
    run: Annotated[str, typer.Argument(
        help="A run folder (OUT/<run name>/<timestamp>, holding mlflow_spool.jsonl), or the "
             "MLflow run id of a run trained with this --out.")],
    out: Annotated[Path, runs_folder_option(
        "Where to look for a run given by id.")] = Path("runs"),
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="Send to this MLflow instead of the one the run was "
                               "trained against.")] = None,
    json_out: Annotated[bool, json_option(
        "Print the result as one JSON object.")] = False,
) -> None:
    """Send what a run spooled while MLflow was unreachable (metrics, artifacts, model)."""
    from tinytale.mlflow_tracker import find_spool, sync_spool

    with user_errors():
        result = sync_spool(find_spool(run, out), tracking_uri)
    if json_out:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"run {result['run_id']} at {result['tracking_uri']}: sent "
               f"{result['records_sent']} spooled records ({result['metrics_sent']} metric "
               "values)" + (f"; registered models:/{result['registered_model']}/"
                            f"{result['registered_version']}"
                            if result.get("registered_version") else ""))


@app.command()
def launch(
    config: Annotated[str, typer.Argument(
        help="Experiment YAML: a path inside the image (experiments/X.yaml) or a file on this "
             "host, which is mounted into the container.")] = "experiments/lesson.yaml",
    device: Annotated[str, typer.Option(
        help="cpu | cuda | auto (cuda only when Docker has the NVIDIA runtime).")] = "auto",
    set_: SetOption = None,
    detach: Annotated[bool, typer.Option(
        "--detach", help="Return at once; follow with `docker compose logs -f`.")] = False,
    build: Annotated[bool, typer.Option(
        "--build", help="Rebuild the images first (after changing the code).")] = False,
) -> None:
    """Train in the CPU or CUDA container of the compose stack (starting MLflow if needed)."""
    from tinytale.launch import launch as launch_run

    with user_errors():
        code = launch_run(config, device, list(set_ or []), detach=detach, build=build)
    raise typer.Exit(code)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
