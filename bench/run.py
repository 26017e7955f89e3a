"""One entry point for tinytale's benchmarks: prints a table and writes bench/results.json.

Every figure is a median of repeated runs or a ratio of two things measured side by side in
this one invocation, because shared machines are noisy. Sections (default: all but docker and gpu):

  lesson       `tinytale train` on the lesson: whole-process wall time, tokens/s, peak RSS,
               time to validation loss 0.5
  baby-gpt     char-level 4x4x128 model, block 64, batch 12: tokens/s, peak RSS, time to
               validation loss 2.3
  cpu-speed    fit() vs a straightforward eager loop, tokens/s ratio (bench/cpu_speed.py)
  tracking     tracked vs untracked train_time_s (bench/tracking_overhead.py)
  compare      `tinytale compare` on 50 runs x 100 epochs (bench/compare_runs.py)
  data-scale   tokens/s for 1 -> 100 MB corpora (bench/data_scale.py; --big adds 1 GB)
  docker       `docker compose up` from images built to registered model (needs an engine)
  tracking-load  the stack's server under 1, 4, 16 concurrent trainers, SQLite vs PostgreSQL:
               metrics/s, batch latency, spool backlog, lost/duplicated (bench/tracking_load.py;
               needs an engine and the built images)
  gpu          GPT-2-small-sized model (experiments/gpt2_small.yaml) on one CUDA device:
               tokens/s and MFU, torch.compile vs eager (needs a GPU)
  precision    bf16 autocast and torch.compile vs the plain eager fp32 loop, 128 and 384
               wide, compile time apart; fp32 vs bf16 loss curves (bench/precision.py)
  dropout      what dropout 0.1 costs a training step with and without attention-weight
               dropout, 128 and 384 wide (bench/dropout_cost.py)
  startup      whole `tinytale train` process for the lesson, tracked into a fresh embedded
               store (first run) and into the same store again (later runs), and untracked
  time-to-quality  baby GPT, tinytale vs the plain eager loop: validation loss against wall
               time (bench/time_to_quality.py; plot in docs/images/time-to-quality.png)

    python bench/run.py                      # all but docker, a few minutes
    python bench/run.py lesson cpu-speed     # some sections
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable


def run_child(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a command; return it, its wall seconds and its peak RSS in MB (own process tree)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:]); "
               "print(time.perf_counter() - t, "
               "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(p.returncode)")
    proc = subprocess.run([PY, "-c", wrapper, *cmd], capture_output=True, text=True, **kw)
    wall, rss_kb = proc.stderr.strip().splitlines()[-1].split()
    return proc, float(wall), int(rss_kb) / 1024


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in output:\n{text[-2000:]}")


def time_to_target(run_dir: str, target: float) -> float | None:
    import torch

    state = torch.load(Path(run_dir) / "last.pt", weights_only=True)
    elapsed = 0.0
    for epoch in state["train_state"]["history"]:
        elapsed += epoch["epoch_time_s"]
        if epoch["val_loss"] <= target:
            return round(elapsed, 2)
    return None


def train_bench(name: str, args: list[str], target: float, repeats: int) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            proc, wall, rss = run_child(
                [PY, "-m", "tinytale", "train", *args, "--no-tracking", "--json", "--out", tmp],
                cwd=tmp)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            summary = last_json(proc.stdout)
            rows.append((wall, summary["tokens_per_sec"], summary["train_time_s"], rss,
                         time_to_target(summary["run_dir"], target),
                         summary["final_train_loss"], summary["best_val_loss"]))
    med = lambda i: statistics.median(r[i] for r in rows)  # noqa: E731
    targets = [r[4] for r in rows if r[4] is not None]
    return {
        "section": name, "repeats": repeats,
        "process_wall_s": round(med(0), 2), "tokens_per_sec": round(med(1)),
        "train_time_s": round(med(2), 2), "peak_rss_mb": round(med(3)),
        f"time_to_val_{target}_s": statistics.median(targets) if targets else None,
        "final_train_loss": round(med(5), 4), "best_val_loss": round(med(6), 4),
    }


def script_bench(name: str, script: str, extra: list[str]) -> dict:
    proc = subprocess.run([PY, str(HERE / script), *extra], capture_output=True, text=True,
                          cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{proc.stderr[-2000:]}")
    print(proc.stdout, file=sys.stderr)
    return {"section": name, **last_json(proc.stdout)}


def docker_bench(repeats: int) -> dict:
    """`docker compose up` with images already built, to a registered model version.

    Each repetition starts from nothing (`down -v` after it), so each is a first `up`.
    """
    project, port = "tinytale-bench", "5099"
    env = {**os.environ, "TINYTALE_MLFLOW_PORT": port}
    compose = ["docker", "compose", "-p", project]
    subprocess.run([*compose, "build"], cwd=REPO, env=env, check=True, capture_output=True)
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/get?name=tinytale"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            subprocess.run([*compose, "up", "-d"], cwd=REPO, env=env, check=True,
                           capture_output=True)
            while True:
                if time.perf_counter() - start > 600:
                    raise RuntimeError("no registered model version within 600 s of `up`")
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        if json.load(r).get("registered_model", {}).get("latest_versions"):
                            break
                except OSError:
                    pass
                time.sleep(1)
            times.append(time.perf_counter() - start)
        finally:
            subprocess.run([*compose, "down", "-v"], cwd=REPO, env=env, capture_output=True)
    return {"section": "docker", "repeats": repeats,
            "compose_up_to_registered_s": round(statistics.median(times), 1),
            "all_s": [round(t, 1) for t in times]}


def gpu_bench(repeats: int) -> dict:
    """GPT-2-small-sized training on one CUDA device: tokens/s and MFU, compiled vs eager.

    Figures are from the last epoch of each run (the first one includes compiling); the
    two variants alternate so drift hits both.
    """
    probe = subprocess.run([PY, "-c", "import torch; print(torch.cuda.is_available() and "
                            "torch.cuda.get_device_name(0))"], capture_output=True, text=True)
    device = probe.stdout.strip()
    if probe.returncode != 0 or device in ("", "False"):
        raise RuntimeError("no CUDA device visible; the gpu section needs one")
    import torch  # the checkpoint holds the per-epoch history

    config = str(REPO / "experiments/gpt2_small.yaml")
    variants = {"compiled": [], "eager": ["--set", "train.compile=false"]}
    rows: dict[str, list[tuple[float, float | None]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            order = list(variants) if i % 2 == 0 else list(reversed(variants))
            for name in order:
                proc, _, _ = run_child(
                    [PY, "-m", "tinytale", "train", config, "--no-tracking", "--json",
                     "--out", tmp, "--set", "train.epochs=2", *variants[name]], cwd=tmp)
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-2000:])
                run_dir = Path(last_json(proc.stdout)["run_dir"])
                last = torch.load(run_dir / "last.pt", weights_only=True)
                epoch = last["train_state"]["history"][-1]
                rows[name].append((epoch["tokens_per_sec"], epoch.get("mfu")))
    out: dict = {"section": "gpu", "device": device, "repeats": repeats}
    for name, values in rows.items():
        out[f"{name}_tokens_per_sec"] = round(statistics.median(v[0] for v in values))
        mfus = [v[1] for v in values if v[1] is not None]
        out[f"{name}_mfu"] = round(statistics.median(mfus), 4) if mfus else None
    out["compile_speedup"] = round(out["compiled_tokens_per_sec"] / out["eager_tokens_per_sec"],
                                   3)
    return out


def startup_bench(repeats: int) -> dict:
    """The lesson as a user types it: `tinytale train`, whole process, medians of rounds.

    Each round trains into a new folder (a first run: the embedded store is created), then
    again into it (a later run), then untracked; the three alternate so drift hits each.
    """
    times: dict[str, list[float]] = {"first_run": [], "later_run": [], "no_tracking": []}
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            folder = Path(tmp) / f"round{i}"
            folder.mkdir()
            order = ["first_run", "later_run", "no_tracking"]
            if i % 2:  # later_run needs the store first_run made: only no_tracking moves
                order = ["no_tracking", "first_run", "later_run"]
            for name in order:
                extra = ["--no-tracking"] if name == "no_tracking" else []
                proc, wall, _ = run_child([PY, "-m", "tinytale", "train", "--json", *extra,
                                           "--out", "runs"], cwd=folder, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-2000:])
                times[name].append(wall)
    return {"section": "startup", "repeats": repeats,
            **{f"{k}_s": round(statistics.median(v), 2) for k, v in times.items()},
            **{f"{k}_all_s": [round(t, 2) for t in v] for k, v in times.items()}}


def goals(results: list[dict]) -> list[str]:
    """Issue 16's goals against this invocation's figures: one line each, met or not."""
    by = {r["section"]: r for r in results if "error" not in r}
    lines = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for s in by.get("precision", {}).get("speed", []):
        native = by["precision"].get("native_bf16")
        want = 1.5 if native and s["auto_picks"] == "bf16" else 1.0
        lines.append(f"{s['setting']}: fit() as shipped x{s['fit-auto_ratio']:.2f} of the eager "
                     f"fp32 loop ({s['auto_picks']}), compiled x{s['fit-compiled_ratio']:.2f} "
                     f"after {s['compile_s']} s; goal >= {want}x as shipped: "
                     f"{verdict(s['fit-auto_ratio'] >= want)}")
    if "startup" in by:
        r = by["startup"]
        lines.append(f"lesson, whole process: first run {r['first_run_s']} s, later runs "
                     f"{r['later_run_s']} s, untracked {r['no_tracking_s']} s; goal <= 5 s: "
                     f"{verdict(max(r['first_run_s'], r['later_run_s']) <= 5)}")
    if "time-to-quality" in by:
        runs = by["time-to-quality"]["runs"]
        ours, loop = runs["tinytale"]["time_to_loop_final_s"], runs["loop"]["time_to_loop_final_s"]
        lines.append(f"time to the loop's final val loss "
                     f"{by['time-to-quality']['loop_final_val_loss']}: tinytale "
                     f"{ours if ours is not None else 'never'} s, loop {loop} s; goal sooner: "
                     f"{verdict(ours is not None and ours < loop)}")
    return lines


def previous_results(path: Path) -> list[dict]:
    """The figures already in the results file (each with its date), or none."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    date = None
    if isinstance(old, dict):  # {"measured": {"date": ...}, "results": [...]}
        date = (old.get("measured") or {}).get("date")
        old = old.get("results", [])
    if not isinstance(old, list):
        return []
    return [{"measured_on": date, **r} if date and "measured_on" not in r else r
            for r in old if isinstance(r, dict) and "section" in r]


def main() -> None:
    sections = ["lesson", "baby-gpt", "cpu-speed", "tracking", "compare", "data-scale", "docker",
                "gpu"]
    sections.append("tracking-load")  # needs Docker, like `docker`: not a default section
    sections += ["precision", "dropout", "startup", "time-to-quality"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", metavar="SECTION",
                        help=f"some of: {', '.join(sections)} (default: all but docker and gpu)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big", action="store_true", help="data-scale up to 1 GB")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    unknown = set(args.only) - set(sections)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; pick from {sections}")
    chosen = args.only or [s for s in sections if s not in ("docker", "gpu", "tracking-load")]
    results: list[dict] = []
    for section in chosen:
        print(f"== {section}", file=sys.stderr)
        try:
            result = run_section(section, args)
        except Exception as exc:  # one broken section must not lose the others' figures
            result = {"section": section, "error": str(exc)[-500:]}
        results.append({**result, "measured_on": time.strftime("%Y-%m-%d")})
    # Sections not run this time, or that failed this time, keep their last figures.
    fresh = {r["section"] for r in results if "error" not in r}
    previous = previous_results(args.out)
    had = {r["section"] for r in previous}
    kept = [r for r in previous if r["section"] not in fresh]
    results_to_write = [r for r in results if "error" not in r or r["section"] not in had]
    # In section order; an extra section kept from by-hand runs ("data-scale-1gb") by its stem.
    merged = sorted(kept + results_to_write, key=lambda r: next(
        (i for i, name in enumerate(sections) if r["section"].startswith(name)), len(sections)))
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
    args.out.write_text(json.dumps({"machine": machine, "results": merged}, indent=2) + "\n")
    for r in results:
        figures = ", ".join(f"{k}={v}" for k, v in r.items() if k != "section")
        print(f"{r['section']:>11}: {figures}")
    for line in goals(results):
        print(f"goal: {line}")
    print(f"written to {args.out}")


def run_section(section: str, args: argparse.Namespace) -> dict:
    if section == "lesson":
        return train_bench("lesson", [], 0.5, args.repeats)
    if section == "baby-gpt":
        return train_bench("baby-gpt", [str(REPO / "experiments/fairy_char.yaml"), "--set",
                                        "data.n_stories=60", "--set", "train.epochs=3"],
                           2.3, args.repeats)
    if section == "cpu-speed":
        return script_bench("cpu-speed", "cpu_speed.py",
                            ["--repeats", str(args.repeats), "--ablate"])
    if section == "tracking":
        # One torch thread: with two threads on two busy cores, torch's thread barrier
        # swings run times far more than tracking could.
        return script_bench("tracking", "tracking_overhead.py",
                            ["--json", "--reps", "9", "--set", "train.num_threads=1",
                             "--set", "train.epochs=100"])
    if section == "compare":
        return script_bench("compare", "compare_runs.py", [])
    if section == "data-scale":
        sizes = ["1", "10", "100"] + (["1000"] if args.big else [])
        return script_bench("data-scale", "data_scale.py", ["--sizes-mb", *sizes])
    if section == "tracking-load":
        return script_bench("tracking-load", "tracking_load.py", ["--json"])
    if section == "gpu":
        return gpu_bench(args.repeats)
    if section == "precision":
        return script_bench("precision", "precision.py", ["--repeats", str(args.repeats)])
    if section == "dropout":
        return script_bench("dropout", "dropout_cost.py", ["--repeats", str(args.repeats)])
    if section == "startup":
        return startup_bench(max(args.repeats, 5))
    if section == "time-to-quality":
        return script_bench("time-to-quality", "time_to_quality.py",
                            ["--plot", str(REPO / "docs/images/time-to-quality.png")])
    return docker_bench(args.repeats)


if __name__ == "__main__":
    main()
