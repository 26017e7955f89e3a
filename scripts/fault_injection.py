"""Fault injection, end to end: real processes, real signals, a real MLflow server.

Each scenario trains a small run against a local `mlflow server`, breaks something on
purpose, recovers the way a user would, and then asks the server what it has. Prints, per
scenario, epochs logged / epochs expected, duplicates, and whether the model version exists.
Where a fault must land mid-run, the trainer waits at a chosen micro-batch until it has
(tests/support/holding.py): the same cut on any machine, however fast it trains.

  sigkill-resume      SIGKILL mid-epoch, then `train --resume auto`
  sigterm-resume      SIGTERM (graceful stop, exit 143), then `train --resume auto`
  server-down-start   server down when training starts; started later; `tinytale sync`
  server-restart      server stopped mid-run and started again while training goes on

    python scripts/fault_injection.py            # all scenarios, about two minutes
    python scripts/fault_injection.py sigkill-resume
Exit code: the number of scenarios that lost or duplicated something.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.holding import hold_env, release, wait_held  # noqa: E402 (the tests' folder)
from support.server import LocalServer  # noqa: E402

EPOCHS = 8
TRAIN = ["--json", "--set", "model.n_layer=1", "--set", "model.n_head=2",
         "--set", "model.n_embd=32", "--set", "model.block_size=16",
         "--set", "data.n_stories=120", "--set", "train.batch_size=8",
         "--set", "train.warmup_steps=4", "--set", f"train.epochs={EPOCHS}",
         "--set", "train.checkpoint_every_steps=3", "--set", "train.num_threads=1",
         "--set", "tracking.samples=1", "--set", "tracking.system_metrics=false"]


class Server(LocalServer):
    """The local `mlflow server`, plus a small REST client to ask it what it holds."""

    def api(self, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(
            f"{self.url}/api/2.0/mlflow/{path}", method="POST" if body else "GET",
            data=json.dumps(body).encode() if body else None,
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)


def train(out: Path, server: Server, *extra: str,
          hold: tuple[Path, int, int] | None = None) -> subprocess.Popen:
    """`tinytale train`; with `hold` (folder, epoch, micro-batch) it waits there until it is
    signalled or released (tests/support/holding.py), so a fault lands at the same step on any
    machine, however fast it trains."""
    env = {**os.environ, "TINYTALE_TRACKING_FLUSH_S": "1", "TINYTALE_TRACKING_WAIT_S": "60"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinytale", "train", *TRAIN, "--out", str(out),
         "--tracking-uri", server.url, "--experiment", "faults", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=hold_env(*hold, env) if hold else env)
    if hold:
        try:
            wait_held(hold[0], proc)
        except BaseException:
            proc.kill()
            raise
    return proc


def wait_for_epoch(out: Path, epoch: int, proc: subprocess.Popen) -> None:
    import torch

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for path in out.rglob("last.pt"):
            try:
                ts = torch.load(path, weights_only=True)["train_state"]
            except Exception:
                continue
            if ts["epoch"] >= epoch:
                return
        if proc.poll() is not None:
            raise RuntimeError(f"training ended early: {proc.stderr.read()[-1000:]}")
        time.sleep(0.05)
    raise RuntimeError("training did not get there in time")


def report(name: str, server: Server) -> dict:
    exp = server.api("experiments/get-by-name?experiment_name=faults")["experiment"]
    runs = server.api("runs/search", {"experiment_ids": [exp["experiment_id"]]}).get("runs", [])
    run = runs[0]
    history = server.api(f"metrics/get-history?run_id={run['info']['run_id']}"
                         "&metric_key=val_loss").get("metrics", [])
    steps = [m["step"] for m in history]
    versions = server.api("model-versions/search?"
                          + urllib.parse.urlencode({"filter": "name='tinytale'"}))
    has_version = any(v.get("run_id") == run["info"]["run_id"]
                      for v in versions.get("model_versions", []))
    return {"scenario": name, "runs": len(runs), "status": run["info"]["status"],
            "epochs_logged": len(set(steps)), "epochs_expected": EPOCHS,
            "duplicates": len(steps) - len(set(steps)), "model_version": has_version}


def sigkill_resume(root: Path, server: Server, sig: int = signal.SIGKILL) -> None:
    out = root / "runs"
    # Mid-epoch: held before the step of micro-batch 4 of epoch 3, after a checkpoint (one
    # of every 3 steps) earlier in that epoch.
    proc = train(out, server, hold=(root / "hold", 3, 4))
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 143
    assert proc.returncode == expected, proc.returncode
    done = train(out, server, "--resume", "auto")
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-2000:]


def sigterm_resume(root: Path, server: Server) -> None:
    sigkill_resume(root, server, signal.SIGTERM)


def server_down_start(root: Path, server: Server) -> None:
    out = root / "runs"
    server.stop()
    proc = train(out, server)
    _, err = proc.communicate(timeout=300)  # finishes offline; the spool keeps everything
    assert proc.returncode == 0, err[-2000:]
    server.start()
    run_dir = next(out.rglob("mlflow_spool.jsonl")).parent
    sync = subprocess.run([sys.executable, "-m", "tinytale", "sync", str(run_dir),
                           "--tracking-uri", server.url], capture_output=True, text=True,
                          timeout=300)
    assert sync.returncode == 0, sync.stderr[-2000:]


def server_restart(root: Path, server: Server) -> None:
    out, hold = root / "runs", root / "hold"
    proc = train(out, server, hold=(hold, 2, 1))  # epoch 1 done, 7 to go
    server.stop()
    release(hold)
    wait_for_epoch(out, 5, proc)
    server.start()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]


SCENARIOS = {"sigkill-resume": sigkill_resume, "sigterm-resume": sigterm_resume,
             "server-down-start": server_down_start, "server-restart": server_restart}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"some of: {', '.join(SCENARIOS)} (default: all)")
    args = parser.parse_args()
    if set(args.scenarios) - set(SCENARIOS):
        parser.error(f"scenarios are: {', '.join(SCENARIOS)}")
    rows, bad = [], 0
    for name in args.scenarios or SCENARIOS:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            server = Server(root)
            server.start()
            try:
                SCENARIOS[name](root, server)
                row = report(name, server)
            except Exception as exc:  # a scenario that breaks is a finding, not a crash
                row = {"scenario": name, "error": str(exc).splitlines()[0][:200]}
            finally:
                server.stop()
        ok = ("error" not in row and row["runs"] == 1 and row["duplicates"] == 0
              and row["epochs_logged"] == EPOCHS and row["model_version"])
        bad += not ok
        rows.append({**row, "ok": ok})
        if "error" in row:
            print(f"{name:>18}: FAILED ({row['error']})")
        else:
            print(f"{name:>18}: epochs {row['epochs_logged']}/{row['epochs_expected']}, "
                  f"duplicates {row['duplicates']}, runs {row['runs']} ({row['status']}), "
                  f"model version {'yes' if row['model_version'] else 'NO'}"
                  f"{'' if ok else '  <- LOST SOMETHING'}")
    print(json.dumps(rows))
    return bad


if __name__ == "__main__":
    sys.exit(main())
