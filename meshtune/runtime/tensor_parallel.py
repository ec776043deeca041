"""Tensor parallelism with DTensor: apply the model's `tp_plan()` over the mesh's "tp" axis.

Shapes must split evenly: query heads, key/value heads, the MLP hidden size and the vocabulary are all
divided by the tp degree, and `meshtune.runtime.plan.check_tp_sizes` says which config key to change when
they are not.
"""

from __future__ import annotations

from torch import nn


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool, recipes=()) -> None:
    """Shard `model` in place over the 1-D `tp_mesh` following `model.tp_plan()`, as each recipe adjusts it
    for the modules it owns (`Recipe.tp_plan`), then let the recipes distribute what no plan covers
    (`Recipe.after_tp`)."""
    from torch.distributed.tensor.parallel import parallelize_module

    plan = model.tp_plan(sequence_parallel)
    for recipe in recipes:
        plan = recipe.tp_plan(model, plan)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    parallelize_module(model, tp_mesh, plan)
    if hasattr(model, "tie_weights"):  # embedding rows and head rows split alike (Shard(0)): one DTensor serves both
        model.tie_weights()
    for recipe in recipes:
        recipe.after_tp(model, tp_mesh)
    for name, p in model.named_parameters():  # SequenceParallel's new Parameters forget requires_grad=False
        if name in frozen:
            p.requires_grad_(False)
