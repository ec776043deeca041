"""Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): biases on the q/k/v projections, tied embeddings in the small sizes,
optional sliding attention on the upper layers (`use_sliding_window`, `max_window_layers`)."""

from meshtune.models.families.base import Family, sliding_from_hf, sliding_to_hf

FAMILY = Family(name="qwen2", model_types=("qwen2",), architecture="Qwen2ForCausalLM",
                features=frozenset({"attn_bias", "sliding_window", "layer_types"}),
                from_hf=lambda hf, refuse: {"attn_bias": True, **sliding_from_hf(hf)}, to_hf=sliding_to_hf)
