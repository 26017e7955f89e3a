"""The best checkpoint as an MLflow pyfunc model (models-from-code), logged and registered."""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE

from tinytale.mlflow_tracker.spool import Spool

CHAMPION = "champion"
MODEL_NAME = "model"

PYFUNC_CODE = '''\
"""tinytale GPT as an MLflow pyfunc model (models-from-code; written by tinytale)."""

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

DEFAULTS = {"max_new_tokens": 100, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": -1,
            "num_samples": 1}
# One request holds a server worker until its last sample is done: bound the batch.
MAX_SAMPLES = 64


class RequestError(MlflowException):
    """A request the client can fix: HTTP 400 whose JSON `message` is one sentence.

    MLflow's scoring server rewrites the message of an MlflowException raised by predict to
    start with a dump of the whole input (`Failed to predict data '<DataFrame>'. Error: ...`);
    the message keeps its first value so that the answer is only the sentence that says what
    to fix. Any other exception becomes MLflow's generic 400 with a traceback in the JSON.
    """

    def __init__(self, message):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self):
        return self._message

    @message.setter
    def message(self, value):
        if "_message" not in self.__dict__:
            self._message = value


def _prompts(model_input):
    """A list of prompts from a list, a string, a Series, an array or a DataFrame."""
    if isinstance(model_input, str):
        return [model_input]
    columns = getattr(model_input, "columns", None)
    if columns is not None:  # a DataFrame: the prompt column, else the first one
        column = "prompt" if "prompt" in columns else columns[0]
        return ["" if v is None else str(v) for v in model_input[column].tolist()]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    prompts = []
    for item in model_input:
        if isinstance(item, dict):
            item = item.get("prompt", "")
        elif isinstance(item, (list, tuple)):
            item = item[0] if item else ""
        prompts.append("" if item is None else str(item))
    return prompts


def _checked(params):
    """The sampling settings, or RequestError naming the first bad one and its range.

    MLflow has already cast each value to the signature's type (and dropped unknown names).
    """
    p = {**DEFAULTS, **(params or {})}
    ranges = {
        "max_new_tokens": (p["max_new_tokens"] >= 1, "1 or more (default 100)"),
        "temperature": (p["temperature"] >= 0, "0 (greedy) or more (default 0.8)"),
        "top_k": (p["top_k"] >= 0, "0 (all tokens) or more"),
        "top_p": (0 < p["top_p"] <= 1, "a value in (0, 1], e.g. 0.9 (1 keeps every token)"),
        "num_samples": (1 <= p["num_samples"] <= MAX_SAMPLES, f"1 to {MAX_SAMPLES}"),
    }
    for name, (ok, fix) in ranges.items():
        if not ok:
            raise RequestError(f"params.{name}={p[name]!r} is out of range; use {fix}.")
    return p


class TinytaleModel(PythonModel):
    def load_context(self, context):
        from tinytale.inference import load_model

        self.model, self.tokenizer, _ = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """`num_samples` continuations of every prompt, as one flat list of strings: prompt
        by prompt, so text j of prompt i is at i * num_samples + j. Prompt i samples with
        seed + i (the CLI's --seed for the first prompt gives the same texts)."""
        from tinytale.errors import UserError
        from tinytale.inference import complete

        p = _checked(params)
        seed = int(p["seed"])
        out = []
        for i, prompt in enumerate(_prompts(model_input)):
            try:
                out.extend(complete(
                    self.model, self.tokenizer, prompt, int(p["max_new_tokens"]),
                    float(p["temperature"]), int(p["top_k"]), float(p["top_p"]),
                    seed=None if seed < 0 else seed + i, num_samples=int(p["num_samples"]),
                ))
            except UserError as exc:  # an unknown word: the client's to fix, not a bug
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                raise RequestError(f"inputs[{i}] {shown!r}: {exc}") from None
        return out


mlflow.models.set_model(TinytaleModel())
'''


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        # One unnamed string column: a list of prompts and a DataFrame with a `prompt`
        # column both pass MLflow's schema enforcement.
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", 100),
            ParamSpec("temperature", "double", 0.8),
            ParamSpec("top_k", "long", 0),
            ParamSpec("top_p", "double", 1.0),
            ParamSpec("seed", "long", -1),
            ParamSpec("num_samples", "long", 1),
        ]),
    )


# What loading and sampling the model imports, as ranges: exact pins of the trainer's
# versions made every load in another environment warn (`pyyaml (current: 6.0.4, required:
# pyyaml==6.0.3)`) although nothing the model uses differs. Lower bounds are tinytale's own
# (pyproject.toml); upper bounds stop at the next major version. tokenizers is read only by
# BPE models, pandas by the pyfunc wrapper; mlflow is named so that MLflow adds no pin of it.
MODEL_REQUIREMENTS = [
    "mlflow>=3.17,<4",
    "torch>=2.4,<3",
    "numpy>=1.26,<3",
    "pyyaml>=6,<7",
    "tokenizers>=0.19,<1",
    "pandas>=2,<4",
]


def _package_copy(dest: Path) -> Path:
    """The tinytale sources (no caches) to ship with the model as code_paths."""
    import tinytale

    src = Path(tinytale.__file__).parent
    target = dest / "tinytale"
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _inference_copy(checkpoint: Path, dest: Path) -> Path:
    """The checkpoint without what only training needs (AdamW moments, RNG states): about a
    third of the size to upload, store and serve, and all that loading the model reads."""
    from tinytale.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint)
    for key in ("optimizer", "rng"):
        state.pop(key, None)
    return save_checkpoint(state, dest)


def log_and_register(client: MlflowClient, uri: str, run_id: str, experiment_id: str | None,
                     rec: dict[str, Any], spool: Spool | None = None) -> dict[str, Any]:
    """Log the best checkpoint as a pyfunc model; register it and move `champion` if better.

    Idempotent per spool record: a replay finds the version a lost ack already created.
    """
    from mlflow.models import Model

    summary = rec.get("summary", {})
    name = rec["registered_model"]
    key = f"{rec['local_id']}:{rec['seq']}"
    checkpoint = Path(rec["checkpoint"])
    best_val_loss = summary.get("best_val_loss")
    best_epoch = summary.get("best_epoch")
    result: dict[str, Any] = {"registered_model": name if rec["register"] else None}

    # The run's experiment, always: without an active run, MLflow 3's Model.log files the
    # model under the Default experiment (id 0), away from the run and its artifact folder.
    experiment_id = experiment_id or client.get_run(run_id).info.experiment_id
    model_uri = model_id = None
    found = client.search_logged_models(
        [experiment_id], filter_string=f"tags.tinytale_spool_key = '{key}'", max_results=20)
    # A model whose upload was cut off stays PENDING or FAILED: log it again.
    ready = [m for m in found if str(m.status).upper().endswith("READY")]
    if ready:
        model_id = ready[0].model_id
        model_uri = f"models:/{model_id}"
    if model_uri is None:
        if not checkpoint.is_file():
            raise MlflowException(f"checkpoint {checkpoint} is gone; cannot log the model",
                                  error_code=INVALID_STATE)
        mlflow.set_tracking_uri(uri)
        pending = client.create_logged_model(
            experiment_id, name=MODEL_NAME, source_run_id=run_id, model_type="tinytale-gpt",
            tags={"tinytale_spool_key": key, "best_epoch": str(best_epoch),
                  "best_val_loss": str(best_val_loss)},
            params=dict(client.get_run(run_id).data.params))
        with tempfile.TemporaryDirectory(prefix="tinytale-model-") as tmp:
            code_file = Path(tmp) / "tinytale_pyfunc.py"
            code_file.write_text(PYFUNC_CODE, encoding="utf-8")
            package = _package_copy(Path(tmp))
            weights = _inference_copy(checkpoint, Path(tmp) / checkpoint.name)
            with warnings.catch_warnings():  # "no input example": on purpose, it costs a load
                warnings.simplefilter("ignore")
                info = Model.log(
                    artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                    python_model=str(code_file), artifacts={"checkpoint": str(weights)},
                    code_paths=[str(package)], pip_requirements=list(MODEL_REQUIREMENTS),
                    signature=_signature(), step=int(best_epoch or 0),
                    model_id=pending.model_id,
                )
        model_uri, model_id = info.model_uri, info.model_id
    client.set_tag(run_id, "tinytale.model_id", model_id)
    result.update(model_uri=model_uri, model_id=model_id)
    if not rec["register"]:
        return _record_registration(spool, result, uri)

    version = None
    for mv in client.search_model_versions(f"run_id = '{run_id}'"):
        if mv.name == name and mv.tags.get("tinytale_spool_key") == key:
            version = mv
            break
    if version is None:
        tags = {"run_id": run_id, "best_epoch": str(best_epoch),
                "best_val_loss": str(best_val_loss), "tinytale_spool_key": key}
        for k in ("config_hash", "experiment"):
            if summary.get(k):
                tags[k] = str(summary[k])
        with contextlib.suppress(MlflowException):
            client.create_registered_model(
                name, description="tinytale GPT trained on fairy tales; alias 'champion' is "
                                  "the version with the lowest validation loss.")
        version = client.create_model_version(name, source=model_uri, run_id=run_id,
                                              tags=tags, model_id=model_id)
    champion = promote_champion(client, name)
    result.update(registered_version=str(version.version),
                  champion=champion == str(version.version))
    client.set_tag(run_id, "tinytale.registered_version", str(version.version))
    client.set_tag(run_id, "tinytale.registered_model", name)
    return _record_registration(spool, result, uri)


def promote_champion(client: MlflowClient, name: str, rounds: int = 20) -> str | None:
    """Point `champion` at the version with the lowest `best_val_loss`; return that version.

    The registry has no compare-and-set, and two runs may register at once. Reading the
    versions and the alias again after every write makes the last writer check its own
    write: whichever process writes last sees every version created before its final read,
    and a version created after that read is checked by its own registering process.
    Ties go to the older version, so equal models never move the alias. Two first-ever
    writes can collide in the store (a unique-constraint error); the loser reads again.
    """
    for attempt in range(rounds):
        versions = client.search_model_versions(f"name = '{name}'")
        scored = [(_float(v.tags.get("best_val_loss")), int(v.version)) for v in versions]
        scored = [s for s in scored if math.isfinite(s[0])]
        if not scored:
            return None
        best = str(min(scored)[1])
        try:
            current = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException:
            current = None
        if current == best:
            return best
        try:
            client.set_registered_model_alias(name, CHAMPION, best)
        except MlflowException:
            if attempt == rounds - 1:
                raise
    return best


def _record_registration(spool: Spool | None, result: dict[str, Any],
                         uri: str) -> dict[str, Any]:
    if spool is not None:
        spool.append({"op": "registered", **result, "uri": uri}, data=False)
    return result


def _float(x: Any) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return math.inf
    return value if math.isfinite(value) else math.inf
