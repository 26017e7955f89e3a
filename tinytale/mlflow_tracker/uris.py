"""Tracking URIs: defaults, validation, the health probe, links into the UI, hints on stores.

No MLflow client here (see connection.py); nothing in this module imports mlflow at load.
"""

from __future__ import annotations

import os
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from tinytale.errors import UserError
from tinytale.paths import nearest_existing

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
KNOWN_SCHEMES = {"http", "https", "file", "sqlite", "postgresql", "mysql", "mssql",
                 "databricks", "databricks-uc", "uc"}


def default_tracking_uri(cwd: Path | None = None) -> str:
    """The embedded store: SQLite in the working directory (absolute, so a spool replays)."""
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / EMBEDDED_DB}"


def resolve_tracking_uri(tracking_uri: str | None, write: bool = False) -> str:
    """--tracking-uri / MLFLOW_TRACKING_URI as given, else the embedded SQLite store.

    With `write`, a local store must also be creatable (see check_tracking_uri).
    """
    uri = (tracking_uri or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        uri = default_tracking_uri()
        if write:
            check_tracking_uri(uri, write=True)
        return uri
    check_tracking_uri(uri, write=write)
    return uri


def check_tracking_uri(uri: str, write: bool = False) -> None:
    """Reject URIs MLflow cannot use, with one sentence, before any training starts.

    With `write` (a run will log to it), a local store (sqlite:///, file:, a plain path) must
    be creatable where it points: MLflow would otherwise fail with a traceback on first use.
    Nothing is created here (a probe folder at most, removed at once).
    """
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    hint = ("use http://HOST:PORT for a server, sqlite:///PATH.db for a local store, or leave "
            "it unset for ./mlflow.db")
    if not scheme or (len(scheme) == 1 and sys.platform == "win32"):
        _check_file_store(uri, Path(uri), write)  # a plain local path: MLflow's file store
        return
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
    if scheme == "sqlite":
        db = embedded_db_path(uri)
        if str(db) not in ("", ".", ":memory:"):
            _check_local_path(uri, db, want_dir=False, write=write)
    elif scheme == "file" and parsed.netloc in ("", "localhost"):
        _check_file_store(uri, Path(urllib.request.url2pathname(parsed.path)), write)


LOCAL_HINT = "pass a sqlite:///PATH.db in a folder you can write to, or leave it unset for " \
    "./mlflow.db"


def _check_file_store(uri: str, path: Path, write: bool) -> None:
    _check_local_path(uri, path, want_dir=True, write=write)
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

    if not MLFLOW_ALLOW_FILE_STORE.get():
        raise UserError(f"tracking URI '{uri}' is MLflow's file store, which MLflow 3 refuses "
                        "to open; use sqlite:///PATH.db for a local store (or set "
                        "MLFLOW_ALLOW_FILE_STORE=true to keep the file store).")


def _check_local_path(uri: str, path: Path, want_dir: bool, write: bool) -> None:
    """The store at `path` (a database file, or a file store's folder) can be opened there."""
    path = Path(os.path.abspath(path))
    if path.exists():
        if want_dir and not path.is_dir():
            raise UserError(f"tracking URI '{uri}': '{path}' is a file, not a folder; "
                            f"{LOCAL_HINT}.")
        if not want_dir and path.is_dir():
            raise UserError(f"tracking URI '{uri}': '{path}' is a folder, not a database file; "
                            f"{LOCAL_HINT}.")
        if write and not os.access(path, os.R_OK | os.W_OK):
            raise UserError(f"tracking URI '{uri}': '{path}' is not writable; {LOCAL_HINT}.")
        if write and not want_dir:
            _probe_folder(uri, path, path.parent)  # SQLite writes its journal beside the file
        return
    folder = nearest_existing(path.parent)
    if not folder.is_dir():
        raise UserError(f"tracking URI '{uri}': '{folder}' is a file, not a folder; "
                        f"{LOCAL_HINT}.")
    if write:
        _probe_folder(uri, path, folder)


def _probe_folder(uri: str, path: Path, folder: Path) -> None:
    """Can `path` be created in `folder`? Try it: os.access says yes to root even on /proc."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tinytale-probe-", dir=folder))
    except OSError as exc:
        raise UserError(f"tracking URI '{uri}': '{path}' cannot be created in '{folder}' "
                        f"({exc.strerror or exc}); {LOCAL_HINT}.") from None


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def embedded_db_path(uri: str) -> Path:
    """The database file of a sqlite:/// URI (any ?query left off)."""
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def server_healthy(uri: str, timeout: float = 2.0) -> bool:
    """A cheap probe (no MLflow retries): True for local stores, /health for servers."""
    if not is_http(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- the MLflow UI

# The UI (3.x) opens an experiment in GenAI mode (traces) unless the URL asks for the training
# view; the `mlflow.experimentKind` tag does not switch it.
UI_MODE = "workflowType=machine_learning"


def ui_base(uri: str) -> str | None:
    """Where a person's browser reaches the UI of the server at `uri`; None for local stores.

    A trainer container logs to http://mlflow:5000, which no browser on the host can open:
    compose tells it the published address in TINYTALE_MLFLOW_UI_URL.
    """
    if not is_http(uri):
        return None
    return (os.environ.get("TINYTALE_MLFLOW_UI_URL") or uri).rstrip("/")


def run_url(uri: str, experiment_id: str | None, run_id: str | None) -> str | None:
    """The run's page in the MLflow UI, in Model training mode, on its charts."""
    base = ui_base(uri)
    if base is None or not experiment_id or not run_id:
        return None
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{UI_MODE}"


def sweep_charts_url(uri: str, experiment_id: str | None, sweep: str) -> str | None:
    """The experiment's chart view with every point of `sweep` drawn side by side.

    The filter matches the point runs; sorting by a metric (not by date) makes the UI list
    them flat instead of folded under their parent run, so each point's curves are drawn.
    """
    base = ui_base(uri)
    if base is None or not experiment_id:
        return None
    query = urllib.parse.urlencode({
        "searchFilter": f'tags.`tinytale.sweep` = "{sweep}"',
        "orderByKey": "metrics.`val_loss`", "orderByAsc": "true",
        "compareRunsMode": "CHART",
    }, quote_via=urllib.parse.quote)
    return f"{base}/#/experiments/{experiment_id}/runs?{UI_MODE}&{query}"


# --------------------------------------------------------------------------- reading stores


def compose_server_hint(uri: str) -> str | None:
    """The fix naming the compose stack's server, when one answers there and `uri` is not it.

    Host commands default to ./mlflow.db; after `docker compose up` or a launched sweep the
    runs are on the stack's server instead, and this says so.
    """
    from tinytale.launch import host_tracking_uri

    stack = host_tracking_uri()
    if uri.rstrip("/") == stack or not server_healthy(stack, timeout=0.5):
        return None
    return (f"an MLflow server answers on {stack} (the compose stack's port): pass "
            f"--tracking-uri {stack} or export MLFLOW_TRACKING_URI={stack}")


def require_store(uri: str, looking_for: str) -> None:
    """Refuse to read a local SQLite store that does not exist, instead of creating it.

    Opening a missing sqlite:/// store makes MLflow create an empty one: a read-only command
    would leave a 1 MB mlflow.db behind and then report that nothing is in it.
    """
    if not is_embedded(uri):
        return
    db = embedded_db_path(uri)
    if not db.exists():
        fix = compose_server_hint(uri) or ("run it from the folder you trained in, or pass "
                                           "--tracking-uri")
        raise UserError(f"there is no MLflow store at {db} to look up {looking_for} in; {fix}.")


def missing_hint(uri: str, name_store: bool = True) -> str:
    """Where a search found nothing: the store it searched, and the stack's server if it is up."""
    hint = compose_server_hint(uri)
    if not name_store:
        return f"; or {hint}" if hint else ""
    return f" (searched {uri}{'; or ' + hint if hint else ''})"
