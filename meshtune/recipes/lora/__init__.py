"""LoRA (Hu et al. 2021): its config section, checks and declaration; the layers are in recipe.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshtune.config import ConfigError
from meshtune.models.families import DECODER
from meshtune.recipes.registry import RecipeSpec, forward_to


@dataclass
class LoRAConfig:
    """LoRA (Hu et al. 2021): a trainable low-rank update B A added to frozen linear layers."""

    rank: int = 8
    """Rank r of the update B A (B: out x r, A: r x in)."""
    alpha: float = 16.0
    """The update is scaled by recipe.lora.alpha / recipe.lora.rank."""
    dropout: float = 0.0
    """Dropout on the input of the LoRA path only (the frozen path sees the clean input)."""
    targets: list[str] = field(default_factory=lambda: [DECODER.leaf(n) for n in DECODER.projections])
    """Linear layers to adapt: patterns matched against the end of module names (`wq`, `attention.wq`,
    `layers.0.*.w1`, fnmatch globs); each pattern must match at least one linear layer."""




def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def check(cfg) -> None:
    c = cfg.recipe.lora
    _need(c.rank > 0, f"recipe.lora.rank: must be positive, got {c.rank}")
    _need(c.alpha > 0, f"recipe.lora.alpha: must be positive, got {c.alpha}")
    _need(0 <= c.dropout < 1, f"recipe.lora.dropout: must be in [0, 1), got {c.dropout}")
    _need(bool(c.targets), "recipe.lora.targets: empty; name at least one linear layer, e.g. [wq, wv]")


def _implementation():
    from meshtune.recipes.lora.recipe import LoRARecipe

    return LoRARecipe


SPEC = RecipeSpec("lora", LoRAConfig, "Settings of the `lora` recipe.", _implementation, check=check,
                  mergeable=True, export_formats=lambda c: ("adapter", "peft"))
__getattr__ = forward_to("meshtune.recipes.lora.recipe")  # LoRALinear, merge_lora_state, ... on first use
