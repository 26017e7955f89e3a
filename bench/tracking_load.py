"""Load on the compose stack's MLflow server: N concurrent trainers, SQLite vs PostgreSQL.

For each backend the script starts the stack's own server image (`docker compose up mlflow`
under a project of its own, published on a free loopback port; `--build` builds it first),
then for each N runs N trainer processes at once. Each trainer is tinytale's real tracker
(MlflowTracker: spool, background sender, replay) under a load generator instead of a model:
it logs STEPS steps of KEYS metrics, one step every STEP_S seconds, then finishes the run.
The only instrument is a timer around the MLflow client's `log_batch`, the call the tracker's
sender makes (one HTTP request of up to 1000 metric values).

Per backend and N it reports:
  metrics/s   metric values the server accepted per second, from the trainers' common start
              to the last run finished (the offered load, N * KEYS / STEP_S, is printed too:
              a rate below it means the server is the limit)
  p50/p95 ms  latency of one batch log call
  backlog     metric values still in the trainers' spools when their training ended (what
              finish() then had to send); 0 when the server keeps up
  lost, dup   read back from the server: each run's history of each key must hold every
              step exactly once. Checked, not assumed; the script exits 1 if any is not 0.

    eval "$(scripts/docker-offline.sh)"   # machines without a registry (CI, this project's)
    .venv/bin/python bench/tracking_load.py --build
    .venv/bin/python bench/tracking_load.py --trainers 1 4 16 --workers 4 --json

Both backends run the same image, settings and load in one invocation: both stacks are up
at once, and each repetition measures every N on one backend then the other (the order swaps
each repetition), so a slow phase of a shared machine hits both alike; the table shows the
median over repetitions (lost and duplicated: the sum). The trainers run on the same machine
as the server, over loopback: on a small machine they share its cores, which the table's CPU
line says.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The stack serves SQLite from the same volume the stacks before PostgreSQL used.
BACKENDS = {"sqlite": "sqlite:////mlflow/db/mlflow.db",
            "postgresql": "postgresql://mlflow@db:5432/mlflow"}


def cpu_model() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                   check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The compose stack's server on one backend, as `docker compose up` runs it."""

    def __init__(self, backend: str, workers: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "COMPOSE_PROJECT_NAME": f"tinytale-bench-{backend}",
                    "TINYTALE_MLFLOW_PORT": str(self.port),
                    "TINYTALE_MLFLOW_DATABASE_URI": BACKENDS[backend],
                    "TINYTALE_MLFLOW_WORKERS": str(workers)}

    def compose(self, *args: str) -> None:
        done = subprocess.run(["docker", "compose", "--project-directory", str(REPO), *args],
                              cwd=REPO, env=self.env, capture_output=True, text=True,
                              check=False, timeout=900)
        if done.returncode != 0:
            sys.exit(f"`docker compose {' '.join(args)}` failed:\n{done.stderr[-3000:]}")

    def __enter__(self) -> Stack:
        self.compose("down", "--volumes")  # a stack left by an interrupted run
        self.compose("up", "--detach", "--wait", "mlflow")
        return self

    def __exit__(self, *exc: object) -> None:
        self.compose("down", "--volumes")


def trainer(index: int, uri: str, experiment: str, args: argparse.Namespace, folder: str,
            start: Any, results: Any) -> None:
    """One trainer process: tinytale's tracker fed by a loop instead of a model."""
    from mlflow.tracking import MlflowClient

    from tinytale.config import Config
    from tinytale.mlflow_tracker.tracker import MlflowTracker
    from tinytale.tracking import RunInfo

    latencies_s: list[float] = []
    log_batch = MlflowClient.log_batch

    def timed_log_batch(self: Any, *a: Any, **kw: Any) -> Any:
        began = time.perf_counter()
        try:
            return log_batch(self, *a, **kw)
        finally:
            latencies_s.append(time.perf_counter() - began)

    MlflowClient.log_batch = timed_log_batch  # type: ignore[method-assign]
    config = Config()
    config.tracking.system_metrics = False
    tracker = MlflowTracker(config, uri)
    info = RunInfo(experiment=experiment, run_name=f"trainer-{index}",
                   params={"trainer": index}, local_dir=Path(folder) / f"trainer-{index}")
    tracker.check(info)  # the first request (experiment lookup) before the common start
    start.wait()
    tracker.start(info)
    for step in range(1, args.steps + 1):
        tracker.log_metrics({f"load_{k}": step + k / 100 for k in range(args.keys)}, step)
        time.sleep(args.step_s)
    backlog = sum(len(r["metrics"]) for r in tracker.replayer.pending() if r["op"] == "m")
    closed = tracker.finish("FINISHED")
    results.put({"run_id": closed.run_id, "backlog": backlog, "latencies_s": latencies_s,
                 "finished": time.time()})


def history_counts(url: str, run_id: str, key: str) -> tuple[int, int]:
    """(values, distinct steps) the server holds for one key of one run."""
    query = urllib.parse.urlencode({"run_id": run_id, "metric_key": key, "max_results": 100000})
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/metrics/get-history?{query}",
                                timeout=60) as response:
        metrics = json.load(response).get("metrics", [])
    return len(metrics), len({m["step"] for m in metrics})


def load(stack: Stack, n: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """One measurement: n trainers at once against the stack, then the histories checked."""
    ctx = multiprocessing.get_context("fork")  # tinytale and mlflow imported once, here
    start, results = ctx.Event(), ctx.Queue()
    folder = tempfile.mkdtemp(prefix="tinytale-load-")
    experiment = f"load-{tag}-n{n}-{time.time_ns()}"
    procs = [ctx.Process(target=trainer, args=(i, stack.url, experiment, args, folder, start,
                                               results)) for i in range(n)]
    for p in procs:
        p.start()
    time.sleep(2.0 + 0.2 * n)  # every trainer has looked the experiment up
    began = time.time()
    start.set()
    got = [results.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    shutil.rmtree(folder, ignore_errors=True)
    elapsed_s = max(r["finished"] for r in got) - began
    latencies_ms = sorted(x * 1000 for r in got for x in r["latencies_s"])
    expected = args.steps
    lost = duplicated = 0
    for r in got:
        for k in range(args.keys):
            values, steps = history_counts(stack.url, r["run_id"], f"load_{k}")
            lost += expected - steps
            duplicated += values - steps
    total = n * args.steps * args.keys
    return {
        "trainers": n, "metrics": total, "elapsed_s": round(elapsed_s, 2),
        "offered_per_s": round(n * args.keys / args.step_s),
        "accepted_per_s": round(total / elapsed_s),
        "batch_calls": len(latencies_ms),
        "p50_ms": round(statistics.median(latencies_ms), 1),
        "p95_ms": round(latencies_ms[int(0.95 * (len(latencies_ms) - 1))], 1),
        "backlog_at_end": sum(r["backlog"] for r in got),
        "lost": lost, "duplicated": duplicated,
    }


def summarise(backend: str, n: int, workers: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repetitions; lost and duplicated summed (each must stay 0)."""
    row: dict[str, Any] = {"backend": backend, "workers": workers, "trainers": n,
                           "repeats": len(runs)}
    for key in ("accepted_per_s", "offered_per_s", "p50_ms", "p95_ms", "backlog_at_end",
                "elapsed_s"):
        row[key] = round(statistics.median(r[key] for r in runs), 1)
    row["lost"] = sum(r["lost"] for r in runs)
    row["duplicated"] = sum(r["duplicated"] for r in runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trainers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--workers", type=int, default=2, help="server's uvicorn workers")
    parser.add_argument("--steps", type=int, default=600, help="logged steps per trainer")
    parser.add_argument("--keys", type=int, default=8, help="metrics per step")
    parser.add_argument("--step-s", type=float, default=0.01, help="seconds between steps")
    parser.add_argument("--flush-s", type=float, default=1.0,
                        help="the tracker's send interval (TINYTALE_TRACKING_FLUSH_S)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per backend and N")
    parser.add_argument("--build", action="store_true", help="docker compose build mlflow first")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args()
    os.environ["TINYTALE_TRACKING_FLUSH_S"] = str(args.flush_s)
    os.environ["TINYTALE_TRACKING_WAIT_S"] = "300"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import mlflow  # noqa: F401  (before the fork: each trainer starts with it loaded)

    import tinytale.mlflow_tracker.tracker  # noqa: F401

    if args.build:
        Stack("postgresql", args.workers).compose("build", "mlflow")
    measured: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stacks:
        up = {b: stacks.enter_context(Stack(b, args.workers)) for b in args.backends}
        for repetition in range(args.repeats):
            order = args.backends if repetition % 2 == 0 else args.backends[::-1]
            for n in args.trainers:
                for backend in order:
                    one = load(up[backend], n, args, backend)
                    measured.setdefault((backend, n), []).append(one)
                    print(json.dumps({"backend": backend, **one}), file=sys.stderr, flush=True)
    rows = [summarise(backend, n, args.workers, measured[(backend, n)])
            for backend in args.backends for n in args.trainers]
    cpu = cpu_model()
    print(f"tracking load, {time.strftime('%Y-%m-%d')}, {cpu} ({os.cpu_count()} CPUs), "
          f"server workers {args.workers}; each trainer {args.steps} steps x {args.keys} "
          f"metrics every {args.step_s} s, sent every {args.flush_s} s; median of "
          f"{args.repeats}")
    header = ("backend", "N", "metrics/s", "offered/s", "p50 ms", "p95 ms", "backlog", "lost",
              "dup")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['backend']} | {r['trainers']} | {r['accepted_per_s']:.0f} | "
              f"{r['offered_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
              f"{r['backlog_at_end']:.0f} | "
              f"{r['lost']} | {r['duplicated']} |")
    if args.json:
        print(json.dumps({"cpu": cpu, "workers": args.workers, "rows": rows}))
    if any(r["lost"] or r["duplicated"] for r in rows):
        sys.exit("metrics were lost or duplicated (see the table)")


if __name__ == "__main__":
    main()
