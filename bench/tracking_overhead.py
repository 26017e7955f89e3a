"""How much MLflow tracking slows training: tracked vs --no-tracking, interleaved repetitions.

Runs the same experiment (default: the built-in lesson) as separate `tinytale train --json`
processes in three variants, in a rotating order within each repetition so slow phases of a
shared machine hit every variant alike:

  untracked     --no-tracking
  tracked       --tracking-uri <local server>
  tracked+steps --tracking-uri <local server> --set tracking.log_every_steps=10

and compares `train_time_s` from the JSON summary (all epochs: training, validation and
per-epoch logging). The tracker sends in the background every 5 s (TINYTALE_TRACKING_FLUSH_S,
--flush-s), so the runs must train for well over 5 s for the sends to overlap training:
bench/run.py uses the lesson with 100 epochs (~13 s of training). The one-off model
logging + registration at the end is outside train_time_s and reported on its own
(`registration_time_s`), as is process wall time.

Where wall-time ratios drown in a shared machine's noise, the `cost` column still measures:
the time the training loop spent inside tracker calls plus the CPU time of the tracker's
threads (sender, system metrics), from each run's summary, as a share of `train_time_s`.
Tracking cannot take more than that from training, even if every cycle were serialised.

    .venv/bin/python bench/tracking_overhead.py --reps 7 --set train.num_threads=1 \
        --set train.epochs=100
    .venv/bin/python bench/tracking_overhead.py --server http://127.0.0.1:5000 --set train.epochs=10

On a machine shared with other jobs, pin torch to one thread (`--set train.num_threads=1`):
with two threads on two busy cores, torch's thread barrier makes the same run take anywhere
from 3 s to 75 s, which drowns any tracking cost; one thread keeps repetitions within ~3%.

Starts its own `mlflow server` (SQLite backend, served artifacts, in a temp folder) on a
free loopback port unless --server is given. Prints a table and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.server import LocalServer  # noqa: E402 (the tests' local server)

BIN = Path(sys.executable).parent
VARIANTS = {
    "untracked": ["--no-tracking"],
    "tracked": [],
    "tracked+steps": ["--set", "tracking.log_every_steps=10"],
}


def train_once(variant: str, url: str, out: Path, config: str | None,
               sets: list[str], flush_s: float | None) -> dict:
    cmd = [str(BIN / "tinytale"), "train", *([config] if config else []), "--json",
           "--out", str(out), "--tracking-uri", url, "--experiment", "bench-overhead",
           "--set", "tracking.registered_model=bench-overhead"]
    for s in sets:
        cmd += ["--set", s]
    cmd += VARIANTS[variant]
    t0 = time.perf_counter()
    env = dict(os.environ)
    if flush_s is not None:
        env["TINYTALE_TRACKING_FLUSH_S"] = str(flush_s)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    spent = [summary[k] for k in ("tracking_loop_s", "tracking_threads_cpu_s") if k in summary]
    return {"train_time_s": summary["train_time_s"], "wall_s": round(wall, 3),
            "registration_time_s": summary.get("registration_time_s"),
            # What tracking itself spent while training: the loop's time in tracker calls
            # plus the CPU time of its threads. It bounds the overhead whatever the noise.
            "tracking_cost_s": sum(spent) if spent else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", help="experiment YAML (default: built-in lesson)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each variant")
    ap.add_argument("--server", help="use this MLflow server instead of starting one")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="extra config override for every run (repeatable)")
    ap.add_argument("--flush-s", type=float, default=None,
                    help="seconds between the tracker's background sends (default: the "
                         "shipped 5 s; train long enough that several sends overlap training)")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tinytale-overhead-"))
    server = None
    url = args.server
    if url is None:
        server = LocalServer(work).start()
        url = server.url
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    try:
        # One warm-up of each (page cache, first experiment creation), not counted.
        for v in names:
            train_once(v, url, work / "runs", args.config, args.sets, args.flush_s)
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for v in order:
                r = train_once(v, url, work / "runs", args.config, args.sets, args.flush_s)
                results[v].append(r)
                print(f"rep {rep + 1}/{args.reps} {v:<14} train_time_s={r['train_time_s']:.3f}"
                      f" wall_s={r['wall_s']:.2f}"
                      + (f" registration_s={r['registration_time_s']:.2f}"
                         if r["registration_time_s"] is not None else ""),
                      file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    base = [r["train_time_s"] for r in results["untracked"]]
    report: dict[str, dict] = {}
    for v in names:
        times = [r["train_time_s"] for r in results[v]]
        paired = [t / b for t, b in zip(times, base, strict=True)]
        regs = [r["registration_time_s"] for r in results[v] if r["registration_time_s"]]
        report[v] = {
            "median_train_time_s": statistics.median(times),
            "ratio_of_medians": statistics.median(times) / statistics.median(base),
            "median_paired_ratio": statistics.median(paired),
            "median_wall_s": statistics.median(r["wall_s"] for r in results[v]),
            "median_registration_s": statistics.median(regs) if regs else None,
            "median_tracking_cost_fraction": (statistics.median(
                r["tracking_cost_s"] / r["train_time_s"] for r in results[v])
                if all(r["tracking_cost_s"] is not None for r in results[v]) else None),
            "train_time_s": times,
        }
    print(f"{'variant':<14} {'train_s':>8} {'ratio':>7} {'paired':>7} {'wall_s':>7} "
          f"{'register_s':>10} {'cost':>7}")
    for v, r in report.items():
        reg = "" if r["median_registration_s"] is None else f"{r['median_registration_s']:.2f}"
        cost = ("" if r["median_tracking_cost_fraction"] is None
                else f"{100 * r['median_tracking_cost_fraction']:.2f}%")
        print(f"{v:<14} {r['median_train_time_s']:>8.3f} {r['ratio_of_medians']:>7.3f} "
              f"{r['median_paired_ratio']:>7.3f} {r['median_wall_s']:>7.2f} {reg:>10} "
              f"{cost:>7}")
    print(f"({args.reps} interleaved repetitions; ratio = median tracked / median untracked "
          "train_time_s; paired = median of per-repetition ratios; cost = the loop's time in "
          "tracker calls + the tracking threads' CPU time, as a share of train_time_s)")
    if args.json:
        print(json.dumps({"reps": args.reps, "server": args.server or "local",
                          "flush_s": args.flush_s, **report}))


if __name__ == "__main__":
    main()
