"""Devices: choosing one from the config, its autocast, and its peak FLOP/s for MFU."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from tinytale.errors import UserError

# What train.device and --device take on this machine (cuda:N as well).
LOCAL_DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """The torch device for `name`; `field` names the setting in error messages."""
    base = name.split(":")[0]
    if base not in LOCAL_DEVICES or (base != name and base != "cuda"):
        raise UserError(f"{field}={name!r} is not a device; use one of {', '.join(LOCAL_DEVICES)} "
                        "(or cuda:N).")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{field}={name!r} but no CUDA device is visible; use cpu or auto.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{field}='mps' but MPS is not available; use cpu or auto.")
    return torch.device(name)


# Peak bf16 tensor-core FLOP/s of one device, dense (the vendors' datasheets halved where
# they quote "with sparsity"), for model FLOPs utilisation (MFU). Keys are matched against
# torch.cuda.get_device_name(), the longest key found in the name first, so "H100 PCIe"
# (756 TFLOP/s) is not taken for an H100 SXM (989), nor "L40S" (362) or "L40" (181) for an
# "L4" (121), nor an A10G (~70, AWS) for an A10 (125). V100 and T4 have no bf16 tensor
# cores: they are left out, so no MFU is reported rather than a wrong one.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H200 NVL": 835e12,
    "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
    "A100": 312e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10": 125e12, "A10G": 70e12,
    "RTX 4090": 165e12,
}


def peak_flops_of(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a CUDA device name, or None when it is not in the table."""
    found = [key for key in PEAK_BF16_FLOPS if key in device_name]
    return PEAK_BF16_FLOPS[max(found, key=len)] if found else None


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of the device, or None when unknown (CPUs): then no MFU is reported."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


# Narrower models lose on a CPU with bf16 autocast: the casts cost more than the matrix units
# save. bf16 / fp32 tokens/s of fit() on an AMX Xeon (bench/precision.py): 384 wide x2.3,
# 128 wide x0.78; 256, between them, is not measured.
BF16_MIN_WIDTH_CPU = 256

# /proc/cpuinfo flags of CPUs that multiply bf16 matrices in hardware (Intel AMX, AVX-512 BF16).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_native_bf16(cpuinfo: str | None = None) -> str | None:
    """The CPU's bf16 matrix unit ('amx_bf16', 'avx512_bf16'), or None where it has none.

    Read from the kernel's CPU flags: torch's own capability string says "AVX512" on an
    AMX machine, and emulated bf16 (AVX2, most laptops) is slower than fp32. None off Linux.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), None)


def choose_precision(setting: str, device_type: str, n_embd: int,
                     native_bf16: bool | None = None) -> str:
    """'bf16' (autocast) or 'fp32' for train.precision=`setting` on this device and model width.

    auto: bf16 on CUDA where the GPU has bf16, on a CPU only with native bf16 matrix units
    and a model at least BF16_MIN_WIDTH_CPU wide; fp32 elsewhere (MPS included).
    """
    if setting in ("fp32", "bf16"):
        return setting
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device_type != "cpu":
        return "fp32"
    if native_bf16 is None:
        native_bf16 = cpu_native_bf16() is not None
    return "bf16" if native_bf16 and n_embd >= BF16_MIN_WIDTH_CPU else "fp32"


def autocast_for(device: torch.device, precision: str = "fp32"
                 ) -> contextlib.AbstractContextManager:
    """bf16 autocast for `precision` 'bf16' (matrix products in bf16, reductions and the
    loss in fp32; the weights and AdamW stay fp32); nothing for 'fp32'."""
    if precision == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
