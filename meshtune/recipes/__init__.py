"""Fine-tuning and compression recipes: model transforms plus trainer hooks, built by name from `recipe.name`.

Importing this package registers the built-in recipes: lora, adapters, prefix, prune, distill, qat.
"""

from meshtune.recipes import adapters, distill, lora, prefix_tuning, prune, qat  # noqa: F401  (importing registers them)
from meshtune.recipes.base import (
    PeftRecipe,
    Recipe,
    apply_recipes,
    build_recipes,
    count_parameters,
    export_state,
    is_trainable,
    register,
    registered_recipes,
    set_trainable,
)

__all__ = ["PeftRecipe", "Recipe", "apply_recipes", "build_recipes", "count_parameters", "export_state",
           "is_trainable", "register", "registered_recipes", "set_trainable"]
