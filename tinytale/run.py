"""Builds a training run from a Config and carries it through: the glue between CLI and fit().

Data flows one way: config -> corpus -> tokenizer -> data -> model -> fit(tracker).
This module also knows how to rebuild a model + tokenizer from a checkpoint for sampling.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import os
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import tinytale
from tinytale import distributed
from tinytale.checkpoint import (
    BEST,
    LAST,
    MODEL,
    CheckpointError,
    find_resumable,
    load_checkpoint,
    peek_checkpoint,
    save_model_copy,
)
from tinytale.config import Config
from tinytale.corpus import StoryFormat, corpus_files, load_corpus, stream_stories
from tinytale.data import DataBundle, build_data, windows_from_tokens
from tinytale.datasets import corpus_datasets
from tinytale.device import choose_precision, resolve_device
from tinytale.errors import UserError
from tinytale.inference import EpochSampler, build_model, example_prompt, sample_texts
from tinytale.reference import ReferenceLevels, first_epoch_below, reference_levels
from tinytale.tokencache import build_token_files, cached_tokenizer, content_hash
from tinytale.tokenizer import (
    Tokenizer,
    load_tokenizer_file,
    tokenizer_from_dict,
    train_tokenizer,
)
from tinytale.tracking import RunInfo, RunSummary, Tracker
from tinytale.train import FitResult, StopRequest, diverged, fit, seed_everything


def run_name_of(config: Config) -> str:
    return config.tracking.run_name or "lesson"


STREAM_ABOVE_BYTES = 64 * 2**20


def prepare_data(config: Config, tokenizer: Tokenizer | None = None,
                 world_size: int | None = None) -> DataBundle:
    """Corpus -> split -> tokenizer (trained on the corpus unless given) -> windows.

    `world_size`: training processes sharing each step (None: torchrun's WORLD_SIZE, else 1),
    for the check that an epoch has at least one optimizer step.
    """
    d = config.data
    if tokenizer is None and d.tokenizer_file:
        tokenizer = load_tokenizer_file(d.tokenizer_file, d.tokenizer)
    files = corpus_files(d.corpus)
    if files is not None and (d.stream is True or (
            d.stream == "auto" and sum(f.stat().st_size for f in files) > STREAM_ABOVE_BYTES)):
        return prepare_streamed(config, files, tokenizer, world_size)
    stories = load_corpus(d.corpus, d.n_stories, d.seed, StoryFormat(d.story_separator,
                                                                     d.text_field))
    if tokenizer is None:
        tokenizer = train_tokenizer(d.tokenizer, stories, d.bpe_vocab_size)
    return build_data(
        stories, tokenizer, config.model.block_size, d.val_fraction, d.seed,
        train_fraction=d.train_fraction, stride=d.stride,
        batch_size=config.train.batch_size, grad_accum_steps=config.train.grad_accum_steps,
        world_size=world_size, window_offset=d.window_offset, offset_seed=config.train.seed,
    )


def prepare_streamed(config: Config, files: list[Path], tokenizer: Tokenizer | None = None,
                     world_size: int | None = None) -> DataBundle:
    """Large corpora: stream stories into cached memory-mapped token files, then window them.

    The split is by a hash of each story's number (so it can be decided while streaming);
    `data.n_stories` and `data.train_fraction` cut the streams rather than story lists.
    """
    d = config.data
    fmt = StoryFormat(d.story_separator, d.text_field)

    def stories() -> Iterator[str]:
        return itertools.islice(stream_stories(files, fmt), d.n_stories)

    # The same bytes cut by another separator or field are other stories: both are in the key.
    key = f"{content_hash(files)}:{d.n_stories}:{fmt.cache_key()}"
    if tokenizer is None:
        tokenizer = cached_tokenizer(key, d.tokenizer, d.bpe_vocab_size, stories)
    token_files = build_token_files(stories(), key, tokenizer, d.val_fraction, d.seed)
    train_tokens = token_files.tokens("train")
    if d.train_fraction < 1.0:
        train_tokens = train_tokens[: math.ceil(len(train_tokens) * d.train_fraction)]
    return windows_from_tokens(
        tokenizer, train_tokens, token_files.tokens("val"), token_files.n_train_stories,
        token_files.n_val_stories, config.model.block_size, d.stride,
        config.train.batch_size, config.train.grad_accum_steps, world_size, d.window_offset,
        config.train.seed,
    )


def git_commit() -> str | None:
    """The commit of the source tree tinytale runs from: `git rev-parse HEAD` in a checkout,
    else TINYTALE_GIT_COMMIT (the trainer images set it to the commit they were built from)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(tinytale.__file__).parent,
            capture_output=True, text=True, timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass  # no git (a container) or no checkout (an installed wheel)
    return os.environ.get("TINYTALE_GIT_COMMIT", "").strip() or None


def run_tags(config: Config, device: torch.device, extra: dict[str, str] | None = None
             ) -> dict[str, str]:
    tags = {
        "tinytale.version": tinytale.__version__,
        # A plain str: torch's TorchVersion would make the MLflow helper, unpickling the tags,
        # import torch (about 1 s of its CPU) before it could open the run.
        "torch.version": str(torch.__version__),
        "config_hash": config.hash(),
        "corpus": config.data.corpus,
        "tokenizer": config.data.tokenizer,
        "device": str(device),
        # What train.precision resolved to here (auto picks by device and model width).
        "precision": choose_precision(config.train.precision, device.type,
                                      config.model.n_embd),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    tags.update(extra or {})
    return tags


def resolve_resume(resume: str | None, out_dir: Path, run_name: str) -> Path | None:
    """`auto` -> newest unfinished checkpoint (or None), a path -> itself, else a run id."""
    if not resume:
        return None
    if resume == "auto":
        return find_resumable(out_dir / run_name)
    path = Path(resume)
    if path.is_dir():
        found = find_resumable(path)
        if found is None:
            raise CheckpointError(f"--resume '{path}' holds no unfinished checkpoint; "
                                  "start a fresh run instead.")
        return found
    if path.suffix == ".pt" or path.exists():
        return path
    # A run id: find the checkpoint that run wrote under the out dir.
    for candidate in sorted(out_dir.rglob("last.pt"), key=os.path.getmtime, reverse=True):
        try:
            if peek_checkpoint(candidate).get("run_id") == resume:
                return candidate
        except CheckpointError:
            continue
    raise UserError(f"--resume '{resume}' is not a checkpoint file and no checkpoint under "
                    f"'{out_dir}' belongs to a run with that id; pass auto, a .pt file or a "
                    "run id trained with this --out folder.")


@dataclass
class RunOutcome:
    fit: FitResult
    summary: RunSummary


def _report_divergence(tracker: Tracker, summary: RunSummary) -> None:
    guess = math.log(summary.vocab_size or 2)
    tracker.on_event("diverged", {
        "final_train_loss": summary.final_train_loss,
        "final_val_loss": summary.final_val_loss, "guessing_loss": round(guess, 4),
        "message": f"the run diverged: its last validation loss {summary.final_val_loss:.4g} "
                   f"is far above the guessing level ln({summary.vocab_size}) = {guess:.2f}; "
                   "lower train.lr, or clip gradients with train.grad_clip"})


def beat_epochs(result: FitResult, levels: ReferenceLevels) -> dict[str, Any]:
    """The summary's reference levels and the first epochs validation loss fell below them."""
    val = [(h["epoch"], h["val_loss"]) for h in result.state.history]
    return {"reference_losses": {"uniform": levels.uniform, "unigram": levels.unigram,
                                 "bigram": levels.bigram},
            "beat_unigram_epoch": first_epoch_below(val, levels.unigram),
            "beat_bigram_epoch": first_epoch_below(val, levels.bigram)}


def run_description(config_file: Path | None, overrides: list[str]) -> str:
    """The run's description (MLflow's `mlflow.note.content`): what it was trained from, and
    the command that trains it again."""
    source = f"`{config_file}`" if config_file else "the built-in lesson (experiments/lesson.yaml)"
    given = (f"with the overrides {', '.join(f'`{o}`' for o in overrides)}" if overrides
             else "with no overrides")
    words = ["tinytale", "train", *([str(config_file)] if config_file else []),
             *(w for o in overrides for w in ("--set", o))]
    return f"Trained from {source} {given}.\n\nAgain: `{shlex.join(words)}`"


@dataclass
class StartingPoint:
    """Where a run starts: fresh, or from a checkpoint with the config it was started with."""

    config: Config
    run_dir: Path
    state: dict[str, Any] | None = None  # the checkpoint's training state when resuming
    tokenizer: Tokenizer | None = None
    ignored: dict[str, str] | None = None  # given values a resumed run does not apply


def starting_point(config: Config, out_dir: Path, resume: str | None) -> StartingPoint:
    """A fresh run folder, or the checkpoint `--resume` names (never a best.pt)."""
    run_name = run_name_of(config)
    resume_path = resolve_resume(resume, out_dir, run_name)
    if resume_path is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        return StartingPoint(config, out_dir / run_name / stamp)
    state = load_checkpoint(resume_path)
    if resume_path.name == BEST or "optimizer" not in state:
        raise CheckpointError(
            f"--resume '{resume_path}' is a best-validation checkpoint: resuming from it would "
            "rewind the run to its best epoch and log those epochs twice; resume from "
            f"'{resume_path.parent / LAST}'."
        )
    # The run continues with the config and tokenizer it started with; say which of the
    # given values (config file, --set) that leaves unused, rather than drop them silently.
    given = config.flat()
    kept_config = Config.from_checkpoint(state["config"], f"checkpoint '{resume_path}'")
    kept = kept_config.flat()
    ignored = {k: f"{kept.get(k)!r} (not {v!r})" for k, v in given.items() if kept.get(k) != v}
    return StartingPoint(kept_config, resume_path.parent, state,
                         tokenizer_from_dict(state["tokenizer"]), ignored)


def train_run(
    config: Config,
    out_dir: Path,
    tracker: Tracker,
    resume: str | None = None,
    stop: StopRequest | None = None,
    extra_tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> RunOutcome:
    """Train one run end to end: data, model, tracked fit, samples and best-model publishing."""
    stop = stop if stop is not None else StopRequest()
    run_name = run_name_of(config)  # as given: a resumed run keeps its MLflow run either way
    start = starting_point(config, out_dir, resume)
    config, run_dir, resume_state = start.config, start.run_dir, start.state
    tokenizer, ignored = start.tokenizer, start.ignored
    dist = distributed.from_env()
    device = distributed.setup(dist, resolve_device(config.train.device))
    data = prepare_data(config, tokenizer, dist.world_size)
    seed_everything(config.train.seed)  # the initial weights depend on the seed alone
    model = build_model(config, data.tokenizer.vocab_size)
    levels = reference_levels(data.train.tokens.numpy(), data.val.tokens.numpy(),
                              data.tokenizer.vocab_size)  # numpy views: no copy yet
    info = RunInfo(
        experiment=config.tracking.experiment,
        run_name=run_name,
        params={**config.flat(), "model.num_params": model.num_params(), **data.describe(),
                **levels.params()},
        tags=run_tags(config, device, extra_tags),
        config_yaml=config.to_yaml(),
        resume_run_id=resume_state.get("run_id") if resume_state else None,
        parent_run_id=parent_run_id,
        local_dir=run_dir,
        datasets=corpus_datasets(config.data, data),
    )
    run_id = tracker.start(info)
    if ignored:
        tracker.on_event("resume_keeps_run_config", ignored)
    sampler = EpochSampler(data.tokenizer, config.tracking.sample_every_epochs)
    status = "FAILED"
    try:
        fields = {"config": config.to_dict(), "tokenizer": data.tokenizer.to_dict()}
        result = fit(
            model, data, config.train, tracker, run_dir, device,
            # Read at each write: after a tracking outage the run id becomes known late.
            checkpoint_fields=lambda: {**fields, "run_id": tracker.run_id},
            resume=resume_state, stop=stop,
            log_every_steps=config.tracking.log_every_steps, dist=dist, sampler=sampler,
        )
        status = result.status
        summary = RunSummary(**result.summary(), run_id=run_id,
                             vocab_size=data.tokenizer.vocab_size, run_dir=str(run_dir),
                             costs=tracker.costs(), sampling_s=round(sampler.seconds, 4),
                             **beat_epochs(result, levels))
        summary.diverged = status == "FINISHED" and diverged(
            summary.final_train_loss, summary.final_val_loss, data.tokenizer.vocab_size)
        if summary.diverged:
            _report_divergence(tracker, summary)
        if result.status == "FINISHED" and result.best_checkpoint is not None and dist.is_main \
                and tracker.keeps_records:  # with --no-tracking nothing would read these
            # Written here, where torch is loaded: the tracker's helper never imports it.
            model_file = run_dir / MODEL
            best = save_model_copy(result.best_checkpoint, model_file)  # read once, for both
            samples = sample_texts(best, f"checkpoint '{model_file}'", config.tracking.samples)
            if samples:
                tracker.log_text("samples.txt", "\n\n---\n\n".join(samples))
            summary.registration = tracker.publish_model(model_file, summary,
                                                         example_prompt(data.tokenizer))
    finally:
        closed = tracker.finish(status)
        distributed.teardown(dist)
    summary.run_id = closed.run_id or summary.run_id
    summary.run_url, summary.tracking_uri = closed.run_url, closed.tracking_uri
    if closed.registration is not None:  # registered while finish waited for the server
        summary.registration = closed.registration
    return RunOutcome(result, summary)
