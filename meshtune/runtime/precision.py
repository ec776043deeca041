"""Compute precision: `train.dtype` -> whether a run computes in bf16 on its device."""

from __future__ import annotations

import torch


def use_bf16(dtype: str, device: torch.device) -> bool:
    """`train.dtype`: auto = bf16 on GPU, fp32 on CPU (CPU bf16 autocast is many times slower)."""
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda")


def frozen_dtype(frozen: str, dtype: str, device: torch.device) -> torch.dtype | None:
    """`train.frozen_dtype`: the dtype frozen weights are stored in, None = as built (fp32).

    Raises:
        ConfigError: bf16 frozen weights under fp32 compute (fp32 layers cannot read bf16 weights).
    """
    from meshtune.config import ConfigError

    bf16 = use_bf16(dtype, device)
    if frozen == "bf16" and not bf16:
        raise ConfigError(f"train.frozen_dtype: bf16 needs bf16 compute, and train.dtype={dtype} computes in fp32 on "
                          f"{device.type}; set train.dtype=bf16 or train.frozen_dtype=fp32")
    return torch.bfloat16 if frozen == "bf16" or (frozen == "auto" and bf16) else None


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes `t` stores: numel x element size, or for a wrapper tensor subclass (torchao's NF4Tensor: 4-bit
    codes + scales) the bytes of the inner tensors it flattens to (on meta too)."""
    if hasattr(t, "__tensor_flatten__"):  # plain tensors and Parameters have none
        return sum(tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def store_frozen(model: torch.nn.Module, dtype: torch.dtype | None) -> int:
    """Cast every frozen floating-point parameter to `dtype` in place (on meta too); returns how many."""
    if dtype is None:
        return 0
    n = 0
    for p in model.parameters():
        # a tensor subclass (torchao's NF4 weights) keeps its own storage format: casting would dequantize it
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype and not hasattr(p, "__tensor_flatten__"):
            p.data = p.data.to(dtype)
            n += 1
    return n
