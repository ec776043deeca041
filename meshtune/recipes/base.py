"""The Recipe interface: what a recipe's implementation does. What it declares is its `RecipeSpec`
(meshtune/recipes/registry.py), reached as `recipe.spec`.

A recipe is a model transform plus hooks on the one trainer, never a copy of the training loop:

    model = apply_recipes(model, recipes)          # module swaps, then requires_grad from every recipe
    model = parallelize(model, mesh, cfg.parallel) # recipe parameters are sharded like their base layers
    ... each micro-batch: loss = r.loss(loss, logits, batch) for r in recipes; backward
    ... each step: optimizer step, then r.after_optimizer_step(model) for r in recipes
"""

from __future__ import annotations

import torch
from torch import nn


class Recipe:
    """Base class with no-op hooks; a recipe overrides what it needs.

    Attributes:
        name: the recipe's name (set by build_recipes from its spec).
        cfg: the whole `recipe` config section; each recipe reads its own sub-section.
    """

    name: str = ""
    spec = None  # its RecipeSpec, set by build_recipes

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def changes_loss(self) -> bool:
        """`loss` changes the training loss (declared in the spec)."""
        return self.spec.changes_loss

    @property
    def mergeable(self) -> bool:
        """`merge_state` folds what the recipe learned into base-model weights (declared in the spec)."""
        return self.spec.mergeable

    def export_formats(self) -> tuple[str, ...]:
        """`meshtune export` formats that exist because of this recipe (declared in the spec); a format module
        then calls the recipe's method for it (`peft_files`, `sparse_tensors`, `shrink`, `quantize`)."""
        return tuple(self.spec.export_formats(getattr(self.cfg, self.name)))

    def apply(self, model: nn.Module) -> nn.Module:
        """Swap or wrap modules in place, before parallelize; a PEFT recipe also freezes what it does not own.

        Runs on a real device or on meta (new parameters are created where the base parameters are; call
        `init_weights` after the model is materialised)."""
        return model

    def init_weights(self, model: nn.Module) -> None:
        """(Re)initialise this recipe's own parameters, e.g. after `to_empty` on a model built on meta."""

    def setup(self, model: nn.Module, mesh, device: torch.device, loader) -> None:
        """Training only: called by build_trainer after every recipe's `apply`, before parallelize, with the
        model, the run's ParallelMesh, this rank's device and an `ArtifactLoader` (`find`, `load_model`): for
        state a recipe keeps beside the model (a distillation teacher) or modules only training needs.
        Default: nothing."""

    def preflight(self, model: nn.Module, loader) -> None:
        """Checks a launcher runs before any rank starts, on the model built on meta with every recipe applied:
        what `setup` would refuse (a missing teacher, another vocabulary), found from metadata only, and the
        modules `setup` would add (so checkpoint shapes can be compared). Default: nothing."""

    def trainable(self, name: str, param: nn.Parameter) -> bool | None:
        """True: the parameter is this recipe's and trains; False: this recipe freezes it; None: no opinion."""
        return None

    def loss(self, task_loss: torch.Tensor, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The micro-batch's training loss given its task loss (distillation, regularisers): default unchanged.

        `task_loss` is the cross-entropy SUMMED over the micro-batch's valid tokens (the trainer scales it by
        dp / global tokens afterwards), so a returned loss must be a per-token sum too. `logits` are the model's
        outputs for `batch["input_ids"]` (on the device), or, with train.loss_chunk_size, a ChunkedLogits
        (runtime/chunked_loss.py) whose `sum_over_chunks` sums a term chunk by chunk; `batch` holds input_ids and
        labels. Recipes chain: each gets the previous one's result. The logged loss stays the task loss."""
        return task_loss

    def tp_plan(self, model: nn.Module, plan: dict) -> dict:
        """The model's tensor-parallel plan ({module name: ParallelStyle}) adjusted for the modules this recipe
        swapped in (e.g. LoRA's A and B shard like their base layer). Default: unchanged."""
        return plan

    def after_tp(self, model: nn.Module, tp_mesh) -> None:
        """Distribute this recipe's parameters that no module plan covers (e.g. prefixes split by kv head),
        after the plan is applied. Default: nothing."""

    def after_parallelize(self, model: nn.Module) -> None:
        """Runs once after parallelize (and after materialising a model built on meta), before init_from loads:
        for what sharding leaves a recipe's tensors needing fixed (QLoRA's NF4 shards). Default: nothing."""

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Runs after every optimizer step (re-apply pruning masks, update quantisation ranges...)."""

    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What this recipe learned, from the model's FULL state dict (the runtime gathers sharded tensors
        first); plain tensors in, plain tensors out. Default: nothing."""
        return {}

    def merge_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`merge` on a full state dict: returns base-model names only (for a merged-weights export).

        Raises:
            ValueError: if this recipe cannot be folded into the base weights.
        """
        raise ValueError(f"recipe {self.name!r} cannot be merged into the base weights; export its adapter instead")


class PeftRecipe(Recipe):
    """A recipe that adds parameters, trains only those and freezes the base model.

    Subclasses set `param_markers`: a parameter is the recipe's when a component of its dotted name starts with
    one of them (`layers.0.attention.wq.lora_a.weight` -> `lora_`), whatever wrappers prefix the name.
    """

    param_markers: tuple[str, ...] = ()

    def owns(self, name: str) -> bool:
        """Whether the parameter or state-dict key `name` belongs to this recipe."""
        return any(part.startswith(self.param_markers) for part in name.split("."))

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        return self.owns(name)

    def freeze_base(self, model: nn.Module) -> None:
        """requires_grad = owned, so the recipe works alone; `apply_recipes` re-decides for stacks."""
        for name, param in model.named_parameters():
            param.requires_grad_(self.owns(name))

    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if self.owns(k)}
