"""What a recipe declares, and the functions that combine recipes. No torch import: configs load, `--help`
prints and launches are checked without it.

Each recipe package (meshtune/recipes/<recipe>/__init__.py) declares one `RecipeSpec`: its config section,
its config checks, its layout checks and what it can do; its implementation (a `Recipe` subclass, torch) is
imported only when a run builds it. meshtune/recipes/__init__.py lists the packages: that list is the
registry. Nothing outside meshtune/recipes names a recipe; the runtime and export ask the declarations.

    recipes = build_recipes(cfg.recipe)            # "lora+qat" -> [LoRARecipe, QATRecipe], in that order
    model = apply_recipes(model, recipes)          # module swaps, then requires_grad from every recipe
    adapter = export_state(full_state_dict, recipes)   # plain tensors in, plain tensors out

Which parameters train is decided by all recipes together (`is_trainable`), so stacked PEFT recipes do not
freeze each other's parameters: a parameter trains if some recipe claims it (`trainable` -> True), else it is
frozen if some recipe freezes the base (`trainable` -> False), else it trains as in plain training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from meshtune.config import ConfigError


def _no_check(*args) -> None:
    return None


@dataclass(frozen=True)
class RecipeSpec:
    """A recipe's declaration.

    Attributes:
        name: the `recipe.name` it answers to (and its section, `recipe.<name>`).
        config: the dataclass of its section.
        doc: the section's one-line description in `--help`.
        implementation: returns the `Recipe` subclass (imports it, and torch, on first use).
        check: config checks, `check(cfg)` with the whole run config; they run whether or not the recipe is
            named (its section's values must be valid either way); `is_active(cfg, name)` tells which.
        check_plan: layout checks when the recipe is named, `check_plan(cfg, plan)` with the resolved plan.
        changes_loss: its `loss` hook changes the training loss (pipeline schedules compute the loss on their
            last stage only, so such a recipe cannot run with parallel.pp > 1).
        mergeable: it folds into base-model weights (merged, hf, sparse, shrunk and quantized exports).
        export_formats: `export_formats(section)`: the `meshtune export` formats that exist because of it.
    """

    name: str
    config: type
    doc: str
    implementation: Callable[[], type]
    check: Callable[[Any], None] = _no_check
    check_plan: Callable[[Any, Any], None] = _no_check
    changes_loss: bool = False
    mergeable: bool = False
    export_formats: Callable[[Any], tuple[str, ...]] = lambda section: ()


def names_of(recipe_cfg) -> list[str]:
    """The recipes `recipe.name` names, in order (`lora+qat` -> [lora, qat])."""
    return recipe_cfg.name.split("+") if recipe_cfg.name else []


def is_active(cfg, name: str) -> bool:
    """Whether the run config `cfg` names recipe `name`."""
    return name in names_of(cfg.recipe)


def specs_of(recipe_cfg, registry: dict[str, RecipeSpec]) -> list[RecipeSpec]:
    """The specs of the recipes `recipe.name` names, in order.

    Raises:
        ConfigError: naming `recipe.name` and the known recipes, for an unknown or repeated name.
    """
    names = names_of(recipe_cfg)
    for n in names:
        if n not in registry:
            raise ConfigError(f"recipe.name: unknown recipe {n!r} in {recipe_cfg.name!r}; known: "
                              f"{', '.join(registry)} (join several with +), or empty for full training")
    if len(set(names)) != len(names):
        raise ConfigError(f"recipe.name: {recipe_cfg.name!r} names a recipe twice; name each once")
    return [registry[n] for n in names]


def instantiate(recipe_cfg, registry: dict[str, RecipeSpec]) -> list:
    """The recipes `recipe.name` names, built in that order (their implementations imported now)."""
    out = []
    for spec in specs_of(recipe_cfg, registry):
        recipe = spec.implementation()(recipe_cfg)
        recipe.name, recipe.spec = spec.name, spec
        out.append(recipe)
    return out


def is_trainable(recipes: Iterable, name: str, param) -> bool:
    """Combine every recipe's answer: claimed by one -> trains; else frozen by one -> frozen; else trains."""
    answers = [r.trainable(name, param) for r in recipes]
    if any(a is True for a in answers):
        return True
    return not any(a is False for a in answers)


def set_trainable(model, recipes: Iterable) -> None:
    """Set requires_grad on every parameter from `is_trainable` (frozen parameters get no gradient and so
    no optimizer state: build the optimizer from parameters with requires_grad)."""
    recipes = list(recipes)
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(recipes, name, param))


def apply_recipes(model, recipes: Iterable):
    """Apply each recipe in order, then decide requires_grad from all of them together."""
    recipes = list(recipes)
    for recipe in recipes:
        model = recipe.apply(model)
    if recipes:
        set_trainable(model, recipes)
    return model


def export_state(state: dict, recipes: Iterable) -> dict:
    """The union of what each recipe exports from a full state dict (an adapter-only checkpoint)."""
    out: dict = {}
    for recipe in recipes:
        out.update(recipe.export_state(state))
    return out


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) unique parameter counts; tied weights count once."""
    params = list(model.parameters())  # parameters() already deduplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def forward_to(module: str):
    """A package `__getattr__` (PEP 562) that finds the names a recipe package does not define in its
    implementation module, imported (with torch) on first use; the package itself stays torch-free."""
    def __getattr__(name: str):
        import importlib

        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(importlib.import_module(module), name)
        except AttributeError:
            raise AttributeError(f"module {module.rsplit('.', 1)[0]!r} has no attribute {name!r}") from None

    return __getattr__
