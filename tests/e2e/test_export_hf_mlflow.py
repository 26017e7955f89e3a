"""Hugging Face export with a real MLflow server: `tracking.export_hf: true` puts the folder
among the run's artifacts, and `tinytale export models:/NAME@champion` fetches the
registered model and writes the same folder."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support.configs import TINY
from typer.testing import CliRunner

from tinytale.cli import app

transformers = pytest.importorskip("transformers")

HF_FILES = ["config.json", "generation_config.json", "model.safetensors",
            "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def test_run_carries_the_export_and_the_registry_exports_the_same(mlflow_server, tmp_path):
    name = f"hf-{uuid.uuid4().hex[:8]}"
    args = [a for o in [*TINY, "tracking.export_hf=true", f"tracking.registered_model={name}",
                        "tracking.system_metrics=false"] for a in ("--set", o)]
    result = CliRunner().invoke(app, ["train", *args, "--experiment", name, "--json",
                                      "--tracking-uri", mlflow_server.url,
                                      "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])

    client = MlflowClient(mlflow_server.url)
    listed = sorted(Path(f.path).name for f in client.list_artifacts(summary["run_id"], "hf"))
    assert listed == HF_FILES
    logged = Path(client.download_artifacts(summary["run_id"], "hf", str(tmp_path / "dl")))

    out = tmp_path / "from-registry"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("tinytale")), "export", f"models:/{name}@champion",
         "--format", "hf", str(out), "--tracking-uri", mlflow_server.url],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == HF_FILES
    for file in HF_FILES:  # the registered model is the run's best checkpoint
        assert (out / file).read_bytes() == (logged / file).read_bytes(), file
    model = transformers.AutoModelForCausalLM.from_pretrained(logged)
    assert model.config.n_positions == 16 and model.config.vocab_size == summary["vocab_size"]
