"""Llama 2, Llama 3 and 3.1-3.3 (`LlamaForCausalLM`): scaled rotary embeddings (`rope_scaling` llama3, linear,
dynamic, yarn) and tied embeddings (Llama 3.2 1B/3B). Also meshtune's own models (the default family)."""

from meshtune.models.families.base import Family


def _from_hf(hf: dict, refuse) -> dict:
    if hf.get("attention_bias"):
        raise refuse("attention_bias", "is not supported: Llama's attention_bias adds biases to q, k, v and o "
                     "projections, and meshtune's decoder has q/k/v biases only (model.family=qwen2)")
    return {}


FAMILY = Family(name="llama", model_types=("llama",), architecture="LlamaForCausalLM", from_hf=_from_hf,
                to_hf=lambda m: {"attention_bias": False, "mlp_bias": False})
