"""Data parallelism over the mesh's dp axes: DDP, FSDP2 (`fully_shard`) and HSDP.

FSDP2 is applied per transformer block and then to the root (embeddings, final norm, head), so one block's
parameters are gathered at a time. The last block and the root are not resharded after forward: backward
needs them first.

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

from meshtune.runtime import gloo_fsdp


def apply_fsdp(model: nn.Module, mesh, reshard_after_forward: bool = True,
               param_dtype: torch.dtype | None = None, pipelined: bool = False, cpu_offload: bool = False,
               ignored: set[nn.Parameter] = frozenset()) -> nn.Module:
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
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    offload = {"offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available())} if cpu_offload else {}
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and not last,
                    **offload)
    # the root (embeddings, norm, head) is needed first in backward, like the last block: keep it gathered
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False, **offload,
                **({"ignored_params": set(ignored)} if ignored else {}))
    if mesh.device_type == "cpu":
        if gloo_fsdp.available():
            gloo_fsdp.install(model, blocks, overlap=mesh.ndim == 1 and param_dtype is None and not pipelined,
                              ignored=ignored)
        prefetch_neighbours(model, blocks)
    return model


def prefetch_neighbours(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Make each block start its neighbour's all-gather before its own compute (see the module docstring).

    `_set_unshard_async_op(True)` is what turns FSDP2's prefetch into a real async collective on a device
    without streams; releases that lack it keep the blocking gathers (correct, only slower).
    """
    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch([blocks[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([blocks[i - 1]])
    if hasattr(model, "_set_unshard_async_op"):
        model._set_unshard_async_op(True)


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
