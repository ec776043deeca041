"""Gemma 2 (`Gemma2ForCausalLM`, model_type gemma2: gemma-2-2b/9b/27b): Gemma 3's block without q/k norms, with
tanh soft-capping of the attention scores and of the output logits, sliding-window and global layers alternating
(the first slides), one rotary base for every layer, GeGLU, norms scaling by (1 + weight) before and after both
sub-layers, embeddings scaled by sqrt(dim), the softmax scaled by query_pre_attn_scalar, tied embeddings."""

from meshtune.models.families.base import Family
from meshtune.models.families.gemma3 import HF_GEMMA_BLOCK, gemma_from_hf, gemma_to_hf


def _from_hf(hf: dict, refuse) -> dict:
    for key in ("attention_bias", "use_bidirectional_attention"):
        if hf.get(key):
            raise refuse(key, "is not supported by meshtune's Gemma 2 (causal attention without biases)")
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    # a key config.json leaves out takes Gemma2Config's default (50, 30); written as null, it is off
    return {**gemma_from_hf(hf, types), "attn_softcap": float(hf.get("attn_logit_softcapping", 50.0) or 0.0),
            "logit_softcap": float(hf.get("final_logit_softcapping", 30.0) or 0.0)}


def _to_hf(m) -> dict:
    return {**gemma_to_hf(m), "attn_logit_softcapping": m.attn_softcap or None,
            "final_logit_softcapping": m.logit_softcap or None}


FAMILY = Family(name="gemma2", model_types=("gemma2",), architecture="Gemma2ForCausalLM",
                features=frozenset({"sliding_window", "layer_types", "norm_offset", "sandwich_norm", "mlp_act",
                                    "embed_scale", "attn_scale", "attn_softcap", "logit_softcap"}),
                from_hf=_from_hf, to_hf=_to_hf, hf_block=HF_GEMMA_BLOCK)
