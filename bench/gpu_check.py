"""The GPU check: every CUDA-only code path of tinytale once, and GPT-2-small's speed, in one JSON.

GPU machines reach this project rarely and briefly, with their own PyTorch and no MLflow or
network. This script needs only torch, numpy and PyYAML (no MLflow, no typer, no downloads):
it calls fit() directly with the null tracker, on the built-in lesson corpus. Each check is
timed and isolated (one failing does not lose the others' results) and the whole run keeps
to --budget-s (default 420 s, under the 8 minutes a GPU loan allows).

  CUDA checks   bf16 autocast (loss within 5% of fp32), torch.compile (compile time apart),
                fused AdamW with the device-side non-finite guard (a NaN gradient skipped),
                background checkpoints + stop + resume bit-for-bit, torchrun with NCCL on
                one GPU, and tokens/s + MFU of experiments/gpt2_small.yaml for fixed steps.
  No CUDA       the same checks on the CPU (the CUDA choices forced where they can run
                there, NCCL replaced by gloo, compile and GPT-2-small skipped), so the
                script itself is tested in the suite (tests/unit/test_gpu_check.py).

    scripts/gpu-check.sh [OUT.json]              # or: python bench/gpu_check.py --out OUT.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # support.stopping: the tests' StopAt

from support.stopping import StopAt  # noqa: E402

from tinytale import train as train_mod  # noqa: E402 (after the path: a bare copy of the tree)
from tinytale.checkpoint import LAST, load_checkpoint  # noqa: E402
from tinytale.config import load_config  # noqa: E402
from tinytale.data import windows_from_tokens  # noqa: E402
from tinytale.device import peak_flops  # noqa: E402
from tinytale.inference import build_model  # noqa: E402
from tinytale.run import prepare_data  # noqa: E402
from tinytale.tokenizer import EOS, WordTokenizer  # noqa: E402
from tinytale.tracking import Tracker  # noqa: E402
from tinytale.train import StopRequest, fit  # noqa: E402

# Small enough for seconds on a CPU core; the CUDA paths do not depend on the size.
SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
         "train.batch_size=16", "train.warmup_steps=4", "data.n_stories=60",
         "train.compile=false"]


def small_run(tmp: Path, device: torch.device, overrides: list[str],
              tracker: Tracker | None = None, resume: dict | None = None,
              stop: StopRequest | None = None) -> tuple[Any, torch.nn.Module]:
    cfg = load_config(None, [*SMALL, f"train.device={device.type}", *overrides])
    data = prepare_data(cfg, world_size=1)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, data.tokenizer.vocab_size)
    fields = {"config": cfg.to_dict(), "tokenizer": data.tokenizer.to_dict()}
    result = fit(model, data, cfg.train, tracker or Tracker(), tmp, device,
                 checkpoint_fields=lambda: fields, resume=resume, stop=stop)
    return result, model


def cuda_choices_on(device: torch.device) -> None:
    """On a CPU, make fit() take the choices it takes on CUDA (its fused AdamW skips
    non-finite steps on the device; a thread writes checkpoints); on CUDA they are its own."""
    if device.type != "cuda":
        cuda = train_mod.DeviceChoices(guard_on_device=True, background_checkpoints=True)
        train_mod.device_choices = lambda _device: cuda


def check_autocast(device: torch.device, tmp: Path) -> dict:
    losses = {}
    for precision in ("fp32", "bf16"):
        result, _ = small_run(tmp / precision, device,
                              ["train.epochs=3", f"train.precision={precision}"])
        losses[precision] = [h["val_loss"] for h in result.state.history]
    worst = max(abs(b / a - 1) for a, b in zip(losses["fp32"], losses["bf16"], strict=True))
    return {"ok": worst <= 0.05, "val_loss_fp32": losses["fp32"][-1],
            "val_loss_bf16": losses["bf16"][-1], "worst_relative_gap": round(worst, 5)}


def check_compile(device: torch.device, tmp: Path) -> dict:
    if device.type != "cuda":
        return {"skipped": "no CUDA: compiling on this CPU is measured by bench/run.py"}
    eager, _ = small_run(tmp / "eager", device, ["train.epochs=2"])
    compiled, _ = small_run(tmp / "compiled", device, ["train.epochs=2", "train.compile=true"])
    e, c = eager.state.history, compiled.state.history
    gap = abs(c[-1]["val_loss"] / e[-1]["val_loss"] - 1)
    return {"ok": compiled.status == "FINISHED" and gap <= 0.02,
            "compile_s": round(c[0]["epoch_time_s"] - e[0]["epoch_time_s"], 2),
            "speedup_after_compile": round(c[-1]["tokens_per_sec"] / e[-1]["tokens_per_sec"], 3),
            "val_loss_gap": round(gap, 5)}


class PoisonOnce(Tracker):
    """Makes one step's gradients NaN (a bad batch), leaving the weights intact."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.done = False

    def on_progress(self, epoch: int, batch: int, n_batches: int) -> None:
        if epoch == 1 and batch == 3 and not self.done and self.model is not None:
            self.done = True
            self.model.wte.weight.grad.fill_(float("nan"))


def check_nonfinite_guard(device: torch.device, tmp: Path) -> dict:
    cfg_overrides = ["train.epochs=2", "train.nonfinite=skip"]
    poison = PoisonOnce()
    original = train_mod.make_optimizer

    def spy(model, cfg, dev):  # hands the model to the poisoner; the optimizer is fit()'s
        poison.model = model
        return original(model, cfg, dev)

    train_mod.make_optimizer = spy
    try:
        result, _ = small_run(tmp, device, cfg_overrides, tracker=poison)
    finally:
        train_mod.make_optimizer = original
    return {"ok": result.status == "FINISHED" and result.state.skipped_steps == 1,
            "guard_on_device": train_mod.device_choices(device).guard_on_device,
            "skipped_steps": result.state.skipped_steps, "status": result.status}


def check_resume(device: torch.device, tmp: Path) -> dict:
    """Stop mid-epoch (checkpoints from the background writer), resume, compare bit for bit."""
    overrides = ["train.epochs=3", "model.dropout=0.1"]
    straight, straight_model = small_run(tmp / "straight", device, overrides)
    stop = StopRequest()
    cut, _ = small_run(tmp / "cut", device, overrides, tracker=StopAt(stop, 2, 5), stop=stop)
    saved = load_checkpoint(tmp / "cut" / LAST)
    resumed, resumed_model = small_run(tmp / "cut", device, overrides, resume=saved)
    same_curves = [(a["train_loss"], a["val_loss"]) for a in straight.state.history] == \
        [(b["train_loss"], b["val_loss"]) for b in resumed.state.history]
    weights = zip(straight_model.state_dict().values(), resumed_model.state_dict().values(),
                  strict=True)
    max_diff = max(float((a.float() - b.float()).abs().max()) for a, b in weights)
    return {"ok": cut.status == "KILLED" and resumed.status == "FINISHED" and same_curves
            and max_diff == 0.0,
            "background_checkpoints": train_mod.device_choices(device).background_checkpoints,
            "same_loss_curves": same_curves, "max_weight_diff": max_diff}


def check_torchrun(device: torch.device, tmp: Path) -> dict:
    out = tmp / "rank0.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "1", str(Path(__file__).resolve()), "--ddp-worker", str(out),
           "--device", device.type]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp)
    if proc.returncode != 0 or not out.exists():
        return {"ok": False, "exit_code": proc.returncode, "stderr": proc.stderr[-1500:]}
    worker = json.loads(out.read_text())
    want = "nccl" if device.type == "cuda" else "gloo"
    return {"ok": worker["status"] == "FINISHED" and worker["backend"] == want, **worker}


def ddp_worker(out: Path, device_type: str) -> None:
    """One torchrun rank: fit() under DistributedDataParallel; rank 0 writes what it saw.

    With one GPU torchrun starts one rank, where tinytale would train without a process
    group; the rank is told it is distributed, so NCCL carries DDP's gradient all-reduce and
    the loop's stop agreement as it would across GPUs."""
    from tinytale import distributed

    @dataclasses.dataclass(frozen=True)
    class EveryRankCounts(distributed.Dist):
        @property
        def enabled(self) -> bool:
            return True

    d = EveryRankCounts(**dataclasses.asdict(distributed.from_env()))
    device = distributed.setup(d, torch.device(device_type))
    cfg = load_config(None, [*SMALL, "train.epochs=2", f"train.device={device_type}"])
    data = prepare_data(cfg, world_size=d.world_size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, data.tokenizer.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(model, data, cfg.train, Tracker(), Path(tmp), device, dist=d)
    backend = torch.distributed.get_backend()
    if d.is_main:
        out.write_text(json.dumps({"status": result.status, "backend": backend,
                                   "world_size": d.world_size,
                                   "val_loss": result.state.history[-1]["val_loss"]}))
    distributed.teardown(d)


def gpt2_small_data(steps: int, overrides: list[str] = ()) -> tuple[Any, Any]:
    """experiments/gpt2_small.yaml (2 epochs, then `overrides`) and random tokens over its
    whole vocabulary: `steps` optimizer steps of windows per epoch, 4 batches of validation."""
    cfg = load_config(REPO / "experiments/gpt2_small.yaml", ["train.epochs=2", *overrides])
    vocab, block, batch = cfg.data.bpe_vocab_size, cfg.model.block_size, cfg.train.batch_size
    tokenizer = WordTokenizer([EOS, *(f"t{i}" for i in range(vocab - 1))])
    gen = torch.Generator().manual_seed(0)
    windows = steps * batch * cfg.train.grad_accum_steps
    train_tokens = torch.randint(vocab, (windows * block + 1,), generator=gen)
    val_tokens = torch.randint(vocab, (4 * batch * block + 1,), generator=gen)
    return cfg, windows_from_tokens(tokenizer, train_tokens, val_tokens, 1, 1, block, None,
                                    batch, cfg.train.grad_accum_steps, 1)


def measure_gpt2_small(device: torch.device, tmp: Path, steps: int,
                       overrides: list[str] = ()) -> dict:
    """experiments/gpt2_small.yaml as shipped (bf16 autocast, compile on CUDA) on random tokens
    of its 8192-token vocabulary: speed does not depend on the text. Epoch 1 includes
    compiling; the figures are epoch 2's. `overrides` (--set) measure a variant."""
    if device.type != "cuda":
        return {"skipped": "no CUDA: GPT-2-small is far too slow for a CPU"}
    cfg, data = gpt2_small_data(steps, overrides)
    block, batch = cfg.model.block_size, cfg.train.batch_size
    torch.manual_seed(0)
    model = build_model(cfg, data.tokenizer.vocab_size)
    result = fit(model, data, cfg.train, Tracker(), tmp, device)
    first, last = result.state.history[0], result.state.history[-1]
    return {"ok": result.status == "FINISHED", "steps_per_epoch": result.state.step // 2,
            "batch": batch, "block_size": block, "params": model.num_params(),
            "tokens_per_sec": round(last["tokens_per_sec"]), "mfu": last.get("mfu"),
            "peak_tflops": (peak_flops(device) or 0) / 1e12 or None,
            "first_epoch_extra_s": round(first["epoch_time_s"] - last["epoch_time_s"], 2),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


CHECKS = {
    "bf16_autocast": check_autocast,
    "compile": check_compile,
    "fused_adamw_device_guard": check_nonfinite_guard,
    "background_checkpoints_resume": check_resume,
    "torchrun": check_torchrun,
}


def environment(device: torch.device) -> dict:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "device": str(device), "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    if device.type == "cuda":
        env.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   bf16=torch.cuda.is_bf16_supported())
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--steps", type=int, default=30, help="GPT-2-small steps an epoch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for GPT-2-small (train.compile=false: eager)")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--only", nargs="*", default=None, help="some of the checks")
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, args.device or "cpu")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda_choices_on(device)
    report: dict[str, Any] = {"environment": environment(device), "checks": {}}
    started = time.monotonic()
    plan = {**CHECKS, "gpt2_small": lambda d, t: measure_gpt2_small(d, t, args.steps, args.set)}
    for name, check in plan.items():
        if args.only is not None and name not in args.only:
            continue
        if time.monotonic() - started > args.budget_s:
            report["checks"][name] = {"skipped": f"over the {args.budget_s:.0f} s budget"}
            continue
        t0 = time.monotonic()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                result = check(device, Path(tmp))
        except Exception as exc:  # noqa: BLE001 - recorded; the other checks still run
            result = {"ok": False, "error": repr(exc)[:500],
                      "traceback": traceback.format_exc()[-1500:]}
        result["seconds"] = round(time.monotonic() - t0, 1)
        report["checks"][name] = result
        print(f"{name:>32}: {json.dumps(result)[:300]}", file=sys.stderr, flush=True)
    report["total_s"] = round(time.monotonic() - started, 1)
    report["all_ok"] = all(r.get("ok", True) for r in report["checks"].values())
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written to {args.out}", file=sys.stderr)
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
