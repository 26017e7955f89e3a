"""train.precision: which CPUs and models get bf16 autocast, and that bf16 learns like fp32.

The bf16 runs below work on any x86 CPU (torch emulates bf16 where the CPU lacks it), so
they check behaviour, not the speed that only native bf16 units give (bench/run.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from tinytale.config import ConfigError, load_config
from tinytale.device import BF16_MIN_WIDTH_CPU, autocast_for, choose_precision, cpu_native_bf16
from tinytale.run import build_model, prepare_data, run_tags
from tinytale.tracking import Tracker
from tinytale.train import fit

AMX_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
AVX2_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_native_bf16(AMX_CPUINFO) == "amx_bf16"
    assert cpu_native_bf16(AMX_CPUINFO.replace(" amx_bf16", "")) == "avx512_bf16"
    assert cpu_native_bf16(AVX2_CPUINFO) is None
    assert cpu_native_bf16("") is None


@pytest.mark.parametrize(("native", "width", "expected"), [
    (True, BF16_MIN_WIDTH_CPU, "bf16"),
    (True, 384, "bf16"),
    (True, 128, "fp32"),  # the baby GPT: the casts cost more than AMX saves
    (False, 768, "fp32"),  # emulated bf16 is slower than fp32
])
def test_auto_takes_bf16_on_native_cpus_for_wide_models_only(native, width, expected):
    assert choose_precision("auto", "cpu", width, native_bf16=native) == expected


def test_an_explicit_precision_is_kept_and_other_devices_stay_fp32():
    assert choose_precision("bf16", "cpu", 16, native_bf16=False) == "bf16"
    assert choose_precision("fp32", "cpu", 4096, native_bf16=True) == "fp32"
    assert choose_precision("auto", "mps", 4096, native_bf16=True) == "fp32"


def test_bf16_autocast_runs_matrix_products_in_bf16_on_the_cpu():
    a = torch.randn(4, 4)
    with autocast_for(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_for(torch.device("cpu"), "fp32"):
        assert (a @ a).dtype == torch.float32


def test_an_unknown_precision_names_the_field_and_the_choices():
    with pytest.raises(ConfigError, match=r"train.precision='fp16' is not one of 'auto', 'fp32', "
                                          r"'bf16'"):
        load_config(None, ["train.precision=fp16"])


def _final_val_losses(tmp_path, precision: str) -> list[float]:
    cfg = load_config(None, ["model.n_layer=2", "model.n_head=2", "model.n_embd=64",
                             "model.block_size=16", "train.batch_size=16", "train.epochs=4",
                             "train.device=cpu", f"train.precision={precision}",
                             "data.n_stories=80"])
    data = prepare_data(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, data.tokenizer.vocab_size)
    result = fit(model, data, cfg.train, Tracker(), tmp_path / precision, torch.device("cpu"))
    assert result.status == "FINISHED"
    return [h["val_loss"] for h in result.state.history]


def test_bf16_loss_curve_stays_within_tolerance_of_fp32(tmp_path):
    """Same seed, data and steps: every epoch's validation loss in bf16 within 5% of fp32's
    (bf16 keeps 8 bits of mantissa; the weights, AdamW and the loss stay fp32), and both
    learn well below guessing."""
    fp32 = _final_val_losses(tmp_path, "fp32")
    bf16 = _final_val_losses(tmp_path, "bf16")
    assert fp32[-1] < math.log(24) - 1.0
    for epoch, (a, b) in enumerate(zip(fp32, bf16, strict=True), 1):
        assert b == pytest.approx(a, rel=0.05), f"epoch {epoch}: bf16 {b:.4f} vs fp32 {a:.4f}"
    assert bf16 != fp32  # autocast really changed the arithmetic


def test_the_resolved_precision_is_a_run_tag():
    cpu = torch.device("cpu")
    assert run_tags(load_config(None, []), cpu)["precision"] == "fp32"  # 64 wide: never bf16
    assert run_tags(load_config(None, ["train.precision=bf16"]), cpu)["precision"] == "bf16"
