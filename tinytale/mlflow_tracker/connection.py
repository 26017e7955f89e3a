"""Talking to a tracking server: the one MLflow client, its settings, and what a failure means.

Every failed call to MLflow is one of (`classify`):

* unreachable: no answer (the health probe fails, a network error). Retry later: the spool
  keeps what was not sent.
* busy: an answer that may pass on its own (TRANSIENT_CODES: an internal error, overload,
  a rate limit, a timeout; a locked database). Retried like an outage.
* refused: HTTP 401/403. The server refuses *us* (login, permission or Host header) and
  every record alike, until a person fixes that: `access_refusal` says what and how.
* invalid: the server rejected the record itself (INVALID_PARAMETER_VALUE and kin); it can
  never pass, so the replayer skips it after a few tries.
* other: any other definite answer (unknown resource, a bug of ours); kept, never skipped.
"""

from __future__ import annotations

import enum
import logging
import os
import urllib.parse

from mlflow import MlflowClient
from mlflow.environment_variables import (
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_LOGGING_LEVEL,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)
from mlflow.exceptions import MlflowException

from tinytale.errors import UserError
from tinytale.mlflow_tracker.uris import (
    EMBEDDED_ARTIFACTS,
    embedded_db_path,
    is_embedded,
    is_http,
    server_healthy,
)

# MLflow reads these settings from the environment at every call; a value the user set wins.
MLFLOW_DEFAULTS = (
    # One HTTP try per call: the replayer is the retry layer, and MLflow's own retries with
    # backoff would block a flush for minutes while the server is down.
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, "0"),
    (MLFLOW_HTTP_REQUEST_TIMEOUT, "20"),
    # stdout carries the CLI's --json line: MLflow must not print run URLs or progress bars there.
    (MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT, "true"),
    (MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR, "false"),
)


def use_mlflow_settings() -> None:
    """tinytale's defaults for MLflow's settings and a quiet 'mlflow' logger (INFO lines such as
    "Started monitoring system metrics" are noise on a training's stderr).

    Applied where tinytale starts to use MLflow (a client is made, a run starts), not at
    import; calling it again changes nothing.
    """
    for variable, value in MLFLOW_DEFAULTS:
        if not variable.defined:
            variable.set(value)
    if not MLFLOW_LOGGING_LEVEL.get():
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def make_client(uri: str) -> MlflowClient:
    """The MLflow client for `uri`, tracking and registry alike, under tinytale's settings."""
    use_mlflow_settings()
    return MlflowClient(uri, registry_uri=uri)


def require_reachable(uri: str, so: str = "", fix: str = "start it or pass another "
                      "--tracking-uri") -> None:
    """A command that needs the server now: one sentence when it does not answer."""
    if not server_healthy(uri):
        raise UserError(f"MLflow server {uri} is unreachable{so}; {fix}.")


# --------------------------------------------------------------------------- the records not sent


class NotSent(Exception):
    """The server has not taken these spool records (yet); the spool keeps them for later."""


class ServerUnavailable(NotSent):
    """No answer, or one that may pass on its own (unreachable, busy): retry soon."""


class AccessRefused(NotSent):
    """HTTP 401/403: the server answers but refuses us. Kept for later like an outage, but it
    takes a person to fix (`what` says what was refused, `fix` how)."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what}; {fix}")
        self.what, self.fix = what, fix

    @property
    def sentence(self) -> str:
        return f"{self.what}; {self.fix}."


class RecordRejected(NotSent):
    """The server answered about the records themselves (an invalid value, a definite error).
    Kept and retried; only a record the server calls invalid is ever skipped, after
    MAX_PERMANENT_FAILURES tries."""


# --------------------------------------------------------------------------- classification


class Failure(enum.Enum):
    UNREACHABLE = "unreachable"
    BUSY = "busy"
    REFUSED = "refused"
    INVALID = "invalid"
    OTHER = "other"


# Error codes MLflow gives a 401 or 403 answer (mlflow.exceptions.ERROR_CODE_TO_HTTP_STATUS).
ACCESS_CODES = {"UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401, "PERMISSION_DENIED": 403}
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                   "DEADLINE_EXCEEDED"}
# The only answers that say the record itself is invalid (a bad metric or param value;
# INVALID_STATE: a deleted run, a checkpoint gone), so it can never pass.
INVALID_DATA_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST",
                      "INVALID_STATE"}
LOGIN_VARS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


def classify(exc: BaseException, uri: str) -> Failure:
    """What a failed call to the server at `uri` means (see the module's docstring).

    Only a definite answer is INVALID or OTHER: anything that may pass on its own is
    UNREACHABLE or BUSY. Probes the server's /health unless the answer says enough.
    """
    if _refused_status(exc)[0] is not None:
        return Failure.REFUSED
    if isinstance(exc, OSError | TimeoutError) or not server_healthy(uri):
        return Failure.UNREACHABLE  # requests' errors are OSErrors
    if str(getattr(exc, "error_code", "")) in TRANSIENT_CODES:
        return Failure.BUSY
    text = str(exc).lower()
    if "database is locked" in text or "busy" in text:
        return Failure.BUSY
    if isinstance(exc, MlflowException) and str(exc.error_code) in INVALID_DATA_CODES:
        return Failure.INVALID
    return Failure.OTHER


def access_refusal(exc: BaseException, uri: str) -> AccessRefused | None:
    """What the server refused and the fix, when it answered 401 or 403; None otherwise."""
    status, text = _refused_status(exc)
    if status is None:
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    if status == 403 and "host header" in text.lower():
        host = urllib.parse.urlparse(uri).netloc.rsplit("@", 1)[-1]
        return AccessRefused(
            f"MLflow at {uri} refuses the Host header '{host}' (HTTP 403)",
            f"add '{host}' to the server's allowed hosts (MLFLOW_SERVER_ALLOWED_HOSTS, "
            "`mlflow server --allowed-hosts`) or use a host name it allows")
    if status == 401 and not user:
        return AccessRefused(f"MLflow at {uri} requires a login and none was given (HTTP 401)",
                             f"set {LOGIN_VARS} to an account of that server")
    if status == 401:
        return AccessRefused(f"MLflow at {uri} refused the login of user '{user}' (HTTP 401)",
                             f"set {LOGIN_VARS} to an account of that server")
    who = f"user '{user}'" if user else "this client"
    return AccessRefused(f"MLflow at {uri} denied {who} permission (HTTP 403)",
                         "have the server's admin grant it EDIT on the experiment, or log in "
                         f"as another user with {LOGIN_VARS}")


def _refused_status(exc: BaseException) -> tuple[int | None, str]:
    """401/403 and the answer's text, from an MlflowException or a requests error (artifact
    uploads), looking through the exceptions it was raised from."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            break
        code = str(getattr(seen, "error_code", "") or "")
        if code in ACCESS_CODES:
            return ACCESS_CODES[code], str(seen)
        status = getattr(getattr(seen, "response", None), "status_code", None)
        if status in (401, 403):
            return status, f"{getattr(seen.response, 'text', '')} {seen}"
        seen = seen.__cause__ or seen.__context__
    return None, ""


def explain(exc: BaseException, uri: str) -> str | None:
    """One sentence for an MLflow error a user fixes at the server (reach, credentials); else
    None. For commands that read or write once, where there is no spool to keep anything."""
    if not isinstance(exc, MlflowException) or not is_http(uri):
        return None
    failure = classify(exc, uri)
    if failure is Failure.REFUSED:
        return access_refusal(exc, uri).sentence
    if failure is Failure.UNREACHABLE:
        return (f"cannot reach the MLflow server at {uri}; start it (`docker compose up -d "
                "mlflow`, or `mlflow server`) or pass its address with --tracking-uri.")
    return None


def check_access(uri: str, experiment: str) -> None:
    """Refuse to train against a server that answers but refuses us (401/403): one sentence.

    A server that does not answer is an outage, not an error: the spool keeps the run.
    """
    if not is_http(uri) or not server_healthy(uri):
        return
    try:
        make_client(uri).get_experiment_by_name(experiment)
    except Exception as exc:
        refusal = access_refusal(exc, uri)
        if refusal is not None:
            raise UserError(refusal.sentence) from None
        # Anything else is the replayer's to retry or to report.


# --------------------------------------------------------------------------- experiments

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id; created (tagged for the training-runs view) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment '{name}' is deleted; restore it with `mlflow "
                            f"experiments restore` or train with another --experiment.")
        return exp.experiment_id
    location = None
    if is_embedded(uri):
        db = embedded_db_path(uri)
        location = (db.parent / EMBEDDED_ARTIFACTS).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" in str(exc.error_code):  # created by a parallel run
            return client.get_experiment_by_name(name).experiment_id
        raise
