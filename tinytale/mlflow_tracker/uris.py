"""Tracking URIs and the MLflow client: defaults, validation, health probes, HTTP settings."""

from __future__ import annotations

import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from tinytale.errors import UserError

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
KNOWN_SCHEMES = {"http", "https", "file", "sqlite", "postgresql", "mysql", "mssql",
                 "databricks", "databricks-uc", "uc"}

# Set after `import mlflow` above (its import configures the 'mlflow' logger); the package
# __init__ imports this module, so these hold before any call reaches MLflow.
# One HTTP try per call: the replayer is the retry layer, and MLflow's own retries with
# backoff would block a flush for minutes while the server is down.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
# stdout carries the CLI's --json line: MLflow must not print run URLs or progress bars there.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def default_tracking_uri(cwd: Path | None = None) -> str:
    """The embedded store: SQLite in the working directory (absolute, so a spool replays)."""
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / EMBEDDED_DB}"


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """--tracking-uri / MLFLOW_TRACKING_URI as given, else the embedded SQLite store."""
    uri = (tracking_uri or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return default_tracking_uri()
    check_tracking_uri(uri)
    return uri


def check_tracking_uri(uri: str) -> None:
    """Reject URIs MLflow cannot use, with one sentence, before any training starts."""
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if not scheme or (len(scheme) == 1 and sys.platform == "win32"):
        return  # a plain local path: MLflow's file store
    hint = ("use http://HOST:PORT for a server, sqlite:///PATH.db for a local store, or leave "
            "it unset for ./mlflow.db")
    if scheme.split("+")[0] not in KNOWN_SCHEMES:
        raise UserError(f"tracking URI '{uri}' has an unsupported scheme '{scheme}'; {hint}.")
    if scheme in ("http", "https"):
        try:
            port = parsed.port
        except ValueError:
            port = -1
        if not parsed.hostname or port == -1:
            raise UserError(f"tracking URI '{uri}' is not a valid server address; {hint}.")
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise UserError(f"tracking URI '{uri}' is not a valid SQLite URI; {hint}.")


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def server_healthy(uri: str, timeout: float = 2.0) -> bool:
    """A cheap probe (no MLflow retries): True for local stores, /health for servers."""
    if not _is_http(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _client(uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(uri)  # log_model and register_model use the global URI
    return MlflowClient(uri, registry_uri=uri)
