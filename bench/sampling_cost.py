"""What the per-epoch samples cost: the lesson with tracking.sample_every_epochs=0 vs the
default, side by side in one run, interleaved repetitions.

Each repetition trains the experiment (default: the built-in lesson, 30 epochs) twice as
separate `tinytale train --no-tracking --json` processes, in alternating order, so slow
phases of a shared machine hit both alike:

  no samples   --set tracking.sample_every_epochs=0
  samples      the experiment's own setting (the lesson: epoch 1 and every 5th)

Two figures per repetition:

* cost: the sampler's own time (`sampling_s` in the summary: generating every sample, in
  the same process, between epochs) as a share of the run's `train_time_s`. Sampling runs
  outside the epochs' timers, so this is what it adds, measured without noise from the
  other run.
* wall ratio: process wall time with samples / without, which includes the noise of a
  shared machine.

Without tracking the samples reach only the console; with tracking the MLflow tracker adds
one spool line per sampling epoch (its cost is in bench/tracking_overhead.py's figures).

    .venv/bin/python bench/sampling_cost.py --reps 5 --set train.num_threads=1

Pin torch to one thread on a shared machine (see bench/tracking_overhead.py). Prints the
CPU model, a table and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
VARIANTS = {"no samples": ["--set", "tracking.sample_every_epochs=0"], "samples": []}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name")), "unknown CPU")


def train_once(variant: str, out: Path, config: str | None, sets: list[str]) -> dict:
    cmd = [str(BIN / "tinytale"), "train", *([config] if config else []), "--json",
           "--no-tracking", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    cmd += VARIANTS[variant]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sample @ epoch")]
    return {"train_time_s": summary["train_time_s"], "sampling_s": summary["sampling_s"],
            "wall_s": round(wall, 3), "sample_lines": len(lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="experiment YAML (default: the lesson)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="config override for every run, e.g. train.num_threads=1")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="tinytale-bench-samples-") as tmp:
        for rep in range(args.reps):
            order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                runs[variant].append(train_once(variant, Path(tmp) / f"{rep}-{variant}",
                                                args.config, args.sets))
    sampled = runs["samples"]
    cost = [r["sampling_s"] / r["train_time_s"] for r in sampled]
    wall_ratio = [s["wall_s"] / n["wall_s"] for s, n in zip(sampled, runs["no samples"],
                                                            strict=True)]
    result = {
        "cpu": cpu_model(),
        "reps": args.reps,
        "config": args.config or "lesson",
        "sets": args.sets,
        "sampling_epochs": sampled[0]["sample_lines"],
        "median_sampling_s": round(statistics.median(r["sampling_s"] for r in sampled), 4),
        "median_train_time_s": round(statistics.median(r["train_time_s"] for r in sampled), 3),
        "median_cost_share": round(statistics.median(cost), 4),
        "max_cost_share": round(max(cost), 4),
        "median_wall_ratio": round(statistics.median(wall_ratio), 3),
        "runs": runs,
    }
    print(f"CPU: {result['cpu']}; {args.reps} interleaved repetitions of "
          f"{result['config']} {' '.join(args.sets)}")
    print(f"{'variant':<11} {'train_time_s':>12} {'sampling_s':>10} {'wall_s':>7}")
    for variant, rs in runs.items():
        print(f"{variant:<11} {statistics.median(r['train_time_s'] for r in rs):>12.3f} "
              f"{statistics.median(r['sampling_s'] for r in rs):>10.4f} "
              f"{statistics.median(r['wall_s'] for r in rs):>7.2f}")
    print(f"samples at {result['sampling_epochs']} epochs cost "
          f"{100 * result['median_cost_share']:.2f}% of train_time_s (median; max "
          f"{100 * result['max_cost_share']:.2f}%); wall time with / without samples "
          f"x{result['median_wall_ratio']:.3f} (median)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
