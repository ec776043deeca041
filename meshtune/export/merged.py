"""`--format merged`: model.safetensors, the full model under base-model names with every recipe folded in
(LoRA: W + alpha/r B A; pruning masks multiplied in). A run without recipes exports as is. Recipes that add
modules no base weight can absorb (adapters, prefixes) are refused: base + adapter under one name would load
silently wrong into a plain model. The metadata holds the model config, so `meshtune.artifacts` loads it."""

from __future__ import annotations

from meshtune.export.base import Format, merged_state, metadata, register, save_safetensors

FILE = "model.safetensors"


def write(run, out, opts) -> list:
    return [save_safetensors(merged_state(run), out / FILE, metadata(run, "merged"))]


register(Format("merged", "full weights, recipes folded in (model.safetensors)", write, merges=True))
