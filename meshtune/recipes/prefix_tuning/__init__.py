"""Prefix tuning (Li & Liang 2021): config section, checks, declaration; the attention is in recipe.py."""

from __future__ import annotations

from dataclasses import dataclass

from meshtune.config import ConfigError
from meshtune.recipes.registry import RecipeSpec, forward_to


@dataclass
class PrefixConfig:
    """Prefix tuning (Li & Liang 2021): trainable key/value positions prepended in every attention layer."""

    length: int = 8
    """Prefix positions per layer; 0 = no prefix (the base model exactly); at most model.max_seq_len."""
    reparam_hidden: int = 0
    """0 = train the prefixes directly; > 0 = train them through an MLP of this hidden size (Li & Liang's
    reparameterisation), folded into plain prefixes at export."""




def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def check(cfg) -> None:
    c, m = cfg.recipe.prefix, cfg.model
    _need(c.length >= 0, f"recipe.prefix.length: must be >= 0, got {c.length}")
    _need(c.length <= m.max_seq_len, f"recipe.prefix.length: {c.length} exceeds model.max_seq_len="
          f"{m.max_seq_len}; use a shorter prefix")
    _need(c.reparam_hidden >= 0, f"recipe.prefix.reparam_hidden: must be >= 0, got {c.reparam_hidden}")


def check_plan(cfg, plan) -> None:
    _need(plan.dims.tp == 1 or not cfg.recipe.prefix.reparam_hidden, "recipe.prefix.reparam_hidden: the prefix "
          "reparameterisation under parallel.tp > 1 is not supported yet; set it to 0 (plain prefixes are split by "
          "head) or parallel.tp=1")


def _implementation():
    from meshtune.recipes.prefix_tuning.recipe import PrefixRecipe

    return PrefixRecipe


SPEC = RecipeSpec("prefix", PrefixConfig, "Settings of the `prefix` recipe.", _implementation, check=check,
                  check_plan=check_plan, export_formats=lambda c: ("adapter",))
__getattr__ = forward_to("meshtune.recipes.prefix_tuning.recipe")
