"""`--format shrunk`: shrunk/model.safetensors + shrunk/config.yaml, a smaller dense model (structured
pruning's removed heads and MLP channels cut out) whose model.* sizes say so. Offered by recipes whose
`export_formats()` list it; they provide `shrink(state, model_cfg) -> (state, model_cfg)`."""

from __future__ import annotations

import dataclasses
import json

from meshtune.config import ConfigError, read_yaml
from meshtune.export.base import Format, merged_state, metadata, register, save_safetensors

FILE = "shrunk/model.safetensors"


def compressed_state(run):
    """(state dict, model config) of the smallest dense model the run's recipes give: merged, then shrunk by
    every recipe that shrinks; (None, config) when a recipe cannot be merged."""
    art = run.artifact
    if not all(r.mergeable for r in run.recipes):
        return None, art.model_cfg
    state, cfg = merged_state(run), art.model_cfg
    for recipe in run.recipes:
        if "shrunk" in recipe.export_formats():
            try:
                state, cfg = recipe.shrink(state, cfg)
            except ValueError as e:
                raise ConfigError(f"--format shrunk: {e}") from None
    return state, cfg


def write(run, out, opts) -> list:
    import yaml

    art = run.artifact
    state, model_cfg = compressed_state(run)
    model_json = {**dataclasses.asdict(model_cfg), "vocab_size": art.vocab_size}
    path = save_safetensors(state, out / FILE, {**metadata(run, "shrunk"), "meshtune.model": json.dumps(model_json)})
    raw = {k: v for k, v in read_yaml(opts.run_dir / "config.yaml").items() if k != "recipe"}
    raw.update(model=model_json, init_from=str(path))
    (path.parent / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return [path, path.parent / "config.yaml"]


register(Format("shrunk", "structured pruning cut out: a smaller dense model (shrunk/)", write, merges=True,
                recipe_format="any"))
