"""FSDP2 units finer than a block (`parallel.fsdp_unit: linear`): each projection of a block is its own unit.

Why. FSDP2 gathers a unit's parameters whole for its compute. With a block as the unit, a step holds one block
gathered while the next block is prefetched (its all-gather output, then its copy-out into the unsharded
parameters): two to three blocks, 0.5-0.7 GiB for a Llama-3.2-1B in fp32. Here every projection the model
family's spec names (`ModuleNames.projections`: attention q/k/v/o, MLP gate/up/down; with LoRA the LoRA-wrapped
module, so its unit holds the base weight and the adapters) is sharded on its own before its block, whose unit
keeps the rest (norms, q/k norms, adapters outside the projections). About two projections are gathered at once.
(Phi-3's fused qkv_proj and gate_up_proj are separate modules in meshtune's decoder, so separate units too.)

Numbers. Each parameter is sharded and reduce-scattered exactly as in its block, so where each projection reads
its input once (nn.Linear, LoRA's fused path) losses and parameters are bitwise those of block units. FSDP2 passes
a unit's input through an identity autograd node (its post-backward hook), so a projection that reads its input
twice (QLoRA; LoRA with dropout or a bias) has the input's gradient summed per projection before the projections'
sums are added: the same terms, associated differently, equal up to float rounding.

    units = shard_projections(model, blocks, shard)      # fully_shard each projection; call before the blocks'
    chain_prefetch(blocks, units, recomputed=True)        # CPU: explicit prefetch in execution order
    reshard_recomputed(units, prefetch=True)              # activation checkpointing: free recomputed projections

Order. A block runs its projections in the spec's order (q, k, v, o, gate, up, down) and backward runs them in
reverse (tests/unit/test_fsdp_units.py checks both on every family), so the execution order of the units is
    forward   block_i, q_i, k_i, v_i, o_i, gate_i, up_i, down_i, block_i+1, ...
    backward  block_i, down_i, up_i, gate_i, o_i, v_i, k_i, q_i, block_i-1, ...
(a block's unit runs its pre-forward and pre-backward hooks before anything inside it). On CPU each unit starts
the next one's all-gather (data_parallel.py's module docstring says why CPU needs it).

Activation checkpointing. A checkpointed block's forward runs again inside backward, calling each projection
(its FSDP2 pre-forward hook gathers it), but inside backward FSDP2 does not free a unit after its forward (it
expects the backward to follow at once, which holds for a block but not for the projections of a block), so the
whole block would end up gathered. `reshard_recomputed` frees each recomputed projection after its forward but the
block's last two: the last was gathered for backward just before the recompute began (backward needs it first),
the one before it is the next backward needs; the last then starts the gather of the third from last, so at most
three projections are gathered at a time (the last, the one recomputing, the next). A checkpointed projection
is gathered three times per step (forward, recompute, backward) instead of its block's two, the last two twice.
Forward prefetch into the next block is skipped inside backward: a recomputed block's last projection would
otherwise gather a unit that backward has already passed, held unused until the end of backward.

Selective checkpointing (parallel.ac_mode=selective_op). torch's `create_selective_checkpoint_contexts` numbers
every op of the region, per op, and looks each one up again by its number in the recompute. The projections'
FSDP2 hooks now run inside the region and do different work in forward and in the recompute (gathers that were
prefetched, frees, prefetches), so the numbers disagree and torch raises. `selective_context` keeps the same ops'
outputs (matmuls and attention, parallelize.py's policy) but numbers only those: the model calls them in the same
order both times, and nothing a hook does is a matmul.
"""

from __future__ import annotations

import collections
import itertools

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread: FSDP2's own test for "the forward being
    run is a recomputation" (`torch.distributed.fsdp._fully_shard._fsdp_common.is_bw`)."""
    return torch._C._current_graph_task_id() != -1


def projections(model: nn.Module, block: nn.Module) -> list[nn.Module]:
    """`block`'s projection modules in forward order: the paths the model family's spec names that the block has."""
    from meshtune.models.families import family

    found = []
    for path in family(model.cfg.family).names.projections:
        try:
            found.append(block.get_submodule(path))
        except AttributeError:  # e.g. a recipe or pruning removed it
            continue
    return found


def shard_projections(model: nn.Module, blocks: list[nn.Module], shard) -> list[list[nn.Module]]:
    """`shard(module, reshard_after_forward)` (fully_shard with the run's mesh and policies) on each projection of
    each block; returns them per block in forward order. The last block's last projection stays gathered after
    forward, like the last block: backward needs it first."""
    from meshtune.quiet import quiet_fsdp_projection_views

    quiet_fsdp_projection_views()
    units = []
    for i, block in enumerate(blocks):
        inner = projections(model, block)
        for j, module in enumerate(inner):
            shard(module, not (i == len(blocks) - 1 and j == len(inner) - 1))
        units.append(inner)
    return units


def execution_order(blocks: list[nn.Module], units: list[list[nn.Module]]) -> tuple[list, list]:
    """(forward order, backward order) of the blocks' units and their projections' units."""
    forward = [m for block, inner in zip(blocks, units, strict=True) for m in (block, *inner)]
    backward = [m for block, inner in reversed(list(zip(blocks, units, strict=True)))
                for m in (block, *reversed(inner))]
    return forward, backward


def chain_prefetch(blocks: list[nn.Module], units: list[list[nn.Module]], recomputed: bool) -> None:
    """Make every unit start the all-gather of the unit that runs after it, forward and backward (module docstring).

    Within a block, FSDP2's own prefetch lists; into the next block in forward, a pre-forward hook that does
    nothing inside backward (a recomputed block's last projection). A unit that would prefetch nothing useful
    prefetches itself (gathered already: a no-op), so that none falls back to FSDP2's implicit backward prefetch:
    the last unit of backward, and, with `recomputed` (reshard_recomputed's hooks), the last projection of a
    checkpointed block, whose pre-backward runs just before the block's recompute, which gathers the others."""
    forward, backward = execution_order(blocks, units)
    block_of = {id(m): b for b, inner in zip(blocks, units, strict=True) for m in (b, *inner)}
    for unit, after in itertools.pairwise(forward):
        if block_of[id(after)] is block_of[id(unit)]:
            unit.set_modules_to_forward_prefetch([after])
        else:  # the next block's unit and its first projection, as soon as this one is gathered
            targets = [after, *units[blocks.index(after)][:1]]
            unit.register_forward_pre_hook(lambda module, args, targets=targets: _prefetch(targets))
    recomputing = {id(inner[-1]) for block, inner in zip(blocks, units, strict=True)
                   if recomputed and inner and getattr(block, "activation_checkpointing", False)}
    for unit, after in itertools.pairwise(backward):
        if id(unit) in recomputing:
            unit.set_modules_to_backward_prefetch([unit])
        else:  # into the next block: its unit and its last projection (the first of its backward) at once
            unit.set_modules_to_backward_prefetch(
                [after] if block_of[id(after)] is block_of[id(unit)] else [after, *units[blocks.index(after)][-1:]])
    if backward:
        backward[-1].set_modules_to_backward_prefetch([backward[-1]])


def _prefetch(targets: list[nn.Module]) -> None:
    if not in_backward():
        for target in targets:
            target.unshard(async_op=True)  # FSDP2 waits for it in the target's pre-forward


def reshard_recomputed(units: list[list[nn.Module]], prefetch: bool) -> None:
    """Free each projection again after its forward is recomputed inside backward (activation checkpointing),
    except each block's last two, which backward runs first; the last starts, with `prefetch`, the gather of the
    projection backward runs third (module docstring). Only for units resharded after forward
    (parallel.reshard_after_forward)."""
    for inner in units:
        for j, module in enumerate(inner):
            if j < len(inner) - 2:
                module.register_forward_hook(_free_if_recomputed)
            elif prefetch and j == len(inner) - 1 and j >= 2:
                module.register_forward_hook(
                    lambda m, args, out, nxt=inner[j - 2]: nxt.unshard(async_op=True) if in_backward() else None)


def _free_if_recomputed(module: nn.Module, args, output) -> None:
    if in_backward():
        module.reshard()


def selective_context(keep: set) -> tuple[TorchDispatchMode, TorchDispatchMode]:
    """(forward, recompute) contexts for `torch.utils.checkpoint.checkpoint(context_fn=...)`: the forward keeps
    the outputs of the ops in `keep`, in call order; the recompute returns them instead of running those ops again
    and runs every other op (module docstring). Unlike torch's, a kept output is not checked for in-place changes:
    the decoder never modifies a matmul's output in place (recipes/lora/recipe.py)."""
    kept: collections.deque = collections.deque()
    return _KeepOutputs(keep, kept), _ReuseOutputs(keep, kept)


class _KeepOutputs(TorchDispatchMode):
    def __init__(self, keep: set, kept: collections.deque) -> None:
        super().__init__()
        self.keep, self.kept = keep, kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.keep:  # detached: no reference from the kept value back to the autograd graph
            self.kept.append(tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in out)
                             if isinstance(out, tuple) else out.detach())
        return out


class _ReuseOutputs(TorchDispatchMode):
    def __init__(self, keep: set, kept: collections.deque) -> None:
        super().__init__()
        self.keep, self.kept = keep, kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in self.keep:
            return func(*args, **(kwargs or {}))
        if not self.kept:
            raise RuntimeError(f"selective activation checkpointing: the recompute called {func} more often than "
                               "the forward did (a second backward through the same checkpointed block?)")
        return self.kept.popleft()
