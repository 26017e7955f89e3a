"""MlflowTracker: the Tracker the training loop calls; it spools and replays in the background."""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tinytale.errors import UserError
from tinytale.mlflow_tracker.connection import (
    AccessRefused,
    NotSent,
    check_access,
    use_mlflow_settings,
)
from tinytale.mlflow_tracker.reader import summary_tag
from tinytale.mlflow_tracker.replay import Replayer
from tinytale.mlflow_tracker.spool import SPOOL_NAME, Spool
from tinytale.mlflow_tracker.system_metrics import _system_monitor
from tinytale.mlflow_tracker.uris import resolve_tracking_uri, run_url
from tinytale.paths import missing_folders
from tinytale.tracking import Closed, Registration, RunInfo, RunSummary, Tracker

log = logging.getLogger("tinytale.mlflow")


def flush_interval_s() -> float:
    """Seconds between background sends (TINYTALE_TRACKING_FLUSH_S, default 5)."""
    return float(os.environ.get("TINYTALE_TRACKING_FLUSH_S", "5"))


def finish_wait_s() -> float:
    """How long finish() waits for an unreachable server (TINYTALE_TRACKING_WAIT_S, 30)."""
    return float(os.environ.get("TINYTALE_TRACKING_WAIT_S", "30"))


class MlflowTracker(Tracker):
    """Tracker that spools locally and replays to MLflow on a background thread."""

    keeps_records = True

    def __init__(self, config: Any, tracking_uri: str | None = None):
        """Checks the URI (no network: the server is first asked in `check` or `start`).

        Raises UserError for a URI MLflow cannot use.
        """
        self.config = config
        self.uri = resolve_tracking_uri(tracking_uri, write=True)
        self._checked = False
        self.spool: Spool | None = None
        self.replayer: Replayer | None = None
        self.local_id: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._monitor: Any = None
        self._best: tuple[float, int] = (math.inf, 0)
        self._last_epoch = 0
        self._warned: set[str] = set()
        self._nonfinite = 0
        self._tmpdir: str | None = None
        self._loop_s = 0.0  # wall time the training loop spent in our calls
        self._pending_model: int | None = None  # seq of a model record log_best_model left unsent

    @property
    def run_id(self) -> str | None:  # type: ignore[override]
        # Live: a run created after an outage gets its id from the replayer later on, and
        # checkpoints written after that carry it (so `--resume RUN_ID` finds them).
        return self.replayer.run_id if self.replayer else None

    # -- lifecycle ---------------------------------------------------------------

    def check(self, info: RunInfo) -> None:
        """Ask a server whether it lets us log (once): UserError for one that answers but
        refuses us (401/403); an unreachable server is fine (the spool keeps the run)."""
        if not self._checked:
            if self.config.tracking.export_hf:
                from tinytale.export_hf import require_writer

                require_writer()  # before training, not after it
            use_mlflow_settings()
            check_access(self.uri, info.experiment)
            self._checked = True

    def start(self, info: RunInfo) -> str | None:
        """Open the run: checked (see `check`) before anything is written, then spooled and
        sent. UserError when nothing of the run can reach the server and a person must act."""
        self.check(info)
        local_dir = info.local_dir
        if local_dir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="tinytale-spool-")
            local_dir = Path(self._tmpdir)
        made = missing_folders(Path(local_dir))
        self.spool = Spool(Path(local_dir) / SPOOL_NAME)
        self.replayer = Replayer(self.spool, self.uri)
        opened = self.spool.first("open")
        now = _now_ms()
        if opened is None:
            self.local_id = uuid.uuid4().hex
            tags = {**info.tags, "mlflow.user": _user(), "mlflow.source.name": "tinytale",
                    "mlflow.source.type": "LOCAL"}
            if info.tags.get("git_commit"):
                tags["mlflow.source.git.commit"] = info.tags["git_commit"]
            self.spool.append({
                "op": "open", "ts": now, "experiment": info.experiment,
                "run_name": info.run_name, "tags": tags, "local_id": self.local_id,
                "parent_run_id": info.parent_run_id, "resume_run_id": info.resume_run_id,
                "tracking_uri": self.uri,
            })
            self.spool.append({"op": "params", "params": info.params})
            if info.datasets:
                self.spool.append({"op": "inputs", "datasets": info.datasets})
            if info.config_yaml:
                self.spool.append({"op": "text", "name": "config.yaml",
                                   "text": info.config_yaml})
        else:
            self.local_id = opened["local_id"]
            self.spool.append({"op": "reopen", "ts": now})
            self._restore_progress()
        try:
            self.replayer.push()
        except AccessRefused as exc:
            if self.replayer.run_id is not None:
                self._warn(exc)  # the run is on the server: go on as mid-run
            else:  # nothing of this run reached the server: do not train at all
                self._undo_start(resumed=opened is not None, made=made)
                raise UserError(exc.sentence) from None
        except NotSent as exc:
            self._warn(exc)
        except UserError:  # e.g. a deleted experiment: the user must act first
            if self.replayer.run_id is None:
                self._undo_start(resumed=opened is not None, made=made)
            raise
        if self.config.tracking.system_metrics:
            try:
                self._monitor = _system_monitor(
                    self._log_system, float(os.environ.get(
                        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")),
                    self._next_system_step(), self.uri)
                self._monitor.start()
            except Exception as exc:  # psutil missing, odd platform: not worth failing for
                log.warning("system metrics are off: %s", exc)
                self._monitor = None
        self._thread = threading.Thread(target=self._background, name="tinytale-mlflow",
                                        daemon=True)
        self._thread.start()
        if self.run_url():
            print(f"mlflow run: {self.run_url()}", file=sys.stderr, flush=True)
        return self.run_id

    def run_url(self) -> str | None:
        """The run's charts in the MLflow UI (servers only; None before the run exists)."""
        if self.replayer is None:
            return None
        return run_url(self.uri, self.replayer.experiment_id, self.replayer.run_id)

    def _undo_start(self, resumed: bool, made: list[Path]) -> None:
        """Leave the disk as start() found it, so that a later run is not confused by this one.

        A resumed run's spool keeps its records; the status it had is logged again after the
        `reopen`, so a later sync does not leave the run RUNNING.
        """
        spool, self.spool = self.spool, None  # finish() then has nothing to do
        if resumed:
            ends = [r for r in spool.records if r.get("op") == "end"]
            if ends:
                spool.append({"op": "end", "status": ends[-1]["status"], "ts": _now_ms()})
            spool.close()
            return
        spool.close()
        spool.path.unlink(missing_ok=True)
        for folder in made:  # deepest first; only the folders Spool created, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _restore_progress(self) -> None:
        """Best val loss and last epoch so far, from the metrics an earlier process spooled."""
        for rec in self.spool.records:
            if rec.get("op") == "m" and "val_loss" in rec["metrics"]:
                self._note_epoch(rec["metrics"], rec["step"])

    def _next_system_step(self) -> int:
        steps = [r["step"] for r in self.spool.records
                 if r.get("op") == "m" and any(k.startswith("system/") for k in r["metrics"])]
        return max(steps) + 1 if steps else 0

    def _background(self) -> None:
        interval = flush_interval_s()
        delay = interval
        while not self._stop.wait(delay):
            try:
                self.replayer.push(include_models=False)
                delay = interval
            except AccessRefused as exc:
                self._warn(exc)
                delay = interval  # a person must act: no point in asking faster
            except NotSent as exc:
                self._warn(exc)
                delay = min(interval, 2.0)
            except Exception as exc:  # never let the logger thread die silently
                log.warning("MLflow logging error: %s", exc)
                delay = interval

    def _warn(self, exc: NotSent) -> None:
        """Once per kind (refusal, anything else): training goes on, the spool keeps all."""
        kind = "refused" if isinstance(exc, AccessRefused) else "offline"
        if kind in self._warned:
            return
        self._warned.add(kind)
        if isinstance(exc, AccessRefused):
            print(f"warning: {exc.what}; training goes on and every record stays in "
                  f"{self.spool.path}, unsent until that is fixed: {exc.fix}, then run "
                  f"`tinytale sync {self.spool.path.parent}`.", file=sys.stderr, flush=True)
        else:
            print(f"warning: cannot log to MLflow at {self.uri} ({str(exc)[:200]}); training "
                  f"goes on and everything is kept in {self.spool.path}, to be sent when the "
                  "server is back (or by `tinytale sync`).", file=sys.stderr, flush=True)

    # -- the loop's calls: append only ------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        start = time.perf_counter()
        self.spool.append({"op": "m", "step": int(step), "ts": _now_ms(),
                           "metrics": {k: float(v) for k, v in metrics.items()}})
        if "val_loss" in metrics:
            self._note_epoch(metrics, step)
        self._loop_s += time.perf_counter() - start

    def _note_epoch(self, metrics: dict[str, float], step: int) -> None:
        self._last_epoch = max(self._last_epoch, int(step))
        val = float(metrics["val_loss"])
        if math.isfinite(val) and val < self._best[0]:
            self._best = (val, int(step))

    def _log_system(self, metrics: dict[str, float], step: int) -> None:
        if self.spool is not None:
            self.spool.append({"op": "m", "step": int(step), "ts": _now_ms(),
                               "metrics": {k: float(v) for k, v in metrics.items()}})

    def on_event(self, name: str, detail: dict[str, Any]) -> None:
        tags = {f"tinytale.event.{name}": json.dumps(detail, default=str)}
        if name == "nonfinite":
            self._nonfinite += 1
            tags["tinytale.nonfinite_steps"] = str(self._nonfinite)
        if name == "diverged":  # filter with tags.`tinytale.diverged` = "true"
            tags["tinytale.diverged"] = "true"
        start = time.perf_counter()
        self.spool.append({"op": "tags", "tags": tags})
        self._loop_s += time.perf_counter() - start

    def costs(self) -> dict[str, float]:
        """What tracking has cost the run so far: the loop's time in our calls, and the CPU
        time of the sender and system-metrics threads (Linux and macOS; absent elsewhere).
        Their sum bounds what tracking can take from training, noise or not."""
        # To the microsecond: a tiny run spends ~1e-4 s here, which 4 decimals could round to 0.
        out = {"tracking_loop_s": round(self._loop_s, 6)}
        threads = [self._thread, getattr(self._monitor, "_process", None)]
        try:
            cpu = sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident))
                      for t in threads if t is not None and t.is_alive() and t.ident)
        except (AttributeError, OSError):  # no per-thread clocks on this platform
            return out
        out["tracking_threads_cpu_s"] = round(cpu, 6)
        return out

    def log_text(self, name: str, text: str) -> None:
        self.spool.append({"op": "text", "name": name, "text": text})

    def log_samples(self, epoch: int, rows: list[dict[str, Any]]) -> None:
        start = time.perf_counter()
        self.spool.append({"op": "samples", "epoch": int(epoch), "rows": rows})
        self._loop_s += time.perf_counter() - start

    # -- the end -----------------------------------------------------------------------------

    def publish_model(self, model_file: Path, summary: RunSummary,
                      example_prompt: str = "") -> Registration:
        tracking = self.config.tracking
        safe_summary = {k: v for k, v in summary.to_json().items()
                        if isinstance(v, str | int | float | bool | type(None))}
        safe_summary["config_hash"] = self.config.hash()
        safe_summary["experiment"] = tracking.experiment
        if summary.best_val_loss is not None:
            self._best = (float(summary.best_val_loss), int(summary.best_epoch or 0))
        rec = self.spool.append({
            "op": "model", "checkpoint": str(Path(model_file).resolve()), "model_file": True,
            "example_prompt": example_prompt,
            "summary": safe_summary, "register": bool(tracking.register),
            "registered_model": tracking.registered_model, "local_id": self.local_id,
            "export_hf": bool(tracking.export_hf),
        })
        t0 = time.perf_counter()
        try:
            self.replayer.push()
        except NotSent as exc:
            self._warn(exc)
        if self.replayer.acked >= rec["seq"] and self.replayer.registered:
            return Registration.from_record(self.replayer.registered,
                                            seconds=round(time.perf_counter() - t0, 3))
        self._pending_model = rec["seq"]
        return Registration(model=tracking.registered_model if tracking.register else None,
                            pending_spool=str(self.spool.path))

    def finish(self, status: str) -> Closed:
        """Sends what is left, waiting up to finish_wait_s() for an unreachable server.

        Returns the run id and its link, and the registration when it completed only here
        (the server came back while this waited), so the summary does not call a registered
        model pending."""
        if self.spool is None:
            return Closed()
        if self._monitor is not None:
            self._monitor.finish()
        # The run's summary numbers are tags, not metrics: as metrics the UI drew each as a
        # one-point chart, listed before the per-epoch curves a user opens the run for.
        best, best_epoch = self._best
        summary = {summary_tag("epochs"): str(self._last_epoch)}
        if math.isfinite(best):
            summary.update({summary_tag("best_val_loss"): repr(best),
                            summary_tag("best_epoch"): str(best_epoch)})
        self.spool.append({"op": "tags", "tags": summary})
        self.spool.append({"op": "end", "status": status, "ts": _now_ms()})
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + finish_wait_s()
        why = "unreachable"
        while True:
            try:
                if self.replayer.push():
                    break
            except AccessRefused as exc:  # waiting will not help: say what to do, and stop here
                print(f"warning: {exc.what}; {len(self.replayer.pending())} records of this "
                      f"run wait in {self.spool.path}, unsent; {exc.fix}, then send them with "
                      f"`tinytale sync {self.spool.path.parent}`.", file=sys.stderr,
                      flush=True)
                break
            except NotSent as exc:
                self._warn(exc)
                why = str(exc)
            except Exception as exc:  # the run is over: keep the spool, never crash here
                print(f"warning: MLflow logging failed ({str(exc)[:300]}); the spool "
                      f"{self.spool.path} keeps everything for `tinytale sync`.",
                      file=sys.stderr, flush=True)
                break
            if time.monotonic() >= deadline:
                print(f"warning: MLflow at {self.uri} has not taken the last "
                      f"{len(self.replayer.pending())} spooled records ({why[:200]}); they "
                      f"wait in {self.spool.path}; send them with `tinytale sync "
                      f"{self.spool.path.parent}`.", file=sys.stderr, flush=True)
                break
            time.sleep(1.0)
        self.spool.close()
        if self._tmpdir and not self.replayer.pending():
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        closed = Closed(run_id=self.replayer.run_id, run_url=self.run_url(),
                        tracking_uri=self.uri)
        seq = self._pending_model
        if seq is not None and self.replayer.acked >= seq and self.replayer.registered:
            closed.registration = Registration.from_record(self.replayer.registered)
        return closed



def _now_ms() -> int:
    return int(time.time() * 1000)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"
