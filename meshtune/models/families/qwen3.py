"""Qwen3 dense (`Qwen3ForCausalLM`): RMSNorm over each query and key head, an explicit `head_dim` (wider than
hidden_size / num_attention_heads in the real sizes), no biases."""

from meshtune.models.families.base import Family, sliding_from_hf, sliding_to_hf


def _from_hf(hf: dict, refuse) -> dict:
    if hf.get("attention_bias"):
        raise refuse("attention_bias", "is not supported: meshtune's Qwen3 has no q/k/v/o biases")
    return {"qk_norm": True, **sliding_from_hf(hf)}


FAMILY = Family(name="qwen3", model_types=("qwen3",), architecture="Qwen3ForCausalLM",
                features=frozenset({"qk_norm", "sliding_window", "layer_types"}), from_hf=_from_hf,
                to_hf=lambda m: {"attention_bias": False, **sliding_to_hf(m)})
