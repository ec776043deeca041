"""A rank's piece of a sharded weight, and full-precision rows stored in a sharded NF4 weight as one process would.

torchao's NF4 double quantization (QLoRA's frozen base) centres every block scale on the mean of the whole
tensor's block scales (`scaler_mean`) before it int8-quantizes them in groups. A rank that quantizes only the
rows it holds (torchao's `copy_` of a full-precision shard into an NF4 one) centres them on the mean of its own
rows' scales: its int8 scales, group factors and mean are not the one-process quantization's, and FSDP2's
all-gather, which rebuilds the whole weight around the gathering rank's mean, decodes the other ranks' scales
around the wrong one. `quantize_rows` all-gathers the block scales instead (one number per block: 1/block_size of
the weight), quantizes them as torchao quantizes a whole weight's, and keeps this rank's part:

    to_nf4(W).quantized_data / quantized_scalers / quantization_factor, rows of this rank   bitwise
    to_nf4(W).scaler_mean                                                                     bitwise

The codes are each block's own (its absmax), so they are torchao's `to_nf4` of the rows themselves.
"""

from __future__ import annotations

import torch

from meshtune.artifacts.packed import local_tensor


def local_box(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, shape) of this rank's piece of `t` in the full tensor: all of it, or a DTensor's local shard."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return (0,) * t.ndim, tuple(t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(offset), tuple(shape)


@torch.no_grad()
def quantize_rows(param: torch.Tensor, rows: torch.Tensor) -> None:
    """Store `rows`, this rank's full-precision piece of the NF4 weight `param` (a row-sharded DTensor, or a whole
    NF4Tensor), in it as torchao's `to_nf4` of the whole weight stores them (module docstring). Every rank of a
    DTensor's mesh must call it, in the same order: it all-gathers the block scales over the mesh."""
    from torch.distributed.tensor import DTensor

    local = local_tensor(param)
    rows = rows.to(local.dtype).contiguous()
    if not isinstance(param, DTensor):
        local.copy_(rows)  # torchao quantizes the whole weight
        return
    size, group = local.block_size, local.scaler_block_size
    flat = rows.view(-1)
    n = flat.numel() // size  # this rank's blocks
    scales = flat.view(n, size).abs().max(dim=1).values  # (n,) each block's absmax (torchao's get_block_absmax)
    mesh = param.device_mesh
    # the scales are sharded as the rows are: a row shard holds whole blocks (check_plan: whole scale groups)
    whole = DTensor.from_local(scales.to(mesh.device_type), mesh, param.placements, shape=(param.numel() // size,),
                               stride=(1,)).full_tensor().to(rows.device)
    first = local_box(param)[0][0] * param.shape[1] // size
    assert n % group == 0 and first % group == 0 and torch.equal(whole[first:first + n], scales), (param.shape, n)
    # torchao's own double quantization of the whole weight's scales (with blocks of one: each its own absmax)
    scalers, factors, mean = type(local).double_quantize_scalers(whole, 1, group)
    local.quantized_data.copy_(type(local).convert_to_norm_float_weight(rows, n, size, local.nf4))
    local.quantized_scalers.copy_(scalers[first:first + n])
    local.quantization_factor.copy_(factors[first // group:(first + n) // group])
    local.scaler_mean.copy_(mean)
