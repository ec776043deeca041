"""Data parallelism over the mesh's dp axes: DDP, FSDP2 (`fully_shard`) and HSDP.

FSDP2 is applied per transformer block and then to the root (embeddings, final norm, head), so one block's
parameters are gathered at a time; with parallel.fsdp_unit=linear each projection of a block first becomes a
unit of its own (runtime/fsdp_units.py), so one projection's are. The last block (and its last projection) and
the root are not resharded after forward: backward needs them first.

Overlap. On CUDA the all-gather of block i+1 overlaps block i's compute through FSDP2's own streams (its
implicit prefetch). A CPU device has no streams: there FSDP2's default all-gather blocks the training thread,
so every block waits for its gather before computing. On CPU we therefore prefetch explicitly: block i
starts block i+1's all-gather (block i-1's in backward) as an async collective, which gloo runs on its own
thread while block i computes, and gloo_fsdp replaces the collectives with faster all-to-alls and overlaps
the gradient reduce-scatters with backward.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from meshtune.runtime import fsdp_units, gloo_fsdp


def apply_fsdp(model: nn.Module, mesh, reshard_after_forward: bool = True,
               param_dtype: torch.dtype | None = None, pipelined: bool = False, cpu_offload: bool = False,
               ignored: set[nn.Parameter] = frozenset(), unit: str = "block") -> nn.Module:
    """Shard `model` with FSDP2 over `mesh` (1-D: FSDP; 2-D (replicate, shard): HSDP).

    Args:
        model: a decoder with a `layers` ModuleDict of blocks.
        mesh: the "fsdp" DeviceMesh from ParallelMesh.
        reshard_after_forward: free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2-like).
        param_dtype: compute dtype of gathered parameters (bf16 on GPU); gradients reduce in fp32.
        pipelined: `model` is a pipeline stage (its schedule runs several backwards per step).
        cpu_offload: keep sharded parameters, gradients (and so the optimizer state) in CPU memory
            (`CPUOffloadPolicy`, pinned where CUDA is present); each all-gather copies them to the device first.
            On a CPU device every one of those copies is `.to("cpu")` of a CPU tensor, which returns the tensor
            itself: the run is the same as without offload (measured: the same losses, bitwise).
        ignored: root parameters FSDP2 leaves as they are (parallel.vocab_parallel's split embedding and head).
        unit: parallel.fsdp_unit: `block`, or `linear` (each projection of a block a unit of its own).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    offload = {"offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available())} if cpu_offload else {}

    def shard(module: nn.Module, reshard: bool) -> None:
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and reshard,
                    **offload)

    blocks = list(model.layers.values())
    # per block, its projections' units (parallel.fsdp_unit=linear), sharded before the block takes the rest
    inner = fsdp_units.shard_projections(model, blocks, shard) if unit == "linear" else []
    for i, block in enumerate(blocks):
        shard(block, i < len(blocks) - 1)
    # the root (embeddings, norm, head) is needed first in backward, like the last block: keep it gathered
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False, **offload,
                **({"ignored_params": set(ignored)} if ignored else {}))
    cpu = mesh.device_type == "cpu"
    if cpu and gloo_fsdp.available():  # every unit, each projection's before its block's
        units = [m for i, block in enumerate(blocks) for m in (*(inner[i] if inner else ()), block)]
        gloo_fsdp.install(model, units, overlap=mesh.ndim == 1 and param_dtype is None and not pipelined,
                          ignored=ignored)
    if inner and reshard_after_forward:
        fsdp_units.reshard_recomputed(inner, prefetch=cpu)
    if cpu:
        if inner:
            fsdp_units.chain_prefetch(blocks, inner, recomputed=reshard_after_forward)
        else:
            prefetch_neighbours(blocks)
        # what turns FSDP2's prefetch into a real async collective on a device without streams; releases that
        # lack it keep the blocking gathers (correct, only slower)
        if hasattr(model, "_set_unshard_async_op"):
            model._set_unshard_async_op(True)
    return model


def prefetch_neighbours(blocks: list[nn.Module]) -> None:
    """Make each block start its neighbour's all-gather before its own compute (see the module docstring)."""
    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch([blocks[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([blocks[i - 1]])


def apply_ddp(model: nn.Module, mesh, device: torch.device) -> nn.Module:
    """Wrap `model` in DistributedDataParallel over the 1-D "dp" mesh."""
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.13 renamed broadcast_buffers; older releases in our range know only the old name
    no_buffer_sync = {("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                       else "broadcast_buffers"): False}
    return ddp(
        model,
        process_group=mesh.get_group(),
        device_ids=[device.index] if device.type == "cuda" else None,
        # gradient buckets in place of grads: saves a copy of every gradient
        gradient_as_bucket_view=True,
        # the only buffers are the rotary tables, equal everywhere: don't re-send them every step
        **no_buffer_sync,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The decoder inside a DDP or DeepSpeed engine wrapper (FSDP2 modifies the module in place)."""
    deepspeed = sys.modules.get("deepspeed")  # not imported: no model is a DeepSpeedEngine
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        return model.module
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
