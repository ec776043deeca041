"""Bottleneck adapters (Houlsby et al. 2019): config section, checks, declaration; modules in recipe.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshtune.config import ConfigError
from meshtune.recipes.registry import RecipeSpec, forward_to


@dataclass
class AdapterConfig:
    """Bottleneck adapters (Houlsby et al. 2019) after the attention and/or MLP output of every block."""

    bottleneck: int = 16
    """Hidden size of each adapter (down-project dim -> bottleneck -> up-project to dim)."""
    where: Literal["both", "attention", "mlp"] = "both"
    """Where adapters go: after attention, after the MLP, or both (Houlsby)."""




def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def check(cfg) -> None:
    c = cfg.recipe.adapters
    _need(c.bottleneck > 0, f"recipe.adapters.bottleneck: must be positive, got {c.bottleneck}")


def check_plan(cfg, plan) -> None:
    _need(plan.dims.tp == 1 or not cfg.parallel.sequence_parallel, "recipe.name: adapters with "
          "parallel.sequence_parallel are not supported yet; set parallel.sequence_parallel=false")


def _implementation():
    from meshtune.recipes.adapters.recipe import AdapterRecipe

    return AdapterRecipe


SPEC = RecipeSpec("adapters", AdapterConfig, "Settings of the `adapters` recipe.", _implementation, check=check,
                  check_plan=check_plan, export_formats=lambda c: ("adapter",))
__getattr__ = forward_to("meshtune.recipes.adapters.recipe")
