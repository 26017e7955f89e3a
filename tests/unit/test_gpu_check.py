"""scripts/gpu-check.sh without a GPU: the CPU fallback runs every check that can run on a CPU
(the CUDA choices forced: fused-AdamW device guard, background checkpoint writer; gloo for
NCCL) and writes the one JSON file a GPU machine would. No GPU is mocked: the CUDA-only
checks say they were skipped and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support.configs import REPO


def test_the_gpu_check_falls_back_to_the_cpu_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a GPU runner must not take the GPU path
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(REPO / "scripts/gpu-check.sh"), str(out)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["device"] == "cpu"
    checks = report["checks"]
    assert set(checks) == {"bf16_autocast", "compile", "fused_adamw_device_guard",
                           "background_checkpoints_resume", "torchrun", "gpt2_small"}
    assert checks["compile"]["skipped"].startswith("no CUDA")
    assert checks["gpt2_small"]["skipped"].startswith("no CUDA")
    assert checks["fused_adamw_device_guard"]["guard_on_device"] is True
    assert checks["fused_adamw_device_guard"]["skipped_steps"] == 1
    assert checks["background_checkpoints_resume"]["background_checkpoints"] is True
    assert checks["background_checkpoints_resume"]["max_weight_diff"] == 0.0
    assert checks["torchrun"]["backend"] == "gloo"
    assert checks["bf16_autocast"]["worst_relative_gap"] <= 0.05
    assert report["all_ok"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-check.json"]  # nothing else


def test_the_gpt2_small_check_builds_its_data_without_a_gpu():
    """The one check the CPU fallback skips: its data (random ids over the whole vocabulary of
    experiments/gpt2_small.yaml) must build here, else the first GPU finds out (2026-12-06)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "bench"))
    cfg, data = gpu_check.gpt2_small_data(steps=3, overrides=["train.grad_accum_steps=2"])
    assert data.tokenizer.vocab_size == cfg.data.bpe_vocab_size
    assert cfg.train.grad_accum_steps == 2  # --set reaches the config
    assert len(data.train) == 3 * cfg.train.batch_size * 2  # 3 optimizer steps an epoch
    x, y = data.train[0]
    assert x.shape == y.shape == (cfg.model.block_size,)
    assert int(data.train.tokens.max()) < data.tokenizer.vocab_size
    assert len(data.val) == 4 * cfg.train.batch_size
