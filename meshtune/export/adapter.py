"""`--format adapter`: adapter.safetensors, only what the recipes trained (`Recipe.export_state`; prefix
tuning's MLP reparameterisation folded into plain prefixes), with the recipe config, model config and step as
JSON in the safetensors metadata. Every tensor is full-size whatever layout trained it."""

from __future__ import annotations

from meshtune.export.base import Format, metadata, register, save_safetensors

FILE = "adapter.safetensors"


def write(run, out, opts) -> list:
    from meshtune.recipes import export_state

    return [save_safetensors(export_state(run.state, run.recipes), out / FILE, metadata(run, "adapter"))]


register(Format("adapter", "only the recipes' own tensors (adapter.safetensors)", write, recipe_format="any"))
