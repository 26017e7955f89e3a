"""Model FLOPs utilisation: the FLOP count, the GPU peak table, and the logged metric."""

from __future__ import annotations

import pytest
import torch

from tinytale.config import load_config
from tinytale.device import peak_flops, peak_flops_of
from tinytale.model import GPT, GPTConfig
from tinytale.run import build_model, prepare_data
from tinytale.tracking import Tracker
from tinytale.train import fit


def test_flops_per_token_by_hand():
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=4))
    # Parameters, C = 4, vocab 10, one block, biases on; the head is tied to wte:
    #   wte 10*4 = 40; ln_1, ln_2 2*(4+4) = 16; qkv 4*12+12 = 60; attn proj 4*4+4 = 20;
    #   fc 4*16+16 = 80; mlp proj 16*4+4 = 68; ln_f 4+4 = 8        -> 292 (wpe 8*4 left out)
    # 6 FLOPs per parameter per token (forward 2, backward 4): 6 * 292 = 1752;
    # attention scores and mixing, 12 * n_layer * C * T = 12 * 1 * 4 * 8 = 384.
    assert model.flops_per_token() == 1752 + 384


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989),
    ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312),
    ("NVIDIA L40S", 362),
    ("NVIDIA L40", 181),
    ("NVIDIA L4", 121),
    ("NVIDIA A10", 125),
    ("NVIDIA A10G", 70),
    ("NVIDIA GeForce RTX 4090", 165),
    ("Tesla V100-SXM2-16GB", None),  # no bf16 tensor cores: no MFU rather than a wrong one
    ("Tesla T4", None),
    ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_lookup_takes_the_most_specific_name(name, tflops):
    assert peak_flops_of(name) == (tflops * 1e12 if tflops else None)


def test_no_peak_on_a_cpu_unless_given():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 2.5) == 2.5e12


class Metrics(Tracker):
    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append(metrics)


def test_logged_mfu_is_model_flops_over_the_peak(tmp_path):
    cfg = load_config(None, ["model.n_layer=1", "model.n_head=2", "model.n_embd=32",
                             "model.block_size=16", "train.epochs=2", "train.device=cpu",
                             "data.n_stories=40", "train.peak_tflops=0.25"])
    data = prepare_data(cfg)
    model = build_model(cfg, data.tokenizer.vocab_size)
    tracker = Metrics()
    fit(model, data, cfg.train, tracker, tmp_path, torch.device("cpu"))
    assert len(tracker.logged) == 2
    for m in tracker.logged:  # one process: world size 1 (tests/e2e/test_distributed.py: 2)
        assert m["mfu"] == pytest.approx(model.flops_per_token() * m["tokens_per_sec"] / 0.25e12)
        assert 0 < m["mfu"] < 1
