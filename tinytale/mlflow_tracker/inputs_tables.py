"""Two spool records sent to MLflow idempotently: dataset inputs and the samples table.

Both may be sent again after a lost acknowledgement (an outage between the server taking a
record and the ack reaching the spool), so sending one twice must leave what sending it once
does: MLflow itself keeps one input per (run, dataset name, digest), and rows of the samples
table already in the artifact are not appended again.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag

SAMPLES_TABLE = "samples.json"  # MLflow table artifact (JSON, pandas "split" orientation)
CONTEXT_TAG = "mlflow.data.context"  # what mlflow.log_input sets: training, validation, ...
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # how the UI knows the artifact is a table


def log_datasets(client: MlflowClient, run_id: str, datasets: list[dict[str, Any]]) -> None:
    """The run's dataset inputs, with our own digest (the corpus content hash): the digests
    `mlflow.data.from_pandas` and friends compute are of data we never build in memory."""
    inputs = [
        DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"],
                             source=d["source"], profile=d.get("profile")),
                     tags=[InputTag(CONTEXT_TAG, d["context"])])
        for d in datasets
    ]
    client.log_inputs(run_id, datasets=inputs)


def log_samples_table(client: MlflowClient, run_id: str, rows: list[dict[str, Any]]) -> None:
    """Append `rows` to the run's samples table (`log_table`), skipping rows already there."""
    import pandas as pd

    present = _present_rows(client, run_id)
    new = [r for r in rows if (int(r["epoch"]), int(r["sample"])) not in present]
    if new:
        client.log_table(run_id, data=pd.DataFrame(new), artifact_file=SAMPLES_TABLE)
        return
    # Everything was there: the table's upload went through last time; its tag may not have.
    tag = client.get_run(run_id).data.tags.get(LOGGED_ARTIFACTS_TAG, "[]")
    logged = json.loads(tag)
    if not any(a.get("path") == SAMPLES_TABLE for a in logged):
        logged.append({"path": SAMPLES_TABLE, "type": "table"})
        client.set_tag(run_id, LOGGED_ARTIFACTS_TAG, json.dumps(logged))


def _present_rows(client: MlflowClient, run_id: str) -> set[tuple[int, int]]:
    """(epoch, sample) of the rows the run's samples table holds (none without a table)."""
    if SAMPLES_TABLE not in {a.path for a in client.list_artifacts(run_id)}:
        return set()
    with tempfile.TemporaryDirectory(prefix="tinytale-table-") as tmp:
        path = client.download_artifacts(run_id, SAMPLES_TABLE, tmp)
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    columns = table.get("columns", [])
    if "epoch" not in columns or "sample" not in columns:
        return set()
    e, s = columns.index("epoch"), columns.index("sample")
    return {(int(row[e]), int(row[s])) for row in table.get("data", [])}
