"""Mistral (`MistralForCausalLM`): a true sliding-window attention mask (`sliding_window`, every layer)."""

from meshtune.models.families.base import Family
from meshtune.models.families.llama import _from_hf as _llama_from_hf


def _from_hf(hf: dict, refuse) -> dict:
    _llama_from_hf(hf, refuse)
    return {"sliding_window": hf.get("sliding_window") or 0, "layer_types": []}


FAMILY = Family(name="mistral", model_types=("mistral",), architecture="MistralForCausalLM",
                features=frozenset({"sliding_window"}), from_hf=_from_hf,
                to_hf=lambda m: {"sliding_window": m.sliding_window or None})
