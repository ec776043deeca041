"""Quantization-aware training (torchao): config section, checks, declaration; the layers in recipe.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from meshtune.config import ConfigError
from meshtune.models.families import DECODER
from meshtune.recipes.registry import RecipeSpec, forward_to, is_active


@dataclass
class QuantConfig:
    """Quantization-aware training (torchao QAT): fake-quantized linear layers in training, real int8/int4 at export."""

    scheme: Literal["int8-int4", "int8-int8"] = "int8-int4"
    """int8-int4 = int8 dynamic per-token activations + int4 symmetric weights; int8-int8 = the same with int8
    weights (torchao Int8DynamicActivationIntxWeightConfig). Also the scheme of `meshtune export --format quantized`."""
    group_size: int = 32
    """Weights share one scale per group of this many input features; must divide every targeted layer's
    in_features; 0 = one scale per output channel."""
    targets: list[str] = field(default_factory=lambda: [DECODER.leaf(n) for n in DECODER.projections])
    """Linear layers to quantize: patterns matched against the end of module names like recipe.lora.targets
    (default: every transformer-block linear; add `output` for the head). Embeddings are not quantized."""




def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def check(cfg) -> None:
    c = cfg.recipe.qat
    _need(c.group_size >= 0, f"recipe.qat.group_size: must be >= 0 (0 = per output channel), got {c.group_size}")
    _need(bool(c.targets), "recipe.qat.targets: empty; name at least one linear layer, e.g. [wq, w1]")
    _need(not is_active(cfg, "qat") or cfg.parallel.tp == 1, "recipe.name: qat fake-quantizes whole weights, not "
          "tensor-parallel shards; set parallel.tp=1 (DDP and FSDP are supported)")
    _need(not (is_active(cfg, "qat") and is_active(cfg, "prune")), f"recipe.name: {cfg.recipe.name} stacks prune "
          "and qat, but QAT's module swap drops the pruning masks; prune first, then quantize the pruned run "
          "(`meshtune export RUN --format executorch|quantized --scheme int8-int8`) or train qat from its export")


def _implementation():
    from meshtune.recipes.qat.recipe import QATRecipe

    return QATRecipe


# mergeable: the trained weights are plain full-precision weights
SPEC = RecipeSpec("qat", QuantConfig, "Settings of the `qat` recipe (and of quantized exports).", _implementation,
                  check=check, mergeable=True, export_formats=lambda c: ("quantized",))
__getattr__ = forward_to("meshtune.recipes.qat.recipe")
