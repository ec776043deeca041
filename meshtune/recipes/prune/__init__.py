"""Sparse pruning (magnitude, 2:4, structured): config section, checks, declaration; masks in recipe.py,
exported forms in export.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from meshtune.config import ConfigError
from meshtune.models.families import DECODER
from meshtune.recipes.registry import RecipeSpec, forward_to, is_active
from meshtune.recipes.targets import matches_any


@dataclass
class PruneConfig:
    """Sparse pruning: magnitude (Zhu & Gupta 2017), semi-structured 2:4, or structured (heads, MLP channels)."""

    method: Literal["magnitude", "semi_structured", "structured"] = "magnitude"
    """`magnitude`: zero the smallest weights (unstructured); `semi_structured`: 2:4 sparsity, in every 4
    consecutive input weights keep the 2 largest; `structured`: remove whole attention heads (key/value
    groups) and MLP channels by importance (the same number per layer; export --format shrunk cuts them out)."""
    scope: Literal["global", "layer"] = "global"
    """Magnitude pruning ranks all target weights together (`global`) or each layer on its own (`layer`)."""
    sparsity: float = 0.5
    """Final fraction pruned, in [0, 1): of the target weights (magnitude), of the heads and of the MLP channels
    of every layer (structured); semi_structured (2:4) is always 0.5."""
    start_step: int = 0
    """Optimizer step at which the ramp starts (sparsity 0 there; one-shot pruning computes its masks then)."""
    end_step: int = 0
    """Step at which the cubic ramp reaches recipe.prune.sparsity; <= start_step = one shot at start_step."""
    frequency: int = 10
    """Masks are recomputed every this many steps between start_step and end_step (and re-applied after
    every optimizer step)."""
    importance: Literal["norm", "taylor"] = "norm"
    """Structured only, how heads and channels are ranked: `norm` = the squared norm of the weights that read or
    write the group; `taylor` = the first-order estimate of the loss change when the group is removed, (sum of
    gradient x weight over its weights)^2, averaged over the steps since the last mask update (Molchanov et al.
    2019; where the weights hold no `.grad`, e.g. under DeepSpeed ZeRO, it falls back to norm)."""
    targets: list[str] = field(default_factory=lambda: [DECODER.leaf(n) for n in DECODER.projections])
    """Linear layers to prune (magnitude, 2:4): patterns matched against the end of module names (fnmatch)."""



def check(cfg) -> None:
    """Config checks for `recipe.prune.*` against the model and tensor-parallel sizes.

    Raises:
        ConfigError: naming the field: sparsity outside [0, 1), a bad schedule, 2:4 on an input size not
            divisible by 4, or structured pruning removing every head / leaving sizes tp does not divide.
    """
    if not is_active(cfg, "prune"):
        return
    from meshtune.models.sizes import ffn_hidden_dim, head_dim

    p, m, tp = cfg.recipe.prune, cfg.model, max(cfg.parallel.tp, 1)
    if not 0 <= p.sparsity < 1:
        raise ConfigError(f"recipe.prune.sparsity: must be in [0, 1), got {p.sparsity}")
    if p.start_step < 0 or p.end_step < 0:
        raise ConfigError("recipe.prune.start_step / end_step: must be >= 0")
    if p.frequency < 1:
        raise ConfigError(f"recipe.prune.frequency: must be >= 1, got {p.frequency}")
    if p.method != "structured" and not p.targets:
        raise ConfigError("recipe.prune.targets: empty; name at least one linear layer, e.g. [w1, w2, w3]")
    hidden, kv = ffn_hidden_dim(m), m.n_kv_heads or m.n_heads
    if p.method == "semi_structured":
        n = DECODER
        inputs = {n.leaf(x): m.dim for x in (n.q, n.k, n.v, n.gate, n.up)}
        inputs.update({n.leaf(n.o): m.n_heads * head_dim(m), n.leaf(n.down): hidden})
        for name, size in inputs.items():
            if matches_any(name, p.targets) and size % 4:
                raise ConfigError(f"recipe.prune.method: 2:4 needs the input size of {name} ({size}) divisible by 4; "
                                  f"drop {name} from recipe.prune.targets or use method magnitude")
    if p.method == "structured":
        keep_kv, keep_ffn = kv - round(p.sparsity * kv), hidden - round(p.sparsity * hidden)
        if keep_kv < 1:
            raise ConfigError(f"recipe.prune.sparsity: {p.sparsity} would remove all {kv} key/value heads of each "
                              "layer; lower it")
        if keep_kv % tp or keep_ffn % tp:
            raise ConfigError(f"recipe.prune.sparsity: structured pruning keeps {keep_kv} kv heads and {keep_ffn} "
                              f"MLP channels per layer, not divisible by parallel.tp={tp}; pick a sparsity "
                              "whose kept sizes tp divides")


def _implementation():
    from meshtune.recipes.prune.recipe import PruneRecipe

    return PruneRecipe


# mergeable: the masks multiply into the weights
SPEC = RecipeSpec("prune", PruneConfig, "Settings of the `prune` recipe.", _implementation, check=check,
                  mergeable=True, export_formats=lambda c: ("shrunk",) if c.method == "structured" else ("sparse",))
__getattr__ = forward_to("meshtune.recipes.prune.recipe")
