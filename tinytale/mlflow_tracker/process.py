"""MLflow tracking in a helper process, so that a training never waits for MLflow to start.

Importing mlflow and creating a fresh SQLite store cost about 2 s of CPU, most of it under
the interpreter lock, where a thread would slow the training it overlaps. A helper process
does it on another core while the training process loads data and trains: it runs the
MlflowTracker (spool, replay, registration, system metrics) and the training process sends it
the Tracker calls. The training process never imports mlflow.

Only for embedded stores (sqlite:///): a server must say whether it lets us log before
anything trains (MlflowTracker.check), and an HTTP client in-process costs little. An error
the store gives at the start (a deleted experiment) is reported when the run ends; the
spool keeps the run for `tinytale sync`.

Nothing of this module imports mlflow, except `serve`, which runs in the helper.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import tinytale
from tinytale.errors import UserError
from tinytale.mlflow_tracker.uris import embedded_db_path, is_embedded, resolve_tracking_uri
from tinytale.tracking import Closed, Registration, RunInfo, RunSummary, Tracker

# Calls whose result the caller uses: sent, then waited for. Every other Tracker method is
# sent without waiting (the helper takes them in order), except on_progress (a no-op for
# MLflow that runs every micro-batch) and check, answered here (see TrackerProcess.check).
ASKED = ("publish_model", "costs", "finish")
NOT_SENT = ("on_progress",)


def mlflow_tracker_for(config: Any, tracking_uri: str | None) -> Tracker:
    """The MLflow tracker for `tracking_uri`: in a helper process for the embedded store, else
    in this process. Raises UserError for a URI MLflow cannot use (before any import)."""
    uri = resolve_tracking_uri(tracking_uri, write=True)
    if is_embedded(uri) and os.name == "posix":  # the channel passes pipe ends (pass_fds)
        return TrackerProcess(config, uri)
    from tinytale.mlflow_tracker.tracker import MlflowTracker

    return MlflowTracker(config, uri)


class TrackerProcess(Tracker):
    """A Tracker whose MlflowTracker runs in a helper process, started at construction so that
    its imports overlap with the training process's own."""

    keeps_records = True

    def __init__(self, config: Any, uri: str):
        self.uri = uri
        self._export_hf = bool(config.tracking.export_hf)
        self._run_id: str | None = None
        self._start_error: UserError | None = None
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._loop_s = 0.0
        self._closed: Closed | None = None
        to_helper, from_training = os.pipe()
        to_training, from_helper = os.pipe()
        # Its own session: a Ctrl-C at the terminal goes to the training, which then still
        # finishes the run through the helper. Its stdout is our stderr (see main).
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tinytale.mlflow_tracker.process", str(to_helper),
             str(from_helper)], pass_fds=(to_helper, from_helper), start_new_session=True,
            env=_env_finding_tinytale())
        os.close(to_helper)
        os.close(from_helper)
        self._send_conn = Connection(from_training, readable=False)
        self._recv_conn = Connection(to_training, writable=False)
        self._sender = threading.Thread(target=self._send_all, name="tinytale-tracker-send",
                                        daemon=True)
        self._reader = threading.Thread(target=self._read_all, name="tinytale-tracker-read",
                                        daemon=True)
        self._sender.start()
        self._reader.start()
        self._post(("init", config, uri))

    @property
    def run_id(self) -> str | None:  # type: ignore[override]
        return self._run_id  # as the helper last reported it

    # -- the channel -----------------------------------------------------------------

    def _post(self, message: tuple) -> None:
        """Queue a message; a thread sends it, so the loop never blocks on a full pipe."""
        start = time.perf_counter()
        self._outbox.put(message)
        self._loop_s += time.perf_counter() - start

    def _send_all(self) -> None:
        while True:
            message = self._outbox.get()
            if message is None:
                break
            try:
                self._send_conn.send(message)
            except OSError:  # the helper is gone: _ask reports it
                break
        self._send_conn.close()

    def _read_all(self) -> None:
        while True:
            try:
                kind, value = self._recv_conn.recv()
            except (EOFError, OSError):
                self._replies.put(("gone", None))
                return
            if kind == "run_id":
                self._run_id = value
            elif kind == "start_error":
                self._start_error = value
            else:
                self._replies.put((kind, value))

    def _ask(self, name: str, *args: Any) -> Any:
        self._post(("ask", name, args))
        kind, value = self._replies.get()
        if kind == "gone":
            self._replies.put((kind, value))  # every later ask sees it too
            raise RuntimeError(f"the MLflow helper process stopped (exit code "
                               f"{self._proc.wait(timeout=10)}) before answering {name}")
        if kind == "error":
            raise value
        return value

    # -- the Tracker calls ---------------------------------------------------------

    def check(self, info: RunInfo) -> None:
        """Here, without waiting for the helper: an embedded store has no server to refuse
        us (MlflowTracker.check asks servers only), so what is left to check before training
        is the export's writer. Waiting would hold the training back until the helper has
        imported mlflow (about 2 s on a 2-core machine)."""
        if self._export_hf:
            from tinytale.export_hf import require_writer

            require_writer()

    def start(self, info: RunInfo) -> str | None:
        self._post(("call", "start", (info,)))
        return None  # known later: run_id is read live

    def publish_model(self, model_file: Path, summary: RunSummary,
                      example_prompt: str = "") -> Registration | None:
        return self._ask("publish_model", model_file, summary, example_prompt)

    def costs(self) -> dict[str, float]:
        out = dict(self._ask("costs"))
        out["tracking_loop_s"] = round(self._loop_s, 6)  # this process's time in our calls
        return out

    def finish(self, status: str) -> Closed:
        if self._closed is not None:
            return self._closed
        try:
            self._closed = self._ask("finish", status)
        except RuntimeError as exc:
            print(f"warning: {exc}; the run's spool keeps what it received; send it with "
                  "`tinytale sync RUN_DIR`.", file=sys.stderr, flush=True)
            self._closed = Closed(tracking_uri=self.uri)
        finally:
            # Not waited for: the helper closed the spool (and its lock) before answering,
            # and its interpreter's exit is no part of the run.
            self._outbox.put(None)
        if self._start_error is not None:
            raise self._start_error
        return self._closed


def _forwarder(name: str) -> Any:
    def forward(self: TrackerProcess, *args: Any) -> None:
        self._post(("call", name, args))

    forward.__name__ = name
    forward.__doc__ = f"Sent to the helper's MlflowTracker.{name}, not waited for."
    return forward


# Every other Tracker method, including any added to the interface later, is forwarded.
for _name, _member in vars(Tracker).items():
    if callable(_member) and not _name.startswith("_") and _name not in NOT_SENT \
            and _name not in vars(TrackerProcess):
        setattr(TrackerProcess, _name, _forwarder(_name))


def _env_finding_tinytale() -> dict[str, str]:
    """The environment, with this tinytale first on the helper's path (whatever put it on ours)."""
    root = str(Path(tinytale.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, path) if p)}


# ------------------------------------------------------------------------------ the helper


def serve(from_training: Connection, to_training: Connection) -> None:
    """The helper's loop: run each call on an MlflowTracker, in order, until the channel ends."""
    from tinytale.mlflow_tracker.pyfunc import warm_model_saving
    from tinytale.mlflow_tracker.tracker import MlflowTracker  # mlflow: the slow import

    _, config, uri = from_training.recv()
    tracker = MlflowTracker(config, uri)
    warm_up(uri)  # the training process does not wait: its calls queue in the channel
    warm = True  # model saving still to warm up: once the run is open, while it trains
    failed = False  # start refused the run: nothing more goes to MLflow
    reported_id = None
    while True:
        try:
            kind, name, args = from_training.recv()
        except (EOFError, OSError):
            return  # the training process is gone; the spool holds what it sent
        value, error = None, None
        try:
            if not failed:
                value = getattr(tracker, name)(*args)
        except UserError as exc:  # as a plain UserError: a subclass may not unpickle
            if name == "start":
                failed = True
                to_training.send(("start_error", UserError(str(exc))))
            else:
                error = UserError(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug: the training process reports it
            error = RuntimeError(f"MlflowTracker.{name} failed: {exc!r}")
        if kind == "ask":
            if failed and name == "finish":
                value = Closed(tracking_uri=uri)
            to_training.send(("error", error) if error else ("reply", value))
        elif error is not None:  # nobody waits for this call's result: say it here
            print(f"warning: {error}", file=sys.stderr, flush=True)
        if tracker.run_id != reported_id:
            reported_id = tracker.run_id
            to_training.send(("run_id", reported_id))
        if kind == "ask" and name == "finish":
            return
        if warm and name == "start" and not failed:
            warm = False
            warm_model_saving()


def warm_up(uri: str) -> None:
    """Open the store now (creating a fresh one's tables: the slow part), while the training
    process is still importing torch and reading data, not when the run starts. A new store
    starts as a copy of an empty one kept from the last store created (store_seed.py)."""
    from tinytale.mlflow_tracker.connection import make_client
    from tinytale.mlflow_tracker.store_seed import keep_seed, seed_store

    db = embedded_db_path(uri)
    created = not db.exists() and not seed_store(db)
    # Any failure here is the run's own start's to report, in its words.
    with contextlib.suppress(Exception):
        make_client(uri).search_experiments(max_results=1)
        if created:
            keep_seed(db)


def main(argv: list[str]) -> None:
    # Stop signals are for the training process, which then finishes the run through us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.dup2(2, 1)  # stdout carries the training's --json line: nothing of ours goes there
    # Send as records arrive, on this otherwise idle core, so that little is left to send
    # when the run ends (the training process waits for that); a value the user set wins.
    os.environ.setdefault("TINYTALE_TRACKING_FLUSH_S", "0.5")
    from_training = Connection(int(argv[0]), writable=False)
    to_training = Connection(int(argv[1]), readable=False)
    serve(from_training, to_training)
    # Everything is sent and the spool closed: skip the interpreter's teardown (mlflow's
    # exit handlers took ~1.7 s here), which would hold the training's stderr open.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
