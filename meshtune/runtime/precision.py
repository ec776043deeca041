"""Compute precision: `train.dtype` -> whether a run computes in bf16 on its device."""

from __future__ import annotations

import torch


def use_bf16(dtype: str, device: torch.device) -> bool:
    """`train.dtype`: auto = bf16 on GPU, fp32 on CPU (CPU bf16 autocast is many times slower)."""
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
