"""Phi-3 and Phi-3.5 (`Phi3ForCausalLM`, model_type phi3: the mini/medium 4k and 8k variants): a Llama block whose
q/k/v projections are one tensor (`self_attn.qkv_proj`, rows q then k then v) and whose gate/up projections are
one (`mlp.gate_up_proj`, rows gate then up), and a sliding window in every layer where config.json sets one.
meshtune keeps wq/wk/wv and w1/w3 apart (recipes, TP and pruning address them); the weight adapter splits the
fused tensors on load and fuses them on export. LongRoPE (`rope_scaling` longrope/su, the 128k variants) is not
implemented (one line names the key); dropouts (`resid_pdrop`, `embd_pdrop`, `attention_dropout`) are training
options, ignored on load and written as 0."""

from meshtune.models.families.base import DECODER, HF_BLOCK, Family

QKV, GATE_UP = "self_attn.qkv_proj", "mlp.gate_up_proj"
HF_PHI3_BLOCK = {**{k: v for k, v in HF_BLOCK.items() if k not in (DECODER.q_norm, DECODER.k_norm)},
                 DECODER.q: QKV, DECODER.k: QKV, DECODER.v: QKV, DECODER.gate: GATE_UP, DECODER.up: GATE_UP}


def _from_hf(hf: dict, refuse) -> dict:
    for key in ("rope_parameters", "rope_scaling"):
        rope = hf.get(key) or {}
        # transformers reads "su" and "yarn" of a Phi-3 config as longrope too
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise refuse(key, "is not supported: Phi-3's longrope (the 128k variants) is not implemented in "
                         "meshtune; use a 4k/8k variant (rope_type default)")
    for key in ("attention_bias", "qk_layernorm"):
        if hf.get(key):
            raise refuse(key, "is not supported by meshtune's Phi-3 (no biases, no q/k norms)")
    return {"sliding_window": hf.get("sliding_window") or 0, "layer_types": []}


def _to_hf(m) -> dict:
    return {"sliding_window": m.sliding_window or None, "original_max_position_embeddings": m.max_seq_len,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0,
            # Phi3Config's defaults (pad 32000, eos 32000) fall outside a smaller vocabulary; an export with a
            # tokenizer folder takes that folder's ids instead
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


FAMILY = Family(name="phi3", model_types=("phi3",), architecture="Phi3ForCausalLM",
                features=frozenset({"sliding_window"}), rope_scaling=False, from_hf=_from_hf, to_hf=_to_hf,
                hf_block=HF_PHI3_BLOCK,
                hf_fused={QKV: (DECODER.q, DECODER.k, DECODER.v), GATE_UP: (DECODER.gate, DECODER.up)})
