"""Benchmark: `tinytale compare` on 50 runs x 100 epochs against a local MLflow server.

    .venv/bin/python bench/compare_runs.py [--runs 50] [--epochs 100] [--repeat 3]

Starts `mlflow server` (SQLite backend) in a temporary folder, writes a sweep of synthetic
runs with realistic per-epoch histories (all nine epoch metrics, one log_batch per run),
then times:
  * fetching the histories three ways (bulk REST endpoint, get_metric_history on a thread
    pool, get_metric_history one call after another),
  * the whole compare in-process (find runs, fetch, analyse, plot PNG, log it to the parent),
  * `tinytale compare --sweep ... --json` as a command (Python start-up and imports included).
The goal is under 5 s for the command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.server import LocalServer  # noqa: E402 (the tests' local server)

REPO = Path(__file__).resolve().parents[1]
EPOCH_METRICS = ("train_loss", "val_loss", "train_perplexity", "val_perplexity",
                 "generalization_gap", "lr", "grad_norm", "tokens_per_sec", "epoch_time_s")


def synthetic_curve(rng: random.Random, epochs: int, onset: int) -> tuple[list, list]:
    train, val = [], []
    for e in range(1, epochs + 1):
        t = 3.0 * math.exp(-e / 15) + 0.05 + rng.gauss(0, 0.01)
        v = 3.0 * math.exp(-e / 18) + 0.7 + max(0, e - onset) * 0.004 + rng.gauss(0, 0.01)
        train.append(t)
        val.append(v)
    return train, val


def write_store(url: str, n_runs: int, epochs: int, sweep: str) -> str:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    client = MlflowClient(url)
    exp_id = client.create_experiment("bench-compare")
    parent = client.create_run(exp_id, run_name=sweep, tags={"tinytale.sweep_parent": sweep})
    def write_run(i: int) -> None:
        rng = random.Random(i)
        dropout = round(0.02 * i, 2)
        overrides = {"model.dropout": dropout}
        run = client.create_run(exp_id, run_name=f"dropout={dropout:g}", tags={
            "tinytale.sweep": sweep, "tinytale.overrides": f'{{"model.dropout": {dropout}}}',
            "mlflow.parentRunId": parent.info.run_id})
        train, val = synthetic_curve(rng, epochs, onset=30 + i)
        now = int(time.time() * 1000)
        metrics = []
        for e in range(1, epochs + 1):
            t, v = train[e - 1], val[e - 1]
            values = {"train_loss": t, "val_loss": v, "train_perplexity": math.exp(t),
                      "val_perplexity": math.exp(v), "generalization_gap": v - t,
                      "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 20000 + rng.random(),
                      "epoch_time_s": 0.1}
            metrics.extend(Metric(k, values[k], now + e, e) for k in EPOCH_METRICS)
        params = [Param(k, str(v)) for k, v in {**overrides, "model.n_layer": 4,
                                                "train.lr": 1e-3}.items()]
        client.log_batch(run.info.run_id, metrics=metrics, params=params)
        client.set_terminated(run.info.run_id, "FINISHED")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write_run, range(n_runs)))
    client.set_terminated(parent.info.run_id, "FINISHED")
    return parent.info.run_id


def timed(fn, repeat: int) -> tuple[float, object]:
    """Median wall time of `repeat` calls (the spread is printed by the callers that care)."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    timed.last = times  # type: ignore[attr-defined]
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the temporary store")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    root = Path(tempfile.mkdtemp(prefix="tinytale-bench-"))
    server = LocalServer(root).start()
    url = server.url
    try:
        t0 = time.perf_counter()
        write_store(url, args.runs, args.epochs, "bench")
        print(f"store: {args.runs} runs x {args.epochs} epochs x {len(EPOCH_METRICS)} metrics "
              f"written in {time.perf_counter() - t0:.1f}s at {url}")

        from mlflow.tracking import MlflowClient

        from tinytale import compare as cmp
        from tinytale.mlflow_tracker import reader as mr

        runs = mr.find_runs(url, sweep="bench")
        keys = cmp.metrics_needed("val_loss")
        client = MlflowClient(url)

        def bulk():
            fresh = mr.find_runs(url, sweep="bench")
            mr.fetch_histories(url, fresh, keys)
            return fresh

        def pooled():
            from concurrent.futures import ThreadPoolExecutor
            jobs = [(r.run_id, k) for r in runs for k in keys]
            with ThreadPoolExecutor(16) as pool:
                return list(pool.map(lambda j: client.get_metric_history(*j), jobs))

        def sequential():
            return [client.get_metric_history(r.run_id, k) for r in runs for k in keys]

        print(f"fetch {len(keys)} histories of {len(runs)} runs ({len(keys) * len(runs)} "
              "series):")
        figures: dict[str, object] = {"runs": args.runs, "epochs": args.epochs, "goal_s": 5.0}
        for name, key, fn in (("bulk REST (tinytale)", "fetch_bulk_s", bulk),
                              ("get_metric_history, 16 threads", "fetch_threads_s", pooled),
                              ("get_metric_history, sequential", "fetch_sequential_s",
                               sequential)):
            seconds, _ = timed(fn, args.repeat)
            figures[key] = round(seconds, 3)
            print(f"  {name:<34} {seconds:6.3f} s")

        fetched = bulk()
        assert all(len(r.histories["val_loss"]) == args.epochs for r in fetched)
        out = root / "curves.png"

        def analyse_and_plot():
            rows = cmp.summarize_all(fetched, "val_loss", 3)
            cmp.plot_curves(fetched, rows, out, "val_loss")
            return rows

        seconds, rows = timed(analyse_and_plot, args.repeat)
        figures["analyse_plot_s"] = round(seconds, 3)
        print(f"  analyse + plot PNG (in-process)   {seconds:6.3f} s "
              f"({out.stat().st_size // 1024} KiB)")

        from typer.testing import CliRunner

        from tinytale.cli import app

        def in_process():
            result = CliRunner().invoke(app, ["compare", "--sweep", "bench", "--tracking-uri",
                                              url, "--out", str(out), "--json"])
            assert result.exit_code == 0, result.output
            return result

        seconds, _ = timed(in_process, args.repeat)
        figures["in_process_s"] = round(seconds, 3)
        print(f"tinytale compare, in-process (imports warm):   {seconds:6.3f} s")

        tinytale_bin = Path(sys.executable).with_name("tinytale")
        cmd = [str(tinytale_bin), "compare", "--sweep", "bench", "--tracking-uri", url,
               "--out", str(out), "--json"]

        def command():
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
            assert done.returncode == 0, done.stderr
            return done

        seconds, done = timed(command, args.repeat)
        command_times = list(timed.last)  # type: ignore[attr-defined]
        spread = ", ".join(f"{t:.2f}" for t in command_times)
        print(f"tinytale compare, as a command (cold start):  {seconds:6.3f} s "
              f"({'OK' if seconds < 5 else 'OVER'} the 5 s goal; runs: {spread})")
        imports = subprocess.run(
            [sys.executable, "-c", "import time; t = time.perf_counter(); import tinytale.cli, "
             "mlflow.tracking, matplotlib.figure; print(time.perf_counter() - t)"],
            capture_output=True, text=True, cwd=REPO)
        print(f"  of which importing tinytale.cli + mlflow + matplotlib: "
              f"{float(imports.stdout):.2f} s")
        figures.update(command_s=round(seconds, 3), ok=seconds < 5.0,
                       command_runs_s=[round(t, 3) for t in command_times],
                       imports_s=round(float(imports.stdout), 3))
        print(f"  command: {' '.join(cmd)}")
        print(f"  figure: {out}" + ("" if args.keep else " (deleted; --keep keeps it)"))
        print(json.dumps(figures))  # last line: for bench/run.py
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
