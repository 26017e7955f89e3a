"""Time to quality: validation loss against wall time, tinytale vs the plain eager loop.

Both train the baby GPT (4 layers, 4 heads, 128 wide, block 64, batch 12, characters of the
built-in fairy corpus) with the hyperparameters minimal GPT trainers publish for this CPU
setting: lr 1e-3 cosine to 1e-4 after 100 warmup steps, AdamW beta2 0.99, weight decay 0.1,
grad clip 1.0, dropout 0; both see the same training stories and are scored on the same
held-out stories (tinytale's story split, every non-overlapping window).

  loop        the plain eager loop (this file, `--loop`): 2,000 steps of random windows,
              validated every 250 steps, one process
  tinytale    `tinytale train experiments/fairy_char.yaml` as shipped, tracking on into a
              fresh embedded MLflow store

Each is its own process, all started at once (one torch thread each), so that whatever
else loads the machine slows them alike; this script stamps every validation line as it
arrives on a child's stderr, so the wall times include start-up, imports, validation,
checkpoints and, for tinytale, tracking and registering the model.
Variants: `--set KEY=VALUE` adds a tinytale run with that override (e.g. data.stride=64),
its epochs set for about 2,000 steps.

    python bench/time_to_quality.py --threads 1 --plot docs/images/time-to-quality.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tinytale.config import load_config  # noqa: E402 (after the path)

CONFIG = REPO / "experiments/fairy_char.yaml"
TARGET_STEPS = 2000
LOOP_EVAL_EVERY = 250
ROW = re.compile(r"^\s*(\d+)\s+([0-9.]+)\s+([0-9.]+)\s")  # epoch, train, val (console table)


def stamped_rows(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[list[dict], float, str]:
    """Run `cmd`; each epoch row of its stderr stamped with seconds since launch."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, cwd=cwd)
    rows, tail = [], []
    for line in proc.stderr:
        match = ROW.match(line)
        if match:
            rows.append({"epoch": int(match[1]), "val_loss": float(match[3]),
                         "wall_s": round(time.perf_counter() - start, 2)})
        tail = (tail + [line])[-20:]
    stdout = proc.stdout.read()
    if proc.wait() != 0:
        raise RuntimeError(f"{cmd} failed:\n{''.join(tail)}")
    return rows, round(time.perf_counter() - start, 2), stdout


def plan(overrides: list[str]) -> tuple[int, int]:
    """(epochs, steps an epoch) of fairy_char.yaml with `overrides` for ~TARGET_STEPS steps."""
    from tinytale.run import prepare_data

    cfg = load_config(CONFIG, overrides)
    data = prepare_data(cfg)
    per_epoch = len(data.train) // cfg.train.batch_size
    return max(1, round(TARGET_STEPS / per_epoch)), per_epoch


def run_loop(steps: int, eval_every: int, threads: int) -> None:
    """The plain eager loop; prints one console-table-like row per evaluation on stderr."""
    import torch

    from tinytale.run import build_model, prepare_data

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(CONFIG, ["model.dropout=0.0", "data.stride=64"])
    data = prepare_data(cfg)  # the same stories, split and characters as tinytale's
    train, val = data.train.tokens, data.val.tokens
    T, B = cfg.model.block_size, cfg.train.batch_size
    torch.manual_seed(1337)
    model = build_model(cfg, data.tokenizer.vocab_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1e-3,
                            betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        if step < 100:
            return 1e-3 * (step + 1) / 100
        progress = (step - 100) / max(1, steps - 100)
        return 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * progress))

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        n = (len(val) - 1) // T
        x = val[: n * T].view(n, T)
        y = val[1 : n * T + 1].view(n, T)
        total = sum(model(x[i:i + 48], y[i:i + 48])[1].item() * len(x[i:i + 48])
                    for i in range(0, n, 48))
        model.train()
        return total / n

    model.train()
    for step in range(steps):
        ix = torch.randint(len(train) - T - 1, (B,))
        x = torch.stack([train[i:i + T] for i in ix])
        y = torch.stack([train[i + 1:i + T + 1] for i in ix])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            print(f"{(step + 1) // eval_every:>5d} {loss_value:7.4f} {val_loss():7.4f} "
                  f"step {step + 1}", file=sys.stderr, flush=True)


def first_reaching(rows: list[dict], target: float) -> float | None:
    return next((r["wall_s"] for r in rows if r["val_loss"] <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--set", action="append", default=[], dest="variants",
                        metavar="KEY=VALUE", help="an extra tinytale run with this override")
    parser.add_argument("--plot", type=Path, help="write the curves to this PNG")
    parser.add_argument("--loop", nargs=2, type=int, metavar=("STEPS", "EVAL_EVERY"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        run_loop(*args.loop, args.threads)
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    tinytale_cmd = [sys.executable, "-m", "tinytale", "train", str(CONFIG), "--json",
                    "--set", f"train.num_threads={args.threads}"]
    runs: dict[str, dict] = {}
    jobs: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"tinytale": []} | {f"tinytale {v}": [v] for v in args.variants}
        for i, (name, overrides) in enumerate(variants.items()):
            epochs, per_epoch = plan(overrides)
            if not overrides:  # as shipped
                epochs = load_config(CONFIG).train.epochs
            folder = Path(tmp) / f"run{i}"  # a fresh embedded store for each
            folder.mkdir()
            extra = sum((["--set", o] for o in overrides), [])
            jobs[name] = [str(folder), *tinytale_cmd, "--set", f"train.epochs={epochs}",
                          *extra, "--out", "runs"]
            runs[name] = {"steps": epochs * per_epoch}
        jobs["loop"] = [tmp, sys.executable, str(Path(__file__).resolve()), "--threads",
                        str(args.threads), "--loop", str(TARGET_STEPS), str(LOOP_EVAL_EVERY)]
        runs["loop"] = {"steps": TARGET_STEPS}
        # All at once: whatever else loads the machine slows every one of them alike,
        # where one after the other each would meet a different load.
        with ThreadPoolExecutor(len(jobs)) as pool:
            done = {name: pool.submit(stamped_rows, cmd[1:], env, cmd[0])
                    for name, cmd in jobs.items()}
        for name, future in done.items():
            rows, wall, stdout = future.result()
            runs[name].update(rows=rows, process_s=wall)
            if name != "loop":
                summary = json.loads(stdout.strip().splitlines()[-1])
                runs[name]["registered"] = summary.get("registered_version") is not None
    target = runs["loop"]["rows"][-1]["val_loss"]
    result = {"loop_final_val_loss": target, "threads": args.threads, "runs": runs}
    for run in runs.values():
        run["final_val_loss"] = run["rows"][-1]["val_loss"]
        run["time_to_loop_final_s"] = first_reaching(run["rows"], target)
    for name, run in runs.items():
        reached = run["time_to_loop_final_s"]
        at = "never" if reached is None else f"{reached:.1f} s"
        print(f"{name:<28} {run['steps']:>5} steps  final val {run['final_val_loss']:.4f}  "
              f"reaches the loop's {target:.4f} at {at}  (process {run['process_s']} s)")
    if args.plot:
        plot(runs, args.plot, target)
        result["plot"] = str(args.plot)
    print(json.dumps(result))


def plot(runs: dict[str, dict], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        ax.plot([r["wall_s"] for r in run["rows"]], [r["val_loss"] for r in run["rows"]],
                marker="o", label=f"{name} ({run['steps']} steps)")
    ax.axhline(target, color="grey", linestyle=":", label="the loop's final validation loss")
    ax.set_yscale("log")  # the end of the curves, where they are compared, stays readable
    ax.set_xlabel("wall time since the process started (s)")
    ax.set_ylabel("validation loss (nats per character)")
    ax.set_title("baby GPT on the fairy corpus: time to quality")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
