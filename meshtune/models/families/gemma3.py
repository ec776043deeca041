"""Gemma 3 text models (`Gemma3ForCausalLM`, model_type gemma3_text: gemma-3-1b and the text towers): GeGLU,
norms scaling by (1 + weight) before and after both sub-layers, q/k norms, embeddings scaled by sqrt(dim), the
softmax scaled by query_pre_attn_scalar, sliding-window layers (five in six) with their own rotary base, and
tied embeddings. Gemma 2 (soft-capping, no q/k norms) is gemma2.py."""

from meshtune.models.families.base import DECODER, HF_BLOCK, Family
from meshtune.models.sizes import head_dim

HF_GEMMA_BLOCK = {**HF_BLOCK, DECODER.mlp_norm: "pre_feedforward_layernorm",
                  DECODER.attn_out_norm: "post_attention_layernorm",
                  DECODER.ffn_out_norm: "post_feedforward_layernorm"}


def _from_hf(hf: dict, refuse) -> dict:
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key) is not None:
            raise refuse(key, "is not supported for gemma3_text, whose checkpoints have no soft-capping (Gemma 2's, "
                              "model_type gemma2, read it)")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if hf.get(key):
            raise refuse(key, "is not supported by meshtune's Gemma 3 (causal attention without biases)")
    n = hf["num_hidden_layers"]
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                      for i in range(n)]
    local = (hf.get("rope_parameters") or {}).get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default":
        raise refuse("rope_parameters", "scales the sliding layers' rotary embedding, which meshtune keeps plain")
    return {**gemma_from_hf(hf, types), "qk_norm": True,
            "rope_local_theta": float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))}


def gemma_from_hf(hf: dict, types: list[str]) -> dict:
    """The model.* values Gemma 2 and Gemma 3 read alike; `types`: each layer's attention kind. A key config.json
    leaves out takes transformers' default for both (head_dim 256, query_pre_attn_scalar 256, sliding_window
    4096), as transformers would load it."""
    return {"norm_offset": True, "sandwich_norm": True, "embed_scale": True, "head_dim": hf.get("head_dim") or 256,
            "attn_scale": float(hf.get("query_pre_attn_scalar") or 256),
            "sliding_window": hf.get("sliding_window", 4096) or 0, "layer_types": list(types),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True))}


def gemma_to_hf(m) -> dict:
    """The config.json keys Gemma 2 and Gemma 3 write alike."""
    scalar = m.attn_scale or head_dim(m)
    return {"hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,  # transformers: int
            "sliding_window": m.sliding_window or None,
            # [] means the same attention in every layer: all sliding when there is a window (layer_windows)
            "layer_types": list(m.layer_types) or [
                "sliding_attention" if m.sliding_window else "full_attention"] * m.n_layers,
            "attention_bias": False}


def _to_hf(m) -> dict:
    rope = {"rope_type": "default", **m.rope_scaling, "rope_theta": m.rope_theta}
    local = m.rope_local_theta or m.rope_theta
    return {**gemma_to_hf(m), "rope_local_base_freq": local, "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "rope_parameters": {"full_attention": rope, "sliding_attention": {"rope_type": "default",
                                                                               "rope_theta": local}}}


FAMILY = Family(name="gemma3", model_types=("gemma3_text",), architecture="Gemma3ForCausalLM",
                features=frozenset({"qk_norm", "sliding_window", "layer_types", "rope_local_theta", "norm_offset",
                                    "sandwich_norm", "mlp_act", "embed_scale", "attn_scale"}),
                from_hf=_from_hf, to_hf=_to_hf, hf_block=HF_GEMMA_BLOCK)
