"""The model registry: one module per family, each holding a `Family` spec (see base.py).

    fam = family("qwen2")                         # by model.family
    fam = family_of_hf(config_json_dict)          # by config.json's model_type
    fam.names.q, fam.hf_block[fam.names.q]        # "attention.wq", "self_attn.q_proj"

Adding a family: a module here with its FAMILY, listed below, and its parity test against transformers
(tests/unit/test_families.py). No torch import.
"""

from __future__ import annotations

from meshtune.config import ConfigError
from meshtune.models.families import gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3
from meshtune.models.families.base import DECODER, FEATURES, Family, ModuleNames

__all__ = ["DECODER", "FAMILIES", "Family", "ModuleNames", "check_features", "family", "family_of_hf"]

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY,
                                                    gemma2.FAMILY, gemma3.FAMILY, phi3.FAMILY)}


def family(name: str, key: str = "model.family") -> Family:
    """The family called `name`.

    Raises:
        ConfigError: naming `key` and the known families.
    """
    if name not in FAMILIES:
        raise ConfigError(f"{key}: {name!r} is not a model family; use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_hf(hf: dict, source: str = "config.json") -> Family:
    """The family reading a config.json with this `model_type`.

    Raises:
        ConfigError: naming the file and `model_type`, and the types meshtune reads.
    """
    model_type = hf.get("model_type")
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise ConfigError(f"{source}: model_type={model_type!r} is not supported; meshtune reads {known}")


def check_features(m, key: str = "model") -> None:
    """Refuse model.* features the family's architecture does not have: an export could not express them.

    Raises:
        ConfigError: naming the key, the family and the families that have the feature.
    """
    fam = family(m.family, f"{key}.family")
    for name, off in FEATURES.items():
        if name not in fam.features and getattr(m, name) != off:
            have = [f.name for f in FAMILIES.values() if name in f.features]
            raise ConfigError(f"{key}.{name}={getattr(m, name)!r}: model.family={fam.name} has no such feature; "
                              f"families that do: {', '.join(have) or 'none'}")
    kind = m.rope_scaling.get("rope_type", m.rope_scaling.get("type", "default"))
    if not fam.rope_scaling and kind != "default":
        raise ConfigError(f"{key}.rope_scaling: rope_type {kind!r} is not available for model.family={fam.name} "
                          "(its Hugging Face architecture scales rotary embeddings in a way meshtune does not "
                          "implement); drop model.rope_scaling")
