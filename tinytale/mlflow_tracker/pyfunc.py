"""The best checkpoint logged as the served model (served.py) and registered; the champion."""

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

# The model's code (models-from-code): a module of its own that MLflow copies into the model.
SERVED_MODEL = Path(__file__).with_name("served.py")


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


def warm_model_saving() -> None:
    """Do now what saving the model would do first at the end of the run, where the training
    process waits for it: import mlflow.pyfunc and compute MLflow's map of every installed
    package (~0.3 s, read to check the model's requirements). The helper process calls this
    while the training runs; it never imports torch (the training process writes the model
    file). The map is a private MLflow function: should it move, saving computes it itself."""
    import mlflow.pyfunc  # noqa: F401

    with contextlib.suppress(Exception):
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()


def _package_copy(dest: Path) -> Path:
    """The tinytale sources (no caches) to ship with the model as code_paths."""
    import tinytale

    src = Path(tinytale.__file__).parent
    target = dest / "tinytale"
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _model_file_of(checkpoint: Path, tmp: Path) -> tuple[Path, str]:
    """A model record from an earlier tinytale names best.pt itself: write its model file and
    choose its example prompt here, as the training process now does (this imports torch)."""
    from tinytale.checkpoint import MODEL, save_model_copy
    from tinytale.inference import example_prompt
    from tinytale.tokenizer import tokenizer_from_dict

    state = save_model_copy(checkpoint, tmp / MODEL)
    return tmp / MODEL, example_prompt(tokenizer_from_dict(state["tokenizer"]))


EXAMPLE_PARAMS = {"max_new_tokens": 50, "temperature": 0.8, "seed": 1}


class _PyfuncSaver:
    """`mlflow.pyfunc` as Model.log's flavor, minus Model.log's `validate_serving_input`
    switch, which Model.log also hands to the flavor's save_model and pyfunc's does not take
    (MLflow's transformers flavor takes it, for the same reason: not loading the model)."""

    __name__ = "mlflow.pyfunc"  # the flavor name Model.log records

    @staticmethod
    def save_model(**kwargs: Any) -> Any:
        kwargs.pop("validate_serving_input", None)
        return mlflow.pyfunc.save_model(**kwargs)


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
            package = _package_copy(Path(tmp))
            if rec.get("model_file"):  # written by the training process: no torch here
                weights, prompt = checkpoint, rec.get("example_prompt", "")
            else:
                weights, prompt = _model_file_of(checkpoint, Path(tmp))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # The example is written as input_example.json and serving_input_example.json
                # (the UI shows how to call the model); with the signature given and
                # validate_serving_input off, MLflow neither loads the model nor predicts.
                # step = the best epoch: MLflow links the run's metrics at that step
                # (val_loss, val_perplexity, ...) to the LoggedModel as its model metrics.
                info = Model.log(
                    artifact_path=None, name=MODEL_NAME, flavor=_PyfuncSaver, run_id=run_id,
                    python_model=str(SERVED_MODEL), artifacts={"checkpoint": str(weights)},
                    code_paths=[str(package)], pip_requirements=list(MODEL_REQUIREMENTS),
                    signature=_signature(), step=int(best_epoch or 0),
                    model_id=pending.model_id, input_example=([prompt], dict(EXAMPLE_PARAMS)),
                    validate_serving_input=False,
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
