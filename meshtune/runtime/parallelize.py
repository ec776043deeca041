"""Turn a freshly built model into its parallel form, in one documented order:

    tensor parallel -> activation checkpointing -> activation offload -> torch.compile -> FSDP2 / HSDP / DDP
    (x TP: FSDP2 replicating); with parallel.vocab_parallel the embedding and head are split by vocabulary rows
    just before FSDP2, which then leaves them alone; with parallel.fsdp_unit=linear FSDP2 shards each projection
    inside the (checkpointed) blocks before the blocks

TP first because it rewrites parameters into DTensors that FSDP then shards along another mesh axis;
checkpointing and compile wrap whole blocks, so they come before data parallelism wraps those blocks.
Recipes (LoRA, fake-quant, masks...) have already been applied, so their parameters are sharded like the
base layers they belong to.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from meshtune.config import ParallelConfig
from meshtune.runtime import fsdp_units
from meshtune.runtime.data_parallel import apply_ddp, apply_fsdp
from meshtune.runtime.mesh import ParallelMesh
from meshtune.runtime.tensor_parallel import apply_tp


def _matmul_ops() -> set:
    """The ops selective checkpointing keeps: matmuls and fused attention (whichever kernels this torch has)."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"]
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _selective_context():
    """torch.utils.checkpoint contexts that keep matmul / attention outputs and recompute every other op."""
    keep = _matmul_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model: nn.Module, every: int = 1, mode: str = "full",
                                   units_inside: bool = False) -> None:
    """Recompute blocks' activations in backward instead of keeping them.

    Layers 0, every, 2 * every, ... are checkpointed (by layer index, so a pipeline cut does not move them).
    `mode="full"` keeps only each checkpointed block's input; `selective_op` also keeps its matmul and
    attention outputs (the expensive ops) and recomputes norms, rotary, activations and the rest (Korthikanti
    et al. 2022's selective recomputation, per op). The block's own `forward` is replaced by a checkpointed call
    of it, rather than wrapping the block in another module, so parameter names (and so checkpoints and
    recipes' name patterns) do not change. With `units_inside` (parallel.fsdp_unit=linear: FSDP2 units, and so
    their hooks, inside the blocks) `selective_op` uses fsdp_units.selective_context, which keeps the same outputs.
    """
    context = functools.partial(fsdp_units.selective_context, _matmul_ops()) if units_inside else _selective_context
    extra = {"context_fn": context} if mode == "selective_op" else {}
    for name, block in model.layers.items():
        if int(name) % every:
            continue
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, **extra)
        block.activation_checkpointing = True


def apply_activation_offload(model: nn.Module, pin_memory: bool) -> None:
    """Save each block's tensors for backward in CPU memory (`torch.autograd.graph.save_on_cpu`): they are copied
    to CPU as forward saves them and back to the device when backward reads them. Outside checkpointed blocks that
    is every saved activation; a checkpointed block saves only its input, and its recomputation in backward runs
    outside the offload context, so it stays on the device (one block at a time)."""
    for block in model.layers.values():
        block.forward = functools.partial(_offloaded, block.forward, pin_memory)


def _offloaded(forward, pin_memory: bool, *args, **kwargs):
    with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
        return forward(*args, **kwargs)


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
        apply_activation_checkpointing(model, cfg.ac_every, cfg.ac_mode, units_inside=cfg.fsdp_unit == "linear")
    if cfg.activation_offload:
        apply_activation_offload(model, pin_memory=device.type == "cuda")
    if cfg.compile:
        for block in model.layers.values():
            block.compile()
    pipelined = mesh.get("pp") is not None
    if (fsdp_mesh := mesh.get("fsdp")) is not None:
        ignored = set()
        if cfg.vocab_parallel:  # the embedding and head split by vocabulary rows, never gathered (plan-checked layout)
            from meshtune.runtime.vocab_parallel import apply_vocab_parallel

            ignored = apply_vocab_parallel(model, fsdp_mesh, param_dtype, model.cfg.logit_softcap)
        return apply_fsdp(model, fsdp_mesh, cfg.reshard_after_forward, param_dtype, pipelined, cfg.cpu_offload,
                          ignored, cfg.fsdp_unit)
    if mesh.dims.dp_mode == "ddp" and tp_mesh is not None:
        # DDP cannot take DTensor parameters; FSDP2 replicating over (dp_replicate, dp_shard=1) is DDP x TP
        return apply_fsdp(model, mesh.replicate_mesh(), False, param_dtype, pipelined)
    if (dp_mesh := mesh.get("dp")) is not None and wrap_ddp:
        return apply_ddp(model, dp_mesh, device)
    return model
