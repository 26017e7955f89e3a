"""tracking.export_hf: the best checkpoint as a Hugging Face folder among the run's artifacts."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow import MlflowClient

ARTIFACT_PATH = "hf"


def log_hf_folder(client: MlflowClient, run_id: str, checkpoint: Path) -> None:
    """Export and upload under `hf/`; a replay uploads the same files again (idempotent)."""
    from tinytale.export_hf import export_hf

    if not checkpoint.is_file():
        return  # log_and_register reports the missing checkpoint in MLflow's terms
    with tempfile.TemporaryDirectory(prefix="tinytale-hf-") as tmp:
        folder = export_hf(checkpoint, Path(tmp) / ARTIFACT_PATH).folder
        client.log_artifacts(run_id, str(folder), ARTIFACT_PATH)
