"""Turn a freshly built model into its parallel form, in one documented order:

    tensor parallel -> activation checkpointing -> torch.compile -> FSDP2 / HSDP / DDP (x TP: FSDP2 replicating)

TP first because it rewrites parameters into DTensors that FSDP then shards along another mesh axis;
checkpointing and compile wrap whole blocks, so they come before data parallelism wraps those blocks.
Recipes (LoRA, fake-quant, masks...) have already been applied, so their parameters are sharded like the
base layers they belong to.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from meshtune.config import ParallelConfig
from meshtune.runtime.data_parallel import apply_ddp, apply_fsdp
from meshtune.runtime.mesh import ParallelMesh
from meshtune.runtime.tensor_parallel import apply_tp


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them.

    The block's own `forward` is replaced by a checkpointed call of it, rather than wrapping the block in
    another module, so parameter names (and so checkpoints and recipes' name patterns) do not change.
    """
    for block in model.layers.values():
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        block.activation_checkpointing = True


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig, device: torch.device,
                param_dtype: torch.dtype | None = None, wrap_ddp: bool = True, recipes=()) -> nn.Module:
    """Apply the parallel layout of `mesh` to `model` and return the module to train.

    Args:
        model: the decoder or one pipeline stage of it, on `device` (or on meta for `model.init_device: meta`).
        mesh: the named mesh axes.
        cfg: the `parallel` config section.
        device: this rank's device.
        param_dtype: FSDP2 compute dtype for gathered parameters (None = the parameters' own).
        wrap_ddp: False skips the DDP wrapper (plans on the meta device: DDP changes no parameter).
        recipes: the run's recipes, which shard their own modules under tensor parallelism.
    """
    if (tp_mesh := mesh.get("tp")) is not None:
        apply_tp(model, tp_mesh, cfg.sequence_parallel, recipes)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        for block in model.layers.values():
            block.compile()
    pipelined = mesh.get("pp") is not None
    if (fsdp_mesh := mesh.get("fsdp")) is not None:
        return apply_fsdp(model, fsdp_mesh, cfg.reshard_after_forward, param_dtype, pipelined)
    if mesh.dims.dp_mode == "ddp" and tp_mesh is not None:
        # DDP cannot take DTensor parameters; FSDP2 replicating over (dp_replicate, dp_shard=1) is DDP x TP
        return apply_fsdp(model, mesh.replicate_mesh(), False, param_dtype, pipelined)
    if (dp_mesh := mesh.get("dp")) is not None and wrap_ddp:
        return apply_ddp(model, dp_mesh, device)
    return model
