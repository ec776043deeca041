"""The Recipe interface and the registry that builds recipes from `recipe.name`.

A recipe is a model transform plus hooks on the one trainer, never a copy of the training loop:

    recipes = build_recipes(cfg.recipe)            # "lora+qat" -> [LoRARecipe, QATRecipe], in that order
    model = apply_recipes(model, recipes)          # module swaps, then requires_grad from every recipe
    model = parallelize(model, mesh, cfg.parallel) # recipe parameters are sharded like their base layers
    ... each micro-batch: loss = r.loss(loss, logits, batch) for r in recipes; backward
    ... each step: optimizer step, then r.after_optimizer_step(model) for r in recipes
    adapter = export_state(full_state_dict, recipes)   # plain tensors in, plain tensors out

Which parameters train is decided by all recipes together (`is_trainable`), so stacked PEFT recipes do not
freeze each other's parameters: a parameter trains if some recipe claims it (`trainable` -> True), else it is
frozen if some recipe freezes the base (`trainable` -> False), else it trains as in plain training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from meshtune.config import ConfigError, RecipeConfig

_REGISTRY: dict[str, type[Recipe]] = {}  # filled once, at import time, by @register


def register(name: str) -> Callable[[type[Recipe]], type[Recipe]]:
    """Class decorator: make a Recipe subclass available as `recipe.name: <name>`."""

    def deco(cls: type[Recipe]) -> type[Recipe]:
        assert name not in _REGISTRY, f"recipe {name!r} registered twice"
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_recipes() -> tuple[str, ...]:
    """Names of the registered recipes, sorted."""
    import meshtune.recipes  # noqa: F401  (importing the package registers the built-in recipes)

    return tuple(sorted(_REGISTRY))


class Recipe:
    """Base class with no-op hooks; a recipe overrides what it needs.

    Attributes:
        name: the registered name (set by @register).
        cfg: the whole `recipe` config section; each recipe reads its own sub-section.
    """

    name: str = ""
    changes_loss: bool = False
    """`loss` changes the training loss (the pipeline schedule computes the loss on its last stage only)."""
    mergeable: bool = False
    """`merge_state` folds what the recipe learned into base-model weights (merged, hf, sparse, shrunk and
    quantized exports need every recipe of a run to be mergeable)."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg

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

    def trainable(self, name: str, param: nn.Parameter) -> bool | None:
        """True: the parameter is this recipe's and trains; False: this recipe freezes it; None: no opinion."""
        return None

    def loss(self, task_loss: torch.Tensor, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The micro-batch's training loss given its task loss (distillation, regularisers): default unchanged.

        `task_loss` is the cross-entropy SUMMED over the micro-batch's valid tokens (the trainer scales it by
        dp / global tokens afterwards), so a returned loss must be a per-token sum too. `logits` are the model's
        outputs for `batch["input_ids"]` (on the device), `batch` holds input_ids and labels. Recipes chain:
        each gets the previous one's result. The logged loss stays the task loss."""
        return task_loss

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Runs after every optimizer step (re-apply pruning masks, update quantisation ranges...)."""

    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What this recipe learned, from the model's FULL state dict (the runtime gathers sharded tensors
        first); plain tensors in, plain tensors out. Default: nothing."""
        return {}

    def export_formats(self) -> tuple[str, ...]:
        """`meshtune export` formats that exist because of this recipe (e.g. `adapter`, `peft`, `sparse`,
        `shrunk`, `quantized`); a format module then calls the recipe's method for it. Default: none."""
        return ()

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

    def export_formats(self) -> tuple[str, ...]:
        return ("adapter",)

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


def build_recipes(cfg: RecipeConfig) -> list[Recipe]:
    """The recipes named by `cfg.name` (`lora`, or several joined by `+`), in that order.

    Raises:
        ConfigError: naming `recipe.name` and the known recipes, for an unknown or repeated name.
    """
    known = registered_recipes()
    names = cfg.name.split("+") if cfg.name else []  # the same split as config.validate
    for n in names:
        if n not in _REGISTRY:
            raise ConfigError(f"recipe.name: unknown recipe {n!r} in {cfg.name!r}; known: {', '.join(known)} "
                              "(join several with +), or empty for full training")
    if len(set(names)) != len(names):
        raise ConfigError(f"recipe.name: {cfg.name!r} names a recipe twice; name each once")
    return [_REGISTRY[n](cfg) for n in names]


def is_trainable(recipes: Iterable[Recipe], name: str, param: nn.Parameter) -> bool:
    """Combine every recipe's answer: claimed by one -> trains; else frozen by one -> frozen; else trains."""
    answers = [r.trainable(name, param) for r in recipes]
    if any(a is True for a in answers):
        return True
    return not any(a is False for a in answers)


def set_trainable(model: nn.Module, recipes: Iterable[Recipe]) -> None:
    """Set requires_grad on every parameter from `is_trainable` (frozen parameters get no gradient and so
    no optimizer state: build the optimizer from parameters with requires_grad)."""
    recipes = list(recipes)
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(recipes, name, param))


def apply_recipes(model: nn.Module, recipes: Iterable[Recipe]) -> nn.Module:
    """Apply each recipe in order, then decide requires_grad from all of them together."""
    recipes = list(recipes)
    for recipe in recipes:
        model = recipe.apply(model)
    if recipes:
        set_trainable(model, recipes)
    return model


def export_state(state: dict[str, torch.Tensor], recipes: Iterable[Recipe]) -> dict[str, torch.Tensor]:
    """The union of what each recipe exports from a full state dict (an adapter-only checkpoint)."""
    out: dict[str, torch.Tensor] = {}
    for recipe in recipes:
        out.update(recipe.export_state(state))
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) unique parameter counts; tied weights count once."""
    params = list(model.parameters())  # parameters() already deduplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
