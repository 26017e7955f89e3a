"""Devices: choosing one from the config, its autocast, and its peak FLOP/s for MFU."""

from __future__ import annotations

import contextlib

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


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
