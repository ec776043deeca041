"""Knowledge distillation (Hinton et al. 2015): config section, checks, declaration; the loss in recipe.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshtune.config import ConfigError
from meshtune.recipes.registry import RecipeSpec, forward_to, is_active


@dataclass
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015) from a frozen teacher that runs beside the student."""

    teacher: str = ""
    """The teacher: a meshtune run dir (its config.yaml and newest checkpoint), a step_N checkpoint folder, a
    .safetensors file from `meshtune export --format merged`, or a Hugging Face Llama directory. Its
    vocabulary must equal the student's."""
    alpha: float = 0.5
    """Weight of the task loss; the distillation term gets 1 - alpha (alpha=1: plain training)."""
    temperature: float = 2.0
    """Softmax temperature T of both distributions; the KL term is scaled by T^2 (Hinton et al.)."""
    kl: Literal["forward", "reverse"] = "forward"
    """`forward` = KL(teacher || student) (mean-seeking, Hinton); `reverse` = KL(student || teacher)
    (mode-seeking, MiniLLM)."""
    hidden: float = 0.0
    """Weight of hidden-state matching: squared error between the teacher's final hidden state and the
    student's, mapped to the teacher's width by a learned projection (trained, not exported); 0 = off."""
    teacher_shard: Literal["auto", "replicate", "fsdp"] = "auto"
    """How the teacher is laid out: `replicate` = a full copy per rank; `fsdp` = FSDP2-sharded over the
    data-parallel ranks (gathered block by block in its forward; a full copy when there is one dp rank);
    `auto` = fsdp when the student is sharded (parallel.dp_shard > 1)."""




def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def check(cfg) -> None:
    kd = cfg.recipe.distill
    if not is_active(cfg, "distill"):
        return
    _need(bool(kd.teacher), "recipe.distill.teacher: empty; give the teacher's run dir, checkpoint, "
          ".safetensors file or Hugging Face directory")
    _need(0 <= kd.alpha <= 1, f"recipe.distill.alpha: must be in [0, 1], got {kd.alpha}")
    _need(kd.temperature > 0, f"recipe.distill.temperature: must be positive, got {kd.temperature}")
    _need(kd.hidden >= 0, f"recipe.distill.hidden: must be >= 0, got {kd.hidden}")


def check_plan(cfg, plan) -> None:
    _need(not (cfg.recipe.distill.hidden > 0 and plan.dims.tp > 1), "recipe.distill.hidden: hidden-state "
          "matching under parallel.tp > 1 is not supported; set recipe.distill.hidden=0 or parallel.tp=1")


def _implementation():
    from meshtune.recipes.distill.recipe import DistillRecipe

    return DistillRecipe


# mergeable: merging drops the training-only projection, the student alone is the result
SPEC = RecipeSpec("distill", DistillConfig, "Settings of the `distill` recipe.", _implementation, check=check,
                  check_plan=check_plan, changes_loss=True, mergeable=True)
__getattr__ = forward_to("meshtune.recipes.distill.recipe")
