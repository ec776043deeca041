"""Checkpoint entries of weights stored as torchao's NF4Tensor (QLoRA's frozen base): the tensors it is made of.

DCP writes an NF4 parameter as one pickled object per rank, which loads back only into the same layout: a
checkpoint written by 2 FSDP2 ranks would not load into one process (`meshtune export`) or another dp_shard. So
checkpoints hold each NF4 weight `X` as plain tensors, which DCP reshards like any other:

    X.nf4.quantized_data      uint8 (rows, cols / 2)   two 4-bit codes per byte
    X.nf4.quantized_scalers   int8  (blocks,)          each block's absmax, int8 around the mean
    X.nf4.quantization_factor fp32  (groups,)          each group of scalers' int8 scale
    X.nf4.scaler_mean         fp32  ()                 the mean the scalers were centred on

Under FSDP2 a rank's NF4 shard holds whole rows, and so a contiguous piece of each of the first three (the
layout checks keep groups whole), so they are saved as DTensors with the weight's placements; the mean is the
same on every rank. `pack` returns views of the live tensors: DCP loads into the NF4 weight in place.
"""

from __future__ import annotations

import torch

_SHARDED = ("quantized_data", "quantized_scalers", "quantization_factor")
_PACKED = ".nf4."


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor object a DTensor holds (else `t`). `DTensor.to_local()` of a parameter returns a fresh
    `view_as` of it, which for an NF4Tensor is a new object: attributes set on it would not stick."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def is_nf4(t) -> bool:
    """Whether `t` (or a DTensor's local shard) is a torchao NF4Tensor."""
    return type(local_tensor(t)).__name__ == "NF4Tensor"


def _parts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"quantized_data": t.quantized_data.view(t.shape[0], -1), "quantized_scalers": t.quantized_scalers,
            "quantization_factor": t.quantization_factor, "scaler_mean": t.scaler_mean}


def pack(state: dict, only: set[str] | None = None) -> dict:
    """`state` with every NF4 entry `X` replaced by its parts `X.nf4.*` (views); `only`: pack just these keys."""
    from torch.distributed.tensor import DTensor, Replicate

    out = {}
    for key, t in state.items():
        if not is_nf4(t) or (only is not None and key not in only):
            out[key] = t
            continue
        if isinstance(t, DTensor):
            for name, part in _parts(t.to_local()).items():
                placements = t.placements if name in _SHARDED else [Replicate()] * len(t.placements)
                out[f"{key}{_PACKED}{name}"] = DTensor.from_local(part, t.device_mesh, placements, run_check=False)
        else:
            out.update({f"{key}{_PACKED}{name}": part for name, part in _parts(t).items()})
    return out


def packed_keys(keys) -> set[str]:
    """The weights stored packed among checkpoint `keys` (their names without `.nf4.*`)."""
    return {k.split(_PACKED)[0] for k in keys if _PACKED in k}


def fold_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Checkpoint shapes with each packed weight's parts folded back into the weight's own (rows, cols)."""
    out = {k: v for k, v in shapes.items() if _PACKED not in k}
    for key, shape in shapes.items():
        if key.endswith(f"{_PACKED}quantized_data"):
            out[key.split(_PACKED)[0]] = (shape[0], shape[1] * 2)
    return out
