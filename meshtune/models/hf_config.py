"""Hugging Face config.json <-> `model.*`, through the family registry. No torch import.

    fields = model_fields_from_hf(json.loads(Path(d, "config.json").read_text()))   # {"family": "qwen2", ...}
    data = fill_from_hf(data, d)       # a run's raw config: model.* and data.tokenizer filled from an HF dir

`init_from=<HF dir>` takes the model from its config.json; a `model.*` value the user set that contradicts it
is refused, every such key in one line, before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from meshtune.config import ConfigError, ModelConfig
from meshtune.models.families import family, family_of_hf
from meshtune.models.families.base import common_from_hf, common_to_hf

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def is_hf_dir(path: str | Path) -> bool:
    """True for a directory holding config.json and model.safetensors or its sharded index."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file() and ((p / SINGLE_FILE).is_file() or (p / INDEX_FILE).is_file())


def model_fields_from_hf(hf: dict, source: str = CONFIG_FILE) -> dict:
    """A config.json (as a dict) -> the `model.*` values it determines, `family` included.

    Raises:
        ConfigError: for an unsupported model_type or feature, naming the config.json key.
    """
    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: {key}={hf.get(key)!r} {why}")

    fam = family_of_hf(hf, source)
    fields = {"family": fam.name, **common_from_hf(hf, refuse), **fam.from_hf(hf, refuse)}
    from meshtune.models.rope import check_rope_scaling

    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    check_rope_scaling(fields["rope_scaling"], fields["max_seq_len"], key=f"{source}: {key}")
    return fields


def model_config_from_hf(hf: dict, source: str = CONFIG_FILE) -> ModelConfig:
    """A config.json (as a dict) -> ModelConfig, with `vocab_size` filled in."""
    return ModelConfig(**model_fields_from_hf(hf, source))


def read_hf_json(path: str | Path) -> dict:
    f = Path(path) / CONFIG_FILE
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f}: cannot read a Hugging Face config ({e})") from None


def read_hf_config(path: str | Path) -> ModelConfig:
    """`model_config_from_hf` of `path/config.json`."""
    return model_config_from_hf(read_hf_json(path), source=str(Path(path) / CONFIG_FILE))


def hf_config_dict(m: ModelConfig, vocab_size: int, dtype: str = "float32") -> dict:
    """config.json of the family's `...ForCausalLM` equal to meshtune's decoder with `m`."""
    fam = family(m.family)
    return {"architectures": [fam.architecture], "model_type": fam.model_types[0], **common_to_hf(m, vocab_size),
            **fam.to_hf(m), "torch_dtype": dtype, "dtype": dtype}


def _effective(name: str, m: ModelConfig):
    """The value a field means (0 = derived defaults resolved), for comparing a user's config with config.json."""
    from meshtune.models.sizes import ffn_hidden_dim, head_dim, layer_windows

    if name == "n_kv_heads":
        return m.n_kv_heads or m.n_heads
    if name == "ffn_dim":
        return ffn_hidden_dim(m)
    if name == "head_dim":
        return head_dim(m)
    if name in ("sliding_window", "layer_types"):
        return layer_windows(m)
    if name == "rope_scaling":  # by meaning: the oldest configs' "type" is "rope_type", "default" is none
        from meshtune.models.rope import rope_type

        kind = rope_type(m.rope_scaling)
        rest = {k: v for k, v in m.rope_scaling.items() if k not in ("type", "rope_type")}
        return {} if kind == "default" else {"rope_type": kind, **rest}
    return getattr(m, name)


# fields an HF directory determines but a run may set differently without contradicting it
_FREE = {"init_std", "init_device"}


def mismatches(ours: ModelConfig, hf_fields: dict, given: set[str]) -> list[str]:
    """The `model.K=V` overrides (config.json's values) for each field in `given` that differs from it."""
    theirs = dataclasses.replace(ours, **hf_fields)
    # the user's values over config.json's: derived values (0 = default) resolve against the real model
    mine = dataclasses.replace(theirs, **{k: getattr(ours, k) for k in given if hasattr(ours, k)})
    fixes = []
    for name in sorted(given & hf_fields.keys() - _FREE):
        if name == "max_seq_len":
            if ours.max_seq_len > theirs.max_seq_len and not ours.rope_scaling:
                fixes.append(f"model.max_seq_len<={theirs.max_seq_len}")
            continue
        if _effective(name, mine) != _effective(name, theirs):
            value = getattr(theirs, name)
            text = json.dumps(value, separators=(",", ":")) if isinstance(value, (dict, list)) else value
            fixes.append(f"model.{name}={text}")
    return fixes


def fill_from_hf(data: dict, hf_dir: str | Path) -> dict:
    """Fill a run's raw config (`data`, YAML + overrides, before typing) from an HF directory: every `model.*`
    value config.json determines and the user left unset, and `data.tokenizer` when the directory has a
    tokenizer.json and the user named none. Returns `data`, changed in place.

    Raises:
        ConfigError: listing every `model.*` value the user set that contradicts config.json, as the fixes.
    """
    from meshtune.config import build

    path = Path(hf_dir)
    source = str(path / CONFIG_FILE)
    fields = model_fields_from_hf(read_hf_json(path), source)
    model = data.setdefault("model", {}) if isinstance(data.get("model", {}), dict) else None
    if model is None:
        return data  # not a mapping: build() names it
    given = set(model)
    ours = build(ModelConfig, model, "model.")
    fixes = mismatches(ours, fields, given)
    if fixes:
        raise ConfigError(f"init_from: {source} differs from this config in {len(fixes)} model value(s); set "
                          f"{' '.join(fixes)} or drop those keys (they are read from config.json)")
    for name, value in fields.items():
        if name not in given:
            model[name] = value
    tok = path / "tokenizer.json"
    section = data.setdefault("data", {})
    if isinstance(section, dict) and "tokenizer" not in section and tok.is_file():
        section["tokenizer"] = str(tok)
    return data
