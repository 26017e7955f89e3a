"""Experiment configuration: typed dataclasses, YAML load/dump, `--set` overrides, validation.

The defaults of every dataclass are the lesson experiment, so `Config()` is what
`tinytale train` runs with no arguments (and what `experiments/lesson.yaml` spells out).
Every user mistake becomes a `ConfigError` whose message names the field, the value and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tinytale.errors import UserError


class ConfigError(UserError):
    """A user-facing configuration mistake; the message is one sentence naming field and fix."""


def _doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text lives next to it, where a reader of the code finds it."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelConfig:
    n_layer: int = _doc("number of transformer blocks", default=2)
    n_head: int = _doc("attention heads per block; must divide n_embd", default=4)
    n_embd: int = _doc("width of the residual stream", default=64)
    block_size: int = _doc("context length in tokens", default=32)
    dropout: float = _doc(
        "dropout probability on the embeddings and after the attention and MLP branches",
        default=0.0,
    )
    attn_dropout: float = _doc(
        "dropout probability on the attention weights; 0 keeps scaled_dot_product_attention "
        "on its fused kernel, which attention dropout pushes off it on a CPU",
        default=0.0,
    )
    bias: bool = _doc("use bias terms in linear layers and LayerNorm", default=True)

    def validate(self) -> None:
        _positive("model.n_layer", self.n_layer)
        _positive("model.n_head", self.n_head)
        _positive("model.n_embd", self.n_embd)
        _positive("model.block_size", self.block_size)
        _in_range("model.dropout", self.dropout, 0.0, 1.0, hi_open=True)
        _in_range("model.attn_dropout", self.attn_dropout, 0.0, 1.0, hi_open=True)
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                f"choose n_embd as a multiple of n_head (e.g. n_embd={self.n_head * 16})."
            )


@dataclass
class DataConfig:
    corpus: str = _doc(
        "built-in corpus name ('lesson', 'fairy') or a path to a file or a folder of them: "
        ".txt, .jsonl/.json (one object per line), .parquet, and .gz/.zst of the text ones",
        default="lesson",
    )
    tokenizer: Literal["word", "char", "bpe"] = _doc("word | char | bpe", default="word")
    val_fraction: float = _doc("share of stories held out for validation", default=0.1)
    train_fraction: float = _doc(
        "share of the training stories actually used (data-size sweeps)", default=1.0
    )
    stride: int | None = _doc(
        "step between training windows in tokens; null means block_size (no overlap)",
        default=None,
    )
    window_offset: Literal["fixed", "random"] = _doc(
        "fixed: training windows start at 0, stride, 2 x stride, ...; random: each epoch "
        "shifts them all by an offset in [0, stride) drawn from train.seed and the epoch "
        "(validation windows never move)",
        default="fixed",
    )
    bpe_vocab_size: int = _doc("vocabulary size for the bpe tokenizer", default=512)
    n_stories: int | None = _doc(
        "number of stories to generate for a built-in corpus (null: the corpus default)",
        default=None,
    )
    seed: int = _doc("seed for the corpus generator and the train/validation split", default=0)
    stream: bool | Literal["auto"] = _doc(
        "tokenize file corpora once into memory-mapped token files (auto: above 64 MB)",
        default="auto",
    )
    story_separator: str = _doc(
        "where text files split into stories: auto (at <|endoftext|> when the file's first MB "
        "has one, else at blank lines), blank_line, or a marker such as <|endoftext|>",
        default="auto",
    )
    text_field: str = _doc("the field (JSON) or column (Parquet) holding each story",
                           default="text")
    tokenizer_file: str | None = _doc(
        "reuse a tokenizer instead of training one: a tokenizer.json (tinytale's, or a "
        "Hugging Face one with an <eos> token) or an earlier run's checkpoint (.pt)",
        default=None,
    )

    def validate(self) -> None:
        if not self.corpus.strip():
            raise ConfigError("data.corpus is empty; give a built-in name or a path.")
        _in_range("data.val_fraction", self.val_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        _in_range("data.train_fraction", self.train_fraction, 0.0, 1.0, lo_open=True)
        if self.stride is not None:
            _positive("data.stride", self.stride)
        if self.bpe_vocab_size < 258:
            raise ConfigError(
                f"data.bpe_vocab_size={self.bpe_vocab_size} is too small; byte-level BPE needs "
                "at least 258 (256 bytes + end-of-story + one merge)."
            )
        if self.n_stories is not None:
            _positive("data.n_stories", self.n_stories)
        if not self.story_separator.strip():
            raise ConfigError("data.story_separator is empty; use auto, blank_line or a marker "
                              "such as <|endoftext|>.")
        if not self.text_field.strip():
            raise ConfigError("data.text_field is empty; give the name of the field that "
                              "holds each story, e.g. text.")
        if self.tokenizer_file is not None and not self.tokenizer_file.strip():
            raise ConfigError("data.tokenizer_file is empty; give a tokenizer.json or .pt "
                              "path, or null to train a tokenizer.")


@dataclass
class TrainConfig:
    epochs: int = _doc("passes over the training windows", default=30)
    batch_size: int = _doc("windows per micro-batch", default=16)
    grad_accum_steps: int = _doc("micro-batches summed into one optimizer step", default=1)
    lr: float = _doc("peak learning rate (after warmup)", default=3e-3)
    min_lr: float = _doc("learning rate at the end of the cosine decay", default=3e-4)
    warmup_steps: int = _doc("optimizer steps of linear warmup from 0", default=20)
    weight_decay: float = _doc("AdamW decoupled weight decay on matrices", default=0.0)
    beta1: float = _doc("AdamW beta1", default=0.9)
    beta2: float = _doc("AdamW beta2", default=0.99)
    grad_clip: float = _doc("clip the global gradient norm to this (0 = off)", default=1.0)
    seed: int = _doc("seed for Python, NumPy and torch", default=1337)
    device: Literal["auto", "cpu", "cuda", "mps"] = _doc("auto | cpu | cuda | mps", default="auto")
    compile: bool | Literal["auto"] = _doc(
        "torch.compile the model: true, false, or auto (on for CUDA)", default="auto"
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = _doc(
        "torch.compile mode; reduce-overhead captures CUDA graphs (tiny models on a GPU)",
        default="default",
    )
    precision: Literal["auto", "fp32", "bf16"] = _doc(
        "bf16 autocast or fp32: auto = bf16 on CUDA, and on CPUs with native bf16 matrix "
        "units (AMX, AVX-512 BF16) for models 256 or more wide; fp32 elsewhere",
        default="auto",
    )
    patience: int = _doc(
        "stop after this many epochs without a better validation loss (0 = never)", default=0
    )
    eval_batch_size: int | None = _doc(
        "windows per validation batch (null: 4 x batch_size)", default=None
    )
    checkpoint_every_steps: int = _doc(
        "also write last.pt every N optimizer steps within an epoch (0 = only at epoch ends)",
        default=0,
    )
    nonfinite: Literal["fail", "skip"] = _doc(
        "on a NaN/inf loss or gradient: fail the run, or skip that step", default="fail"
    )
    max_skipped_steps: int = _doc(
        "with nonfinite=skip, fail after this many skipped steps", default=10
    )
    num_threads: int = _doc(
        "CPU threads for torch (0 = auto: one for models under 128 wide, else torch's default)",
        default=0)
    peak_tflops: float | None = _doc(
        "device peak TFLOP/s for MFU (null: looked up for known GPUs; no MFU on CPU)",
        default=None,
    )

    def validate(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum_steps", self.grad_accum_steps)
        _in_range("train.lr", self.lr, 0.0, 10.0, lo_open=True)
        _in_range("train.min_lr", self.min_lr, 0.0, self.lr)
        _non_negative("train.warmup_steps", self.warmup_steps)
        _non_negative("train.weight_decay", self.weight_decay)
        _in_range("train.beta1", self.beta1, 0.0, 1.0, hi_open=True)
        _in_range("train.beta2", self.beta2, 0.0, 1.0, hi_open=True)
        _non_negative("train.grad_clip", self.grad_clip)
        _non_negative("train.patience", self.patience)
        if self.eval_batch_size is not None:
            _positive("train.eval_batch_size", self.eval_batch_size)
        _non_negative("train.checkpoint_every_steps", self.checkpoint_every_steps)
        _non_negative("train.max_skipped_steps", self.max_skipped_steps)
        _non_negative("train.num_threads", self.num_threads)
        if self.peak_tflops is not None:
            _positive("train.peak_tflops", self.peak_tflops)


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class TrackingConfig:
    experiment: str = _doc("MLflow experiment name", default="tinytale")
    run_name: str | None = _doc("MLflow run name (null: the config file's name)", default=None)
    registered_model: str = _doc("registered model that receives the best checkpoint",
                                 default="tinytale")
    register: bool = _doc("register the best checkpoint as a model version", default=True)
    log_every_steps: int = _doc(
        "also log train_loss_step / lr_step every N optimizer steps (0 = off)", default=0
    )
    system_metrics: bool = _doc("log CPU/memory/GPU through MLflow's system metrics",
                                default=True)
    samples: int = _doc("generated samples logged as a text artifact at the end", default=3)
    export_hf: bool = _doc(
        "also log the best model as a Hugging Face folder (artifact hf/; needs tinytale[hf])",
        default=False,
    )
    sample_every_epochs: int = _doc(
        "log short samples (table `samples.json`) at epoch 1 and every N epochs (0 = off)",
        default=10)

    def validate(self) -> None:
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment is empty; give an experiment name.")
        if not self.registered_model.strip():
            raise ConfigError("tracking.registered_model is empty; give a model name.")
        if not _MODEL_NAME.match(self.registered_model):
            # It goes into registry search filters and models:/NAME@ALIAS URIs.
            raise ConfigError(
                f"tracking.registered_model={self.registered_model!r} is not a usable model "
                "name; use letters, digits, '_', '.' and '-' (e.g. tinytale-fairy)."
            )
        _non_negative("tracking.log_every_steps", self.log_every_steps)
        _non_negative("tracking.samples", self.samples)
        _non_negative("tracking.sample_every_epochs", self.sample_every_epochs)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> Config:
        for section in (self.model, self.data, self.train, self.tracking):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """`{'model.n_layer': 2, ...}`: the form MLflow params and `--set` use."""
        return {
            f"{section}.{key}": value
            for section, values in self.to_dict().items()
            for key, value in values.items()
        }

    def hash(self) -> str:
        """Short content hash of the resolved config (ignores key order)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> Config:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{source} must be a mapping with sections {_section_names()}, "
                f"got {type(raw).__name__}."
            )
        kwargs = {}
        for section, value in raw.items():
            check_section(section, where=f" in {source}")
            kwargs[section] = _build_section(section, _SECTIONS[section], value or {}, source)
        return cls(**kwargs).validate()

    @classmethod
    def from_checkpoint(cls, raw: Any, source: str = "checkpoint") -> Config:
        """The config a checkpoint was trained with. Checkpoints written before
        model.attn_dropout existed applied model.dropout to the attention weights too, so a
        model section without the key reads it as dropout: a resumed run trains on as it did.
        (A user's YAML without it gets the default 0.)"""
        model = raw.get("model") if isinstance(raw, dict) else None
        if isinstance(model, dict) and "attn_dropout" not in model and "dropout" in model:
            raw = {**raw, "model": {**model, "attn_dropout": model["dropout"]}}
        return cls.from_dict(raw, source)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "tracking": TrackingConfig,
}


def _section_names() -> str:
    return ", ".join(_SECTIONS)


def known_keys() -> dict[str, list[str]]:
    """Every key a config has, by section: `{'model': ['n_layer', ...], ...}`."""
    return {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _SECTIONS.items()}


class UnknownKeyError(ConfigError):
    """A section, or `section.key`, that no config has. `section_known` says which part is
    wrong and `close` is the nearest known name (or None), so a caller that reads keys from
    elsewhere (a sweep file) can word the error for its own file."""

    def __init__(self, message: str, section_known: bool, close: str | None):
        super().__init__(message)
        self.section_known = section_known
        self.close = close


def check_section(section: Any, where: str = "") -> None:
    """Raise `UnknownKeyError` unless a config has this section. `where`, e.g.
    " in experiments/x.yaml", follows the section in the message."""
    if section not in _SECTIONS:
        close = _closest(str(section), _SECTIONS)
        raise UnknownKeyError(
            f"unknown section {str(section)!r}{where}{_did_you_mean(close)}; "
            f"sections are {_section_names()}.", section_known=False, close=close)


def check_key(section: Any, name: Any, where: str = "") -> None:
    """Raise `UnknownKeyError` unless `section.name` is a config field (see check_section)."""
    check_section(section, where)
    keys = known_keys()
    if name not in keys[section]:
        close = _closest(str(name), keys[section])
        raise UnknownKeyError(
            f"unknown key {f'{section}.{name}'!r}{where}{_did_you_mean(close)}; "
            f"keys of '{section}' are: {', '.join(sorted(keys[section]))}.",
            section_known=True, close=close)


def _closest(word: str, choices: typing.Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return close[0] if close else None


def _did_you_mean(close: str | None) -> str:
    return f" (did you mean '{close}'?)" if close else ""


def _build_section(name: str, cls: type, values: Any, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(
            f"section '{name}' in {source} must be a mapping of keys to values, "
            f"got {values!r}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        check_key(name, key, where=f" in {source}")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Check `value` against the annotation; allow int -> float, nothing else implicit."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _coerce(path, value, option)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{path}={value!r} is not valid; expected {_describe(hint)}.")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value in allowed and type(value) is type(next(a for a in allowed if a == value)):
            return value
        raise ConfigError(
            f"{path}={value!r} is not one of {', '.join(repr(a) for a in allowed)}; "
            f"pick one of them."
        )
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}={value!r} should be null.")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r} is not a boolean; use true or false.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r} is not an integer; give a whole number.")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}={value!r} is not a number; give e.g. 0.1 or 3e-4.")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}={value!r} is not a string; quote it.")
    raise TypeError(f"unsupported annotation {hint!r} for {path}")  # a bug, not user input


def _describe(hint: Any) -> str:
    parts = []
    for option in typing.get_args(hint):
        if option is type(None):
            parts.append("null")
        elif typing.get_origin(option) is Literal:
            parts.extend(repr(a) for a in typing.get_args(option))
        else:
            parts.append(getattr(option, "__name__", str(option)))
    return " or ".join(parts)


def _positive(path: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{path}={value} must be positive; give a value above 0.")


def _non_negative(path: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{path}={value} must not be negative; give 0 or more.")


def _in_range(
    path: str, value: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False
) -> None:
    too_low = value <= lo if lo_open else value < lo
    too_high = value >= hi if hi_open else value > hi
    if value != value or too_low or too_high:  # value != value catches NaN
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ConfigError(
            f"{path}={value} is out of range; it must lie in {left}{lo}, {hi}{right}."
        )


def split_override(text: str) -> tuple[str, str] | None:
    """`'train.lr=3e-4'` -> `('train.lr', '3e-4')`; None unless it is KEY=VALUE with a KEY.

    The one reading of a `--set` item: `parse_override` goes on to check the key and parse
    the value, `tinytale launch` passes it on to the container as it is.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    return (key, raw) if sep and key else None


def parse_override(text: str) -> tuple[str, str, Any]:
    """`'train.lr=3e-4'` -> `('train', 'lr', 0.0003)`; the value is parsed as YAML."""
    split = split_override(text)
    if split is None or split[0].count(".") != 1:
        raise ConfigError(
            f"--set {text!r} is not of the form section.key=value; write e.g. --set train.lr=3e-4."
        )
    key, raw = split
    section, name = key.split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "3e-4" as a string; accept plain floats written that way.
    if isinstance(value, str) and any(c in value for c in ".eE"):
        with contextlib.suppress(ValueError):
            value = float(value)
    return section, name, value


def describe_yaml_error(what: str, exc: yaml.YAMLError) -> str:
    """One sentence for a YAML syntax error in `what` (e.g. "config file 'x.yaml'"): where
    the parser stopped, why, and the fix."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or "invalid YAML"
    return f"{what} is not valid YAML{where} ({problem}); fix the syntax there."


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML experiment (or the built-in lesson defaults), apply `--set` overrides, validate.

    The run name defaults to the file's stem so runs of `experiments/overfit.yaml` are
    called `overfit` in MLflow.
    """
    raw: dict[str, Any] = {}
    source = "the built-in defaults"
    if path is not None:
        file = Path(path)
        source = str(file)
        if not file.is_file():
            raise ConfigError(
                f"config file '{file}' does not exist; pass a YAML file such as "
                "experiments/lesson.yaml."
            )
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(
                f"config file '{file}' is not UTF-8 text; pass a YAML file."
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(describe_yaml_error(f"config file '{file}'", exc)) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file '{file}' must be a mapping with sections {_section_names()}, "
                f"got {type(loaded).__name__}."
            )
        raw = loaded or {}
    for text in overrides:
        section, name, value = parse_override(text)
        try:
            check_key(section, name)
        except UnknownKeyError as exc:
            raise ConfigError(f"--set {text!r}: {exc}") from None
        if not isinstance(raw.get(section) or {}, dict):
            raise ConfigError(f"section '{section}' in {source} must be a mapping.")
        raw.setdefault(section, {})
        raw[section] = dict(raw[section] or {})
        raw[section][name] = value
    config = Config.from_dict(raw, source)
    if config.tracking.run_name is None and path is not None:
        config.tracking.run_name = Path(path).stem
    return config
