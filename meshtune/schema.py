"""The whole run's configuration: the core sections (meshtune.config) plus every recipe's own section.

    cfg = load_config("pretrain/tiny", ["optim.lr=1e-3", "train.steps=20"])   # a bundled name or a YAML path

Every user mistake (unknown key, wrong type, impossible value, missing file) raises `ConfigError` with a
one-line message that names the key and the fix; the CLI prints it and exits with code 2. Checks of single
values and of values against each other run here; checks that need the world size run in the plan
(meshtune.runtime.plan). No torch import.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from meshtune.config import (
    CheckpointConfig,
    DataConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    apply_overrides,
    build,
    check_core,
    read_yaml,
    resolve_config_path,
)
from meshtune.config import help_text as _help_text
from meshtune.recipes import RecipeConfig, check_recipes


@dataclass
class Config:
    """A whole run."""

    run_dir: str = ""
    """Directory for this run's config.yaml, metrics.jsonl and checkpoints/; empty = runs/<config name>."""
    init_from: str = ""
    """Start from these model weights: a run dir or step_N checkpoint folder (any engine), a .safetensors file
    from `meshtune export`, or a Hugging Face model directory; empty = random init."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory))


def validate(cfg: Config) -> None:
    """The core sections' checks, then `recipe.name` and every recipe's own."""
    check_core(cfg)
    check_model(cfg.model)
    check_recipes(cfg)


def check_model(m: ModelConfig) -> None:
    """model.family is known and has every feature model.* asks for; rope scaling and layer types are whole."""
    from meshtune.models.families import check_features
    from meshtune.models.rope import check_rope_scaling
    from meshtune.models.sizes import layer_windows

    check_features(m)
    check_rope_scaling(m.rope_scaling, m.max_seq_len)
    layer_windows(m)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or the defaults when `path` is None), apply overrides, type-check and validate."""
    data = read_yaml(resolve_config_path(str(path))) if path is not None else {}
    apply_overrides(data, list(overrides), schema=Config)
    _fill_from_init(data)
    cfg = build(Config, data)
    if not cfg.run_dir:
        stem = Path(str(path)).stem if path is not None else "default"
        cfg.run_dir = str(Path("runs") / stem)
    validate(cfg)
    return cfg


def _fill_from_init(data: dict) -> None:
    """`init_from=<HF dir>`: model.* (and data.tokenizer) come from its config.json unless the user set them."""
    init = data.get("init_from")
    if isinstance(init, str) and init:
        from meshtune.models.hf_config import fill_from_hf, is_hf_dir

        if is_hf_dir(init):
            fill_from_hf(data, init)


def config_from_dict(data: dict) -> Config:
    cfg = build(Config, data)
    validate(cfg)
    return cfg


def help_text() -> str:
    """Every config key with its type, default and docstring, section by section."""
    return _help_text(Config)
