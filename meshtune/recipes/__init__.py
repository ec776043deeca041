"""Fine-tuning and compression recipes: model transforms plus trainer hooks, named by `recipe.name`.

One package per recipe (lora, adapters, prefix_tuning, prune, distill, qat, qlora), each declaring its config
section, checks and capabilities in a torch-free `SPEC` (meshtune/recipes/registry.py); its implementation is
imported only when a run builds it. The tuple below is the registry: adding a recipe is one package and one
entry. The `recipe` config section (`RecipeConfig`) is assembled from it.
"""

from __future__ import annotations

from dataclasses import field, make_dataclass

from meshtune.recipes import adapters, distill, lora, prefix_tuning, prune, qat, qlora
from meshtune.recipes.registry import (
    RecipeSpec,
    apply_recipes,
    count_parameters,
    export_state,
    instantiate,
    is_trainable,
    names_of,
    set_trainable,
    specs_of,
)

SPECS: tuple[RecipeSpec, ...] = (lora.SPEC, adapters.SPEC, prefix_tuning.SPEC, prune.SPEC, distill.SPEC, qat.SPEC,
                                 qlora.SPEC)
REGISTRY: dict[str, RecipeSpec] = {s.name: s for s in SPECS}

_NAME_DOC = ("Recipe to apply (" + ", ".join(f"`{s.name}`" for s in SPECS) + "), or several joined by `+` to stack "
             "them in that order; empty = plain training of every parameter.")
RecipeConfig = make_dataclass(
    "RecipeConfig",
    [("name", str, field(default="")), *((s.name, s.config, field(default_factory=s.config)) for s in SPECS)],
    namespace={"__doc__": "Fine-tuning and compression recipes applied to the model before it is parallelised.",
               "__module__": __name__,
               "__field_docs__": {"name": _NAME_DOC, **{s.name: s.doc for s in SPECS}}},
)

__all__ = ["REGISTRY", "SPECS", "RecipeConfig", "RecipeSpec", "apply_recipes", "build_recipes", "check_plan",
           "check_recipes", "count_parameters", "export_state", "is_trainable", "names_of", "registered_recipes",
           "set_trainable"]


def registered_recipes() -> tuple[str, ...]:
    """Names of the registered recipes, in registry order."""
    return tuple(REGISTRY)


def build_recipes(recipe_cfg) -> list:
    """The recipes `recipe_cfg.name` names (`lora`, or several joined by `+`), built in that order.

    Raises:
        ConfigError: naming `recipe.name` and the known recipes, for an unknown or repeated name.
    """
    return instantiate(recipe_cfg, REGISTRY)


def check_recipes(cfg) -> None:
    """`recipe.name` and every recipe's own checks (each section's values are checked named or not)."""
    specs_of(cfg.recipe, REGISTRY)
    for spec in SPECS:
        spec.check(cfg)


def check_plan(cfg, plan) -> None:
    """The named recipes' checks against the resolved layout.

    Raises:
        ConfigError: e.g. a recipe that changes the loss under pipeline parallelism.
    """
    from meshtune.config import ConfigError

    specs = specs_of(cfg.recipe, REGISTRY)
    loss = [s.name for s in specs if s.changes_loss]
    if plan.dims.pp > 1 and loss:
        raise ConfigError(f"recipe.name: {'+'.join(loss)} changes the training loss, which the pipeline schedule "
                          "computes on its last stage only; set parallel.pp=1")
    for spec in specs:
        spec.check_plan(cfg, plan)

