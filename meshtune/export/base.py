"""The export-format registry and what formats share: metadata, safetensors writing, merged weights.

A format is one module under meshtune/export/ that registers a `Format`: its name, the file it writes, what
it needs of the run's recipes (declared by the recipes themselves, never recognised by name) and a `write`
function. `meshtune export` checks the request against those declarations before any weight is read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshtune.config import ConfigError

REGISTRY: dict[str, Format] = {}  # filled at import time by the format modules (meshtune/export/__init__.py)


@dataclass(frozen=True)
class Format:
    """An export format.

    Attributes:
        name: `--format` value.
        help: one line for `meshtune export --help`.
        write: (LoadedRun, out dir, options) -> the written files.
        out_dir: the default output folder inside the run dir ("" = the run dir itself).
        merges: every recipe must fold into the base weights (`Recipe.mergeable`).
        recipe_format: "" = no recipe needed; "any" = some recipe must offer this format in
            `Recipe.export_formats()`; "all" = every recipe must (and there must be one).
        requires: what the format needs, for the error when `recipe_format` is not met.
    """

    name: str
    help: str
    write: Callable
    out_dir: str = ""
    merges: bool = False
    recipe_format: str = ""
    requires: str = ""


@dataclass
class Options:
    """What `meshtune export` passes every format besides the run."""

    run_dir: Path
    quiet: bool = False
    scheme: str | None = None
    dtype: str | None = None
    """--dtype (bf16, fp16, fp32) for formats writing dense weights; None = the source checkpoint's."""
    max_seq_len: int | None = None
    """--max-seq-len: the KV-cache length of an ExecuTorch program; None = model.max_seq_len."""


def register(fmt: Format) -> Format:
    assert fmt.name not in REGISTRY, f"export format {fmt.name!r} registered twice"
    REGISTRY[fmt.name] = fmt
    return fmt


def check_format(name: str, recipes: list) -> Format:
    """The Format `name`, if the run's recipes can produce it; checked before any weights are read.

    Raises:
        ConfigError: for an unknown format, or one the recipes' declared capabilities do not allow.
    """
    if name not in REGISTRY:
        raise ConfigError(f"--format: {name!r} is not one of {', '.join(REGISTRY)}; pick one of them")
    fmt = REGISTRY[name]
    names = "+".join(r.name for r in recipes)
    offered = [r for r in recipes if name in r.export_formats()]
    if fmt.recipe_format == "all" and (not recipes or len(offered) < len(recipes)):
        has = f"recipe.name={names}; use --format adapter" if names else "no recipe; use --format merged"
        raise ConfigError(f"--format {name}: {fmt.requires}, this run has {has}")
    if fmt.recipe_format == "any" and not offered:
        if name == "adapter" and not recipes:
            raise ConfigError("--format adapter: this run has no recipe (full training), so there is no adapter; "
                              "use --format merged for its weights")
        others = sorted({f for r in recipes for f in r.export_formats()} & {"sparse", "shrunk"})
        fix = f"--format {others[0]}" if others else "--format merged"
        raise ConfigError(f"--format {name}: no recipe of this run (recipe.name={names or 'none'!r}) offers it; "
                          f"use {fix}")
    if fmt.merges:
        for recipe in recipes:
            if not recipe.mergeable:
                raise ConfigError(f"--format {name}: recipe {recipe.name!r} adds modules that cannot be folded "
                                  "into the base weights; use --format adapter (and load it on top of the base)")
    return fmt


def metadata(run, fmt: str) -> dict[str, str]:
    """safetensors metadata (str -> str): the format, training step, model config and recipe config.

    The recipe config describes the tensors in the file: prefix tuning's reparameterisation is folded at
    export, so `reparam_hidden` is recorded as 0 there."""
    art = run.artifact
    recipe = dataclasses.asdict(art.recipe_cfg)
    recipe["prefix"]["reparam_hidden"] = 0
    return {"format": "pt", "meshtune.export": fmt, "meshtune.step": str(art.step),
            "meshtune.model": json.dumps({**dataclasses.asdict(art.model_cfg), "vocab_size": art.vocab_size}),
            "meshtune.recipe": art.recipe_cfg.name, "meshtune.recipe_config": json.dumps(recipe)}


def save_safetensors(tensors: dict, path: Path, meta: dict[str, str] | None = None) -> Path:
    """Write contiguous copies of `tensors`; tensors sharing storage (tied embeddings) are stored separately."""
    from safetensors.torch import save_file

    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().contiguous()
        if t.data_ptr() in seen:  # safetensors refuses aliased tensors
            t = t.clone()
        seen.add(t.data_ptr())
        out[key] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=meta)
    return path


def merged_state(run) -> dict:
    """The full model under base-model names, every recipe folded in (LoRA: W + alpha/r B A)."""
    state = run.state
    for recipe in run.recipes:
        try:
            state = recipe.merge_state(state)
        except ValueError as e:
            raise ConfigError(f"--format merged: {e}") from None
    return state


def dense_model(model_cfg, vocab_size: int, state: dict):
    """meshtune's decoder on CPU in fp32 with the full `state` (base-model names), in eval mode, frozen."""
    from meshtune.models import build_model

    model = build_model(model_cfg, vocab_size, device="meta")
    model.to_empty(device="cpu")
    model.init_buffers()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval().requires_grad_(False)


def human_size(n: int) -> str:
    """Bytes as B / KiB / MiB / GiB with three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
